"""tests/test_credit_service.py again, its server reaching the database
through PgBouncer in transaction mode (tests/pgbouncer.py), with
prepared_statements off as PgBouncer 1.18 requires."""

import pytest

from tests.pgbouncer import PgBouncer, missing_reason
from tests.test_credit_service import *  # noqa: F403: its tests and fixtures, collected here again

# Refused by validation before any SQL runs: nothing to learn through a pooler.
del test_deduct_rejects_bad_fields_by_name  # noqa: F821


@pytest.fixture(scope="module")
def pgbouncer(postgres):
    if missing_reason():
        pytest.skip(missing_reason())
    # Two server connections per database: the server's calls, health checks
    # and sweepers interleave on connections they share.
    bouncer = PgBouncer(postgres.admin_url, run_as=postgres.system_user, pool_size=2)
    yield bouncer
    bouncer.close()


@pytest.fixture
def server(start_server, database_url, token, pgbouncer):
    """tests/fix_server.py's, through PgBouncer."""
    running = start_server(pgbouncer.url(database_url), prepared_statements=False)
    yield running
    running.stop()
