"""What the benchmark runs against: a private PostgreSQL database and one
`orgbilling serve` process over it, both removed again at the end, whatever
happens (error, Ctrl-C, SIGTERM).
"""

import contextlib
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import psutil
import psycopg

from orgbilling.server.database import embedded_database_url, stop_embedded_database
from orgbilling.server.migrate import migrate
from tests.postgres import with_database
from tests.server_process import ServerProcess


def stop_on_sigterm() -> None:
    """Turns SIGTERM into SystemExit, so `finally` blocks and context
    managers clean up as they do on Ctrl-C."""

    def exit_now(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, exit_now)


@contextlib.contextmanager
def benchmark_database():
    """Yields (url, data_dir): a fresh, migrated database of the benchmark's own.

    With ORGBILLING_DATABASE_URL set, a new database on that server (its user
    must be allowed to create databases), dropped at the end; data_dir is
    None. Otherwise an embedded PostgreSQL in a temporary directory, stopped
    and deleted at the end, even if interrupted while it starts.
    """
    server_url = os.environ.get("ORGBILLING_DATABASE_URL")
    data_dir = None if server_url else Path(tempfile.mkdtemp(prefix="orgbilling-bench-"))
    database = f"orgbilling_bench_{os.getpid()}"
    created = False
    try:
        if data_dir is not None:
            server_url = embedded_database_url(data_dir)
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {database}")
            created = True
        url = with_database(server_url, database)
        migrate(url)
        yield url, data_dir
    finally:
        if created and data_dir is None:
            with _report_cleanup_failure("dropping the benchmark database"):
                with psycopg.connect(server_url, autocommit=True) as conn:
                    conn.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
        if data_dir is not None:
            with _report_cleanup_failure("stopping PostgreSQL"):
                stop_embedded_database(data_dir)
            shutil.rmtree(data_dir, ignore_errors=True)


RATE_LIMITS = ("rate_limit_reads_per_s", "rate_limit_writes_per_s")


def bench_token(database_url: str) -> str | None:
    """The bearer token of the benchmark's calls: ORGBILLING_BENCH_TOKEN if
    set, otherwise, on a server that has API keys, a new key with every
    scope made in the benchmark's own database; None without authentication."""
    token = os.environ.get("ORGBILLING_BENCH_TOKEN")
    if token:
        return token
    try:
        from orgbilling.server.auth.api_keys import create_api_key
        from orgbilling.server.auth.scopes import ALL_SCOPES
    except ImportError:  # a server from before authentication
        return None
    return create_api_key(database_url, "bench", sorted(ALL_SCOPES))


@contextlib.contextmanager
def benchmark_server(database_url: str, *, module: str = "orgbilling.server"):
    """Yields a running `orgbilling serve` process over database_url (run
    as `python -m module serve`: another module may change it first).

    Every other ORGBILLING_* variable of our environment reaches the server,
    so its settings (worker threads, pool size...) can be tried from outside.
    """
    server = ServerProcess(
        database_url, inherit_settings=True, command=[sys.executable, "-m", module, "serve"],
        # The per-caller rate limit would cap our one caller at its budget:
        # off, unless asked for. Servers without the setting ignore it.
        **{name: 0 for name in RATE_LIMITS if f"ORGBILLING_{name.upper()}" not in os.environ},
    )
    failed = False
    try:
        server.start()
        yield server
    except Exception:  # an error, not Ctrl-C: its log may tell why
        failed = True
        raise
    finally:
        with _report_cleanup_failure("stopping the server"):
            server.stop()
        if failed:
            print(f"server log kept at {server.log_path}", file=sys.stderr)
        else:
            server.log_path.unlink(missing_ok=True)


@contextlib.contextmanager
def _report_cleanup_failure(what: str):
    """Lets the next cleanup step run even if this one fails."""
    try:
        yield
    except Exception as error:  # noqa: BLE001: cleanup goes on regardless
        print(f"warning: {what} failed: {error!r}", file=sys.stderr)


def postmaster_process(data_dir: Path | None) -> psutil.Process | None:
    """The embedded PostgreSQL's postmaster, to count the database's CPU
    time; None for an external database, whose processes we cannot see."""
    if data_dir is None:
        return None
    pid_file = data_dir / "postgres" / "postmaster.pid"
    try:
        return psutil.Process(int(pid_file.read_text().split()[0]))
    except (OSError, ValueError, psutil.Error):
        return None
