"""Every setting of the server, each limit named with its unit last.

Each field is read from the environment variable ORGBILLING_<NAME> and from
the flag --<name-with-dashes>; a flag wins over the environment, and the
environment over the default here.
"""

import argparse
import dataclasses
import os
from pathlib import Path


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMATS = ("text", "json")
ACCESS_LOG_MODES = ("failures", "all", "off")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
    # Where gRPC listens, host:port.
    listen_address: str = "127.0.0.1:50051"
    # A second port for orchestrators' probes, host:port (empty: none),
    # serving health Check only, plaintext, on threads of its own
    # (probe_threads), so that probes never wait behind the main port's calls.
    probe_listen_address: str = ""
    probe_threads: int = 4
    # Prometheus metrics over HTTP at /metrics, host:port (empty: off, and
    # nothing is counted). Plaintext and unauthenticated, like the probe
    # port: bind it to a private interface.
    metrics_listen: str = ""
    # PostgreSQL to use; empty means the embedded server in data_dir.
    database_url: str = ""
    # Where the embedded PostgreSQL keeps its data when database_url is empty.
    data_dir: Path = Path(".orgbilling")
    # Whether `serve` applies pending migrations before it listens (under a
    # lock, so replicas starting at once are safe). Off where a migration Job
    # runs `orgbilling migrate` first: a replica then refuses to start while
    # the database lacks a migration of its release, rather than serve
    # against a schema its code does not know.
    migrate_on_start: bool = True
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
    # Whether each statement is prepared on the server on its first use on a
    # connection (psycopg's prepare_threshold 0; false: never, None). On, a
    # call skips the parse and plan of its statement; off is required behind
    # a pooler that hands one server connection to many clients without
    # tracking prepared statements: PgBouncer in transaction mode before 1.21
    # (or without max_prepared_statements). Cost measured in `make bench`.
    prepared_statements: bool = True
    # Threads running the calls whose servicers are plain code (the
    # interceptor chain's pool; checks, deductions, holds and health run on
    # the event loop and hold none). Sized for calls that are blocked (slow
    # or hostile clients, open streams): a blocked thread costs memory, not CPU.
    # It is also gRPC's own cap on calls: past it, RESOURCE_EXHAUSTED at once,
    # with no details, before any of our code runs (a backstop: see below).
    worker_threads: int = 1024
    # Calls in progress at once, health checks apart (admission control);
    # past this, RESOURCE_EXHAUSTED SERVER_BUSY with a RetryInfo of
    # busy_retry_after_ms, at once. This, not worker_threads, bounds the work.
    concurrent_rpcs_max: int = 256
    busy_retry_after_ms: int = 100
    # HTTP/2 streams (calls) one connection may have open at once. Keep it
    # well above any one client's concurrent calls: gRPC refuses a stream
    # (UNAVAILABLE, REFUSED_STREAM) now and then from about 60% of it, since
    # the server still counts streams its client has already seen end.
    http2_streams_per_connection_max: int = 256
    # Connections are closed gracefully (GOAWAY) at this age (plus up to 10%
    # jitter), and calls still running on them cut after the grace period: so
    # no call lives longer than their sum, a stalled request included.
    # Clients reconnect on their own.
    connection_age_max_ms: int = 120_000
    connection_age_grace_ms: int = 30_000
    # Streams of the open services (reflection, health Watch) open at once,
    # across them, and how long one may last before it ends normally.
    open_service_streams_max: int = 128
    open_service_stream_lifetime_ms: int = 60_000
    # Refused calls logged per second at most (INFO); the rest are counted.
    refusal_log_lines_per_s: int = 10
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
    # Group commit of deductions: lanes committing at once (one pool always
    # uses the same lane), deductions per transaction, and deductions that may
    # wait in one lane before callers get RESOURCE_EXHAUSTED. Lanes: about the
    # database's cores. Fewer lanes make bigger transactions over many pools;
    # on the 2-core bench machine 2 lanes against 8 gave deductions spread
    # over 1,000 orgs 13-46% more calls/s, a hot pool the same within the
    # noise (make bench's lanes-8 variant, benchmarks/README.md).
    group_commit_lanes: int = 2
    group_commit_batch_size_max: int = 256
    group_commit_queue_length_max: int = 4096
    # Deductions one DeductCreditsBatch call may carry.
    deduct_batch_items_max: int = 1000
    # How long the idempotency record of a refusal or an administrative change
    # answers retries of its key (a successful deduction's key: forever). A
    # retry after it is applied anew, so it must outlast any client's retries.
    # Then the sweeper deletes expired records every interval, in batches of
    # at most this many rows per statement.
    idempotency_retention_ms: int = 7 * 24 * 3_600_000
    sweeper_interval_ms: int = 60_000
    sweeper_batch_size_max: int = 1000
    # Reservations (holds): the TTL of a request that sets none, and the
    # range a request's TTL must fall in. The expiry sweeper persists expired
    # holds every interval, at most this many per batch (correctness never
    # waits for it: an expired hold counts as released from its expiry).
    reservation_ttl_default_ms: int = 300_000
    reservation_ttl_min_ms: int = 1000
    reservation_ttl_max_ms: int = 24 * 3_600_000
    reservation_sweeper_interval_ms: int = 10_000
    reservation_sweeper_batch_size_max: int = 1000
    # Subscription periods: the period sweeper applies ended periods (with
    # their refreshes) every interval, at most this many pools per batch.
    # Correctness never waits for it either: the first access to an org
    # after its period's end applies it.
    period_sweeper_interval_ms: int = 60_000
    period_sweeper_batch_size_max: int = 100
    # Page sizes of list RPCs.
    page_size_default: int = 100
    page_size_max: int = 1000
    # Python logging level name: DEBUG, INFO, WARNING, ERROR or CRITICAL.
    log_level: str = "INFO"
    # How log lines are written (to stderr): "text" for people at a terminal,
    # "json" for log collectors, one JSON object a line.
    log_format: str = "text"
    # The access log (INFO lines of logger orgbilling.server.access): a line
    # per call that "failures" (failed calls), "all" (every call) or "off".
    # Failed calls' lines are limited to refusal_log_lines_per_s in any mode.
    access_log: str = "failures"

    # Security (see the README's "Security" section).
    # Services anyone may call without credentials, comma separated; empty
    # closes them too (then any authenticated caller may use them).
    unauthenticated_services: str = (
        "grpc.health.v1.Health,grpc.reflection.v1alpha.ServerReflection,"
        "grpc.reflection.v1.ServerReflection"
    )
    # How often each server reloads the API keys, and how old its last good
    # load may get (reloads failing) before keys are refused with UNAVAILABLE.
    api_key_refresh_ms: int = 2000
    api_key_snapshot_stale_ms: int = 30_000
    # A key id not in the snapshot (a new key) reloads it at once, at most
    # once per this interval (a flood of guessed ids costs no more).
    api_key_unknown_refresh_interval_ms: int = 200
    # JWTs: the signing keys (a JWKS) from a URL or a file (at most one), the
    # issuer and audience every token must carry, the accepted algorithms
    # (asymmetric only, comma separated) and the clock skew tolerated.
    jwks_url: str = ""
    jwks_file: str = ""
    jwt_issuer: str = ""
    jwt_audience: str = ""
    jwt_algorithms: str = "RS256"
    jwt_leeway_ms: int = 10_000
    # Claims giving scopes (space-separated string or list), roles (a dotted
    # path to a list; roles named like scopes grant them) and the
    # organizations a token is limited to (a list of ids; [] is none).
    jwt_scope_claim: str = "scope"
    jwt_roles_claim: str = "realm_access.roles"
    jwt_orgs_claim: str = "org_ids"
    # Whether a token without the organizations claim is let in, on every
    # organization; off, such a token is refused (fail closed).
    jwt_orgs_claim_optional: bool = False
    # Verified tokens remembered until they expire (a signature check costs
    # ~300 µs); 0 checks every call's signature.
    jwt_cache_entries_max: int = 10_000
    # How often the JWKS is reloaded; an unknown kid reloads it at most once
    # per interval; a fetch's time and size limits.
    jwks_refresh_ms: int = 300_000
    jwks_unknown_kid_refresh_interval_ms: int = 30_000
    jwks_fetch_timeout_ms: int = 2000
    jwks_size_max_bytes: int = 1_048_576
    # TLS: the server's certificate chain and key (PEM files); with a client
    # CA, callers must present a certificate it signed (mutual TLS).
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    # Token buckets per authenticated caller, one for reads and one for
    # writes: sustained calls per second and the burst allowed above it.
    # A rate of 0 turns that limit off.
    rate_limit_reads_per_s: int = 1000
    rate_limit_read_burst: int = 2000
    rate_limit_writes_per_s: int = 1000
    rate_limit_write_burst: int = 2000
    # Callers whose buckets are remembered before full (idle) ones are forgotten.
    rate_limit_callers_max: int = 100_000

    @property
    def uses_embedded_database(self) -> bool:
        return not self.database_url

    @property
    def lane_pool_size(self) -> int:
        """Connections of the group commit's own pool (server.database.
        open_lane_pool), besides pool_size_max: one a lane, as a lane
        commits one batch at a time."""
        return self.group_commit_lanes

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        for field in dataclasses.fields(cls):
            # A bare boolean flag means true; it also takes a value (--x false).
            boolean = {"nargs": "?", "const": "true"} if field.type is bool else {}
            parser.add_argument(
                "--" + field.name.replace("_", "-"),
                dest=field.name,
                default=None,
                help=f"env ORGBILLING_{field.name.upper()}, default {field.default!s}"
                     + (f", one of {', '.join(_CHOICES[field.name])}" if field.name in _CHOICES else ""),
                **boolean,
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
        if min(self.group_commit_lanes, self.group_commit_batch_size_max,
               self.group_commit_queue_length_max, self.deduct_batch_items_max) < 1:
            raise ValueError("group commit and batch limits must be at least 1")
        if self.worker_threads < 1 or self.concurrent_rpcs_max < 1:
            raise ValueError("worker_threads and concurrent_rpcs_max must be at least 1")
        if self.idempotency_retention_ms < 3_600_000:
            # Shorter is a unit mistake, not a choice: retries would be applied twice.
            raise ValueError("idempotency_retention_ms must be at least an hour (3600000)")
        if min(self.sweeper_interval_ms, self.sweeper_batch_size_max) < 1:
            raise ValueError("sweeper_interval_ms and sweeper_batch_size_max must be at least 1")
        if not 1 <= self.reservation_ttl_min_ms <= self.reservation_ttl_default_ms <= self.reservation_ttl_max_ms:
            raise ValueError("need 1 <= reservation_ttl_min_ms <= reservation_ttl_default_ms"
                             " <= reservation_ttl_max_ms")
        if self.reservation_ttl_max_ms > 366 * 24 * 3_600_000:
            # The ledger refuses longer holds (reservations_batch): a unit mistake.
            raise ValueError("reservation_ttl_max_ms must be at most 366 days")
        if min(self.reservation_sweeper_interval_ms, self.reservation_sweeper_batch_size_max) < 1:
            raise ValueError("reservation_sweeper_interval_ms and reservation_sweeper_batch_size_max"
                             " must be at least 1")
        if min(self.period_sweeper_interval_ms, self.period_sweeper_batch_size_max) < 1:
            raise ValueError("period_sweeper_interval_ms and period_sweeper_batch_size_max"
                             " must be at least 1")
        if self.concurrent_rpcs_max + self.open_service_streams_max >= self.worker_threads:
            raise ValueError(
                "worker_threads must exceed concurrent_rpcs_max + open_service_streams_max:"
                " health checks and callers held at the admission limit need threads of their own")
        if min(self.http2_streams_per_connection_max, self.connection_age_max_ms, self.probe_threads,
               self.open_service_streams_max, self.open_service_stream_lifetime_ms) < 1:
            raise ValueError("stream and connection limits must be at least 1")
        self.validate_logging()
        self.validate_security()

    def validate_logging(self) -> None:
        # Refused here, at startup, with the choices: a typo must not mean
        # "no access log" or a crash at the first log line.
        if self.log_level.upper() not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")
        for name, choices in (("log_format", LOG_FORMATS), ("access_log", ACCESS_LOG_MODES)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")

    def validate_security(self) -> None:
        from orgbilling.server.auth.jwks import ASYMMETRIC_ALGORITHMS

        if self.jwks_url and self.jwks_file:
            raise ValueError("set jwks_url or jwks_file, not both")
        if self.jwt_enabled:
            if not self.jwt_issuer or not self.jwt_audience:
                raise ValueError("JWTs need jwt_issuer and jwt_audience: tokens are checked against both")
            refused = set(self.jwt_algorithm_list) - ASYMMETRIC_ALGORITHMS
            if refused or not self.jwt_algorithm_list:
                raise ValueError(
                    f"jwt_algorithms must be asymmetric ones from {', '.join(sorted(ASYMMETRIC_ALGORITHMS))};"
                    f" refused: {', '.join(sorted(refused)) or 'an empty list'}"
                )
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key go together")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        if min(self.api_key_refresh_ms, self.jwks_refresh_ms, self.jwks_fetch_timeout_ms) < 1:
            raise ValueError("api_key_refresh_ms, jwks_refresh_ms and jwks_fetch_timeout_ms must be at least 1")
        if self.api_key_snapshot_stale_ms <= self.api_key_refresh_ms:
            raise ValueError("api_key_snapshot_stale_ms must be longer than api_key_refresh_ms")
        for rate, burst in ((self.rate_limit_reads_per_s, self.rate_limit_read_burst),
                            (self.rate_limit_writes_per_s, self.rate_limit_write_burst)):
            if rate and burst < 1:
                raise ValueError("a rate limit needs a burst of at least 1")

    @property
    def open_services(self) -> frozenset[str]:
        return frozenset(name.strip() for name in self.unauthenticated_services.split(",") if name.strip())

    @property
    def jwt_enabled(self) -> bool:
        return bool(self.jwks_url or self.jwks_file)

    @property
    def jwt_algorithm_list(self) -> tuple[str, ...]:
        return tuple(a.strip() for a in self.jwt_algorithms.split(",") if a.strip())

    @property
    def tls_enabled(self) -> bool:
        return bool(self.tls_cert)


# Settings that take one of a few words (checked by validate_logging).
_CHOICES = {"log_level": LOG_LEVELS, "log_format": LOG_FORMATS, "access_log": ACCESS_LOG_MODES}

_BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _parse(field: dataclasses.Field, raw: str):
    if field.type is bool:
        try:
            return _BOOLEANS[raw.strip().lower()]
        except KeyError:
            raise ValueError(f"{field.name} must be true, false, 1, 0, yes or no, got {raw!r}") from None
    if field.type is int:
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"{field.name} must be a whole number, got {raw!r}") from None
    if field.type is Path:
        return Path(raw)
    return raw
