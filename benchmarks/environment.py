"""What the benchmark runs against: a private PostgreSQL database and one
`orgbilling serve` process over it, both removed again at the end, whatever
happens (error, Ctrl-C, SIGTERM).
"""

import contextlib
import os
import signal
import sys
from pathlib import Path

import psutil
import psycopg

from tests.support import PostgresForTests, ServerProcess


def stop_on_sigterm() -> None:
    """Turns SIGTERM into SystemExit, so `finally` blocks and context
    managers clean up as they do on Ctrl-C."""

    def exit_now(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, exit_now)


@contextlib.contextmanager
def benchmark_database():
    """Yields (url, postgres): a fresh migrated database of its own.

    Uses ORGBILLING_DATABASE_URL when set (the database is dropped at the
    end), otherwise an embedded PostgreSQL in a temporary directory that is
    stopped and deleted at the end.
    """
    postgres = PostgresForTests()
    url = None
    try:
        url = postgres.new_database()
        yield url, postgres
    finally:
        with _report_cleanup_failure("dropping the benchmark database"):
            if url is not None and getattr(postgres, "data_dir", None) is None:
                _drop_database(postgres.admin_url, psycopg.conninfo.conninfo_to_dict(url)["dbname"])
        with _report_cleanup_failure("stopping PostgreSQL"):
            postgres.close()


def _drop_database(admin_url: str, name: str) -> None:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def benchmark_server(database_url: str):
    """Yields a running `orgbilling serve` process over database_url.

    Every other ORGBILLING_* variable of our environment reaches the server,
    so its settings (worker threads, pool size...) can be tried from outside.
    """
    server = ServerProcess({"ORGBILLING_DATABASE_URL": database_url})
    failed = False
    try:
        server.start()
        yield server
    except BaseException:
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


def postmaster_process(postgres: PostgresForTests) -> psutil.Process | None:
    """The embedded PostgreSQL's postmaster, to count the database's CPU
    time; None for an external database, whose processes we cannot see."""
    data_dir = getattr(postgres, "data_dir", None)
    if data_dir is None:
        return None
    pid_file = Path(data_dir) / "postmaster.pid"
    try:
        return psutil.Process(int(pid_file.read_text().split()[0]))
    except (OSError, ValueError, psutil.Error):
        return None
