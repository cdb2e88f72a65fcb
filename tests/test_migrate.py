"""The migration runner: versioned files once each, in order; repeatable
files (functions/) again whenever they change; all under one lock. And the
schema it builds holds no function that nothing calls."""

import concurrent.futures
import importlib.resources
import re
import shutil
from pathlib import Path

import psycopg
import pytest

from orgbilling.server import cli
from orgbilling.server import migrate as migrate_module
from orgbilling.server.migrate import MIGRATIONS_DIR, MigrationError, migrate

VERSIONED = sorted(p.name for p in MIGRATIONS_DIR.glob("*.sql"))
REPEATABLE = sorted(f"functions/{p.name}" for p in (MIGRATIONS_DIR / "functions").glob("*.sql"))


@pytest.fixture
def empty_database(postgres):
    return postgres.create_database("migrate_test", migrated=False)


@pytest.fixture
def migrations_copy(tmp_path) -> Path:
    copy = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def function_settings(url: str, name: str) -> list[str] | None:
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT proconfig FROM pg_proc WHERE proname = %s", (name,)).fetchone()[0]


def test_migrating_twice_leaves_nothing_to_do_the_second_time(empty_database):
    """Both kinds exist (the ledger's functions are in repeatable files), and
    a second run applies nothing."""
    assert VERSIONED and REPEATABLE
    assert migrate(empty_database) == VERSIONED + REPEATABLE
    assert migrate(empty_database) == []
    with psycopg.connect(empty_database) as conn:
        names = [n for (n,) in conn.execute("SELECT name FROM schema_migrations ORDER BY version")]
        repeatable = [n for (n,) in conn.execute("SELECT name FROM schema_repeatable_files ORDER BY 1")]
    assert names == VERSIONED and repeatable == REPEATABLE


def test_an_edited_repeatable_file_is_applied_again_alone(empty_database, migrations_copy):
    """Editing a function's file is how a function changes: that file, and
    only it, is applied again, settings included."""
    migrate(empty_database, migrations_copy)
    assert "plan_cache_mode=force_generic_plan" in function_settings(empty_database, "deduct_credits")
    deductions = migrations_copy / "functions" / "30_deductions.sql"
    edited = deductions.read_text().replace("SET plan_cache_mode = force_generic_plan",
                                            "SET plan_cache_mode = auto")
    assert edited != deductions.read_text()
    deductions.write_text(edited)

    assert migrate(empty_database, migrations_copy) == ["functions/30_deductions.sql"]
    assert "plan_cache_mode=auto" in function_settings(empty_database, "deduct_credits")
    assert migrate(empty_database, migrations_copy) == []


def test_a_failing_repeatable_file_applies_none_and_is_retried(empty_database, migrations_copy):
    """The changed repeatable files go in one transaction: one that fails
    leaves the others unapplied and unrecorded, so the next run tries again."""
    migrate(empty_database, migrations_copy)
    helpers = migrations_copy / "functions" / "10_helpers.sql"
    helpers.write_text(helpers.read_text() + "\n-- edited\n")
    broken = migrations_copy / "functions" / "50_subscriptions.sql"
    good = broken.read_text()
    broken.write_text(good + "\nSELECT no_such_function();\n")
    with pytest.raises(MigrationError, match="50_subscriptions.sql failed"):
        migrate(empty_database, migrations_copy)

    broken.write_text(good + "\n-- fixed\n")
    assert migrate(empty_database, migrations_copy) == [
        "functions/10_helpers.sql", "functions/50_subscriptions.sql"]


def test_a_new_versioned_file_applies_every_repeatable_file_again(empty_database, migrations_copy):
    """A versioned file may drop what functions depend on (changing a column's
    type means dropping the views over it): they are all created again."""
    migrate(empty_database, migrations_copy)
    (migrations_copy / "9999_drop_a_function.sql").write_text(
        "DROP FUNCTION pool_json(organization_credit_pools);\n")
    assert migrate(empty_database, migrations_copy) == ["9999_drop_a_function.sql"] + REPEATABLE
    with psycopg.connect(empty_database) as conn:
        assert conn.execute("SELECT count(*) FROM pg_proc WHERE proname = 'pool_json'").fetchone()[0] == 1


def test_an_edited_applied_versioned_file_is_an_error(empty_database, migrations_copy):
    migrate(empty_database, migrations_copy)
    first = sorted(migrations_copy.glob("*.sql"))[0]
    first.write_text(first.read_text() + "\n-- edited\n")
    with pytest.raises(MigrationError, match="changed after it was applied"):
        migrate(empty_database, migrations_copy)


def test_a_database_from_another_history_of_migrations_is_an_error(empty_database, migrations_copy):
    """Such as one built before the squash into 0001_baseline.sql."""
    migrate(empty_database, migrations_copy)
    first = sorted(migrations_copy.glob("*.sql"))[0]
    first.rename(first.with_name("0001_schema.sql"))
    with pytest.raises(MigrationError, match="another history of migrations"):
        migrate(empty_database, migrations_copy)


def test_no_migration_files_is_an_error_and_the_cli_says_so(empty_database, tmp_path, monkeypatch, capsys):
    """An installation without its SQL must not look migrated: the runner
    refuses, and `orgbilling migrate` prints why and exits non-zero, without
    a traceback."""
    empty = tmp_path / "empty"
    (empty / "functions").mkdir(parents=True)
    with pytest.raises(MigrationError, match="no migration files"):
        migrate(empty_database, empty)

    monkeypatch.setattr(migrate_module, "MIGRATIONS_DIR", empty)
    with pytest.raises(SystemExit) as exited:
        cli.main(["migrate", "--database-url", empty_database])
    assert exited.value.code != 0
    output = capsys.readouterr()
    assert "no migration files" in output.err and "Traceback" not in output.err + output.out


def test_replicas_migrating_at_once_apply_each_file_once(empty_database):
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = [f.result() for f in [pool.submit(migrate, empty_database) for _ in range(4)]]
    applied = [name for result in results for name in result]
    assert sorted(applied) == sorted(VERSIONED + REPEATABLE)


def server_sources() -> str:
    """Every Python file of the installed server package."""
    root = Path(str(importlib.resources.files("orgbilling.server")))
    return "\n".join(path.read_text() for path in sorted(root.rglob("*.py")))


def test_every_function_of_the_schema_is_called(empty_database):
    """A function built from scratch that nothing calls is dead weight that
    readers of the ledger must still understand: each is called by the
    server, by another function, by a view, or by a trigger."""
    migrate(empty_database)
    with psycopg.connect(empty_database) as conn:
        functions = conn.execute(
            """SELECT p.oid, p.proname, p.prosrc FROM pg_proc AS p
                 JOIN pg_namespace AS n ON n.oid = p.pronamespace
                WHERE n.nspname = 'public'
                  AND NOT EXISTS (SELECT 1 FROM pg_depend AS d
                                   WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid
                                     AND d.deptype = 'e')""").fetchall()
        views = [d for (d,) in conn.execute("SELECT definition FROM pg_views WHERE schemaname = 'public'")]
        triggered = {oid for (oid,) in conn.execute("SELECT tgfoid FROM pg_trigger WHERE NOT tgisinternal")}
    assert functions
    python = server_sources()
    uncalled = []
    for oid, name, _ in functions:
        called = re.compile(rf"\b{re.escape(name)}\b")
        bodies = [source for other, _, source in functions if other != oid] + views
        if not (called.search(python) or any(called.search(b) for b in bodies) or oid in triggered):
            uncalled.append(name)
    assert uncalled == []
