"""What the deployment (deploy/) relies on in the server: with
migrate_on_start off (the replicas, when a Job migrates), `orgbilling serve`
refuses a database that lacks a migration of its release, and starts on one
a newer release migrated; and the health name `liveness` follows the
process, not the database, so a database outage restarts no replica."""

import shutil
import subprocess
import sys
import time

import grpc
import psycopg
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from orgbilling.server.app import LIVENESS_SERVICE
from orgbilling.server.migrate import MIGRATIONS_DIR, migrate, unapplied
from tests.server_process import ServerProcess, environment_without_settings, setting_variables
from tests.support import REPO

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
VERSIONED = sorted(p.name for p in MIGRATIONS_DIR.glob("*.sql"))


@pytest.fixture
def migrations_copy(tmp_path):
    copy = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def serve_without_migrating(database_url: str, timeout_s: float = 60) -> subprocess.CompletedProcess:
    """`orgbilling serve` with migrate_on_start off, expected to exit by itself."""
    environment = environment_without_settings(setting_variables(
        {"database_url": database_url, "migrate_on_start": "false", "listen_address": "127.0.0.1:0"}))
    return subprocess.run([sys.executable, "-m", "orgbilling.server", "serve"], env=environment, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout_s)


def schema_tables(url: str) -> set[str]:
    with psycopg.connect(url) as conn:
        return {name for (name,) in conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}


def test_a_replica_that_does_not_migrate_refuses_an_empty_database_and_changes_nothing(postgres):
    url = postgres.create_database("deploy_empty", migrated=False)
    finished = serve_without_migrating(url)
    assert finished.returncode == 1, finished.stdout + finished.stderr
    assert "lacks migrations" in finished.stderr and VERSIONED[0] in finished.stderr, finished.stderr
    assert "Traceback" not in finished.stderr  # a clear error, not a crash
    assert schema_tables(url) == set()  # it neither migrated nor created the bookkeeping tables


def test_a_replica_refuses_a_database_a_release_behind_then_starts_once_it_is_migrated(database_url):
    """The rollout order the manifests follow: new replicas started before
    the migration Job has finished exit (and are restarted), naming what is
    missing; once `orgbilling migrate` has run, they start and serve. The
    database here holds the previous release's version of a function file."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("UPDATE schema_repeatable_files SET sha256 = 'the previous release'"
                     " WHERE name = 'functions/30_deductions.sql'")
    assert unapplied(database_url) == ["functions/30_deductions.sql"]
    finished = serve_without_migrating(database_url)
    assert finished.returncode == 1, finished.stdout + finished.stderr
    assert "functions/30_deductions.sql" in finished.stderr, finished.stderr

    assert migrate(database_url) == ["functions/30_deductions.sql"]  # the Job
    assert unapplied(database_url) == []
    with ServerProcess(database_url, migrate_on_start="false") as server:
        with grpc.insecure_channel(server.address) as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert status.status == SERVING


def test_a_versioned_migration_not_applied_is_missing(database_url):
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("DELETE FROM schema_migrations WHERE name = %s", (VERSIONED[-1],))
    assert unapplied(database_url) == [VERSIONED[-1]]


def test_a_changed_function_file_is_missing_unless_a_newer_release_migrated(postgres, migrations_copy):
    """A repeatable file of another checksum is this release's function not
    yet applied, or a newer release's (its Job has run while this release's
    replicas restart). Only versioned files the code does not know say
    which: with them, the older release starts (expand/contract keeps it
    working); without them, it refuses."""
    url = postgres.create_database("deploy_newer", migrated=False)
    helpers = migrations_copy / "functions" / "10_helpers.sql"
    helpers.write_text(helpers.read_text() + "\n-- the next release's edit\n")
    migrate(url, migrations_copy)
    assert unapplied(url) == ["functions/10_helpers.sql"]

    (migrations_copy / "9999_next_release.sql").write_text("CREATE TABLE next_release_table (id int);\n")
    migrate(url, migrations_copy)
    assert unapplied(url) == []


def test_an_edited_applied_migration_is_reported_not_ignored(postgres, migrations_copy):
    url = postgres.create_database("deploy_edited", migrations_dir=migrations_copy)
    first = migrations_copy / VERSIONED[0]
    first.write_text(first.read_text() + "\n-- edited after it was applied\n")
    assert unapplied(url, migrations_copy) == [
        f"{VERSIONED[0]} (the database applied version {int(VERSIONED[0][:4])} with another name or contents)"]


def health(address: str, service: str) -> int:
    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=2).status


def wait_for(predicate, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_liveness_stays_serving_through_a_database_outage_while_readiness_does_not(
        start_server, database_url, postgres):
    """The Deployment's readiness probe asks for "" (the database answers),
    its liveness probe for `liveness` (the process answers): an outage takes
    every replica out of the Service's endpoints, and restarts none."""
    server = start_server(database_url, probe_listen_address="127.0.0.1:0")
    probe = f"127.0.0.1:{server.probe_port}"
    wait_for(lambda: health(probe, "") == SERVING)
    assert health(probe, LIVENESS_SERVICE) == SERVING
    name = psycopg.conninfo.conninfo_to_dict(database_url)["dbname"]
    with postgres.admin_connection() as conn:
        conn.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS false")
        try:
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
            wait_for(lambda: health(probe, "") == NOT_SERVING)
            assert health(probe, LIVENESS_SERVICE) == SERVING
        finally:
            conn.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")
    wait_for(lambda: health(probe, "") == SERVING)
    server.stop()
