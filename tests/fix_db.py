"""Fixtures of the database: the session's PostgreSQL, a fresh database per
test, and data directories for servers' own embedded PostgreSQL.

The session's PostgreSQL is the server at ORGBILLING_TEST_DATABASE_URL (its
user must be allowed to create databases) if set, else a private embedded
one in a temporary directory. No other variable is read: a shell's
ORGBILLING_DATABASE_URL, a real database maybe, is never touched."""

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.postgres import Postgres


@pytest.fixture(scope="session")
def postgres():
    server = Postgres(os.environ.get("ORGBILLING_TEST_DATABASE_URL") or None)
    yield server
    server.close()


@pytest.fixture
def database_url(postgres):
    """A fresh, migrated database for this test alone."""
    return postgres.new_database()


@pytest.fixture
def embedded_data_dir():
    """A data directory for a server's own embedded PostgreSQL, outside
    pytest's tmp_path: pytest resets its root to mode 0700 whenever a pytest
    session starts, and the embedded server's own system user must reach it."""
    from orgbilling.server.database import stop_embedded_database

    path = Path(tempfile.mkdtemp(prefix="orgbilling-embedded-"))
    yield path
    try:
        stop_embedded_database(path)  # normally stopped already, with its server
    finally:
        shutil.rmtree(path, ignore_errors=True)
