"""The migration runner: each file once, in order, under a lock."""

import concurrent.futures
import shutil

import psycopg
import pytest

from orgbilling.server.migrate import MigrationError, migrate, MIGRATIONS_DIR
from tests.support import with_database


@pytest.fixture
def empty_database(postgres):
    name = "migrate_test"
    with psycopg.connect(postgres.admin_url, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name}")
        conn.execute(f"CREATE DATABASE {name}")
    return with_database(postgres.admin_url, name)


def test_rerunning_is_a_no_op(empty_database):
    assert migrate(empty_database) == sorted(p.name for p in MIGRATIONS_DIR.glob("*.sql"))
    assert migrate(empty_database) == []
    with psycopg.connect(empty_database) as conn:
        versions = [v for (v,) in conn.execute("SELECT version FROM schema_migrations ORDER BY 1")]
    assert versions == sorted(versions) and len(versions) == len(list(MIGRATIONS_DIR.glob("*.sql")))


def test_replicas_migrating_at_once_apply_each_file_once(empty_database):
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = [f.result() for f in [pool.submit(migrate, empty_database) for _ in range(4)]]
    applied = [name for result in results for name in result]
    assert sorted(applied) == sorted(p.name for p in MIGRATIONS_DIR.glob("*.sql"))


def test_an_edited_applied_migration_is_an_error(empty_database, tmp_path):
    copy = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS_DIR, copy)
    migrate(empty_database, copy)
    first = sorted(copy.glob("*.sql"))[0]
    first.write_text(first.read_text() + "\n-- edited\n")
    with pytest.raises(MigrationError, match="changed after it was applied"):
        migrate(empty_database, copy)
