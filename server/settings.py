"""Every setting of the server, each limit named with its unit last.

Each field is read from the environment variable ORGBILLING_<NAME> and from
the flag --<name-with-dashes>; a flag wins over the environment, and the
environment over the default here.
"""

import argparse
import dataclasses
import os
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class Settings:
    # Where gRPC listens, host:port.
    listen_address: str = "127.0.0.1:50051"
    # PostgreSQL to use; empty means the embedded server in data_dir.
    database_url: str = ""
    # Where the embedded PostgreSQL keeps its data when database_url is empty.
    data_dir: Path = Path(".orgbilling")
    # Connections kept open to PostgreSQL, and the most ever opened.
    pool_size_min: int = 4
    pool_size_max: int = 16
    # How long a call may wait for a free connection before UNAVAILABLE.
    pool_wait_timeout_ms: int = 2000
    # How many calls may wait for a connection before the rest are refused.
    pool_waiting_max: int = 256
    # Connections are replaced after this long, and closed after this long idle.
    pool_connection_lifetime_ms: int = 3_600_000
    pool_connection_idle_ms: int = 600_000
    # How long to wait for PostgreSQL to accept a new connection.
    database_connect_timeout_ms: int = 5000
    # The longest any one SQL statement may run.
    statement_timeout_ms: int = 5000
    # Threads running RPCs; more is not faster under the GIL, measure first.
    worker_threads: int = 16
    # RPCs in progress at once; past this, calls get RESOURCE_EXHAUSTED.
    concurrent_rpcs_max: int = 256
    # Largest request or response accepted.
    message_size_max_bytes: int = 4 * 1024 * 1024
    # Keepalive pings on idle connections.
    keepalive_time_ms: int = 30_000
    keepalive_timeout_ms: int = 10_000
    # How long in-flight calls may take to finish after SIGTERM.
    shutdown_grace_ms: int = 10_000
    # While stopping, how long no call must arrive before the listener closes.
    shutdown_quiet_ms: int = 300
    # How often the health service asks PostgreSQL whether it answers.
    health_check_interval_ms: int = 1000
    # Page sizes of list RPCs.
    page_size_default: int = 100
    page_size_max: int = 1000
    # Python logging level name.
    log_level: str = "INFO"

    @property
    def uses_embedded_database(self) -> bool:
        return not self.database_url

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        for field in dataclasses.fields(cls):
            parser.add_argument(
                "--" + field.name.replace("_", "-"),
                dest=field.name,
                default=None,
                help=f"env ORGBILLING_{field.name.upper()}, default {field.default!s}",
            )

    @classmethod
    def load(cls, arguments: argparse.Namespace | None = None, environ=os.environ) -> "Settings":
        values = {}
        for field in dataclasses.fields(cls):
            raw = getattr(arguments, field.name, None) if arguments else None
            if raw is None:
                raw = environ.get(f"ORGBILLING_{field.name.upper()}")
            if raw is None:
                continue
            values[field.name] = _parse(field, raw)
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.type is int and value < 0:
                raise ValueError(f"{field.name} must not be negative, got {value}")
        if self.pool_size_min > self.pool_size_max or self.pool_size_max < 1:
            raise ValueError("need 1 <= pool_size_max and pool_size_min <= pool_size_max")
        if not 1 <= self.page_size_default <= self.page_size_max:
            raise ValueError("need 1 <= page_size_default <= page_size_max")
        if self.worker_threads < 1 or self.concurrent_rpcs_max < 1:
            raise ValueError("worker_threads and concurrent_rpcs_max must be at least 1")


def _parse(field: dataclasses.Field, raw: str):
    if field.type is int:
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"{field.name} must be a whole number, got {raw!r}") from None
    if field.type is Path:
        return Path(raw)
    return raw
