"""OpenTelemetry traces: off by default, configured by the standard OTEL_*
variables, which the SDK reads itself.

Tracing is on when OTEL_TRACES_EXPORTER names an exporter ("otlp",
"console"...; a comma-separated list for several), and off when it is unset
or "none" (the SDK's own default is "otlp": ours is off, so that a server
started without any OTEL_* variable exports nothing anywhere) or when
OTEL_SDK_DISABLED is true. Everything else is the SDK's: OTEL_SERVICE_NAME
and OTEL_RESOURCE_ATTRIBUTES (service.name defaults to "orgbilling"),
OTEL_TRACES_SAMPLER, OTEL_EXPORTER_OTLP_ENDPOINT and _PROTOCOL, OTEL_BSP_*,
OTEL_SPAN_LINK_COUNT_LIMIT, OTEL_PROPAGATORS.

The server takes its TracerProvider explicitly (OrgBillingServer's
`tracer_provider`) and never sets the process-global one: several servers
may run in one process, as in the tests, each with its own or none.

What is traced:
- a server span per call (server.interceptors.tracing), continuing the
  caller's W3C `traceparent`;
- a span per database statement (the psycopg instrumentation, on each of
  the pool's connections: `statement_spans`), a child of the current span;
- a span per group-commit batch (server.group_commit), linked both ways to
  the calls it carries.
"""

import logging
import os
from collections.abc import Callable

from opentelemetry import trace

log = logging.getLogger(__name__)

# Our instrumentation scope: the server spans and the group-commit batches.
TRACER_NAME = "orgbilling.server"
DEFAULT_SERVICE_NAME = "orgbilling"


class _FromEnvironment:
    def __repr__(self) -> str:
        return "FROM_ENVIRONMENT"


# OrgBillingServer's default `tracer_provider`: built from the OTEL_* variables.
FROM_ENVIRONMENT = _FromEnvironment()


def tracer_provider_from_environment() -> trace.TracerProvider | None:
    """The TracerProvider the OTEL_* variables ask for, with a batching
    processor per exporter; None when tracing is off (the default)."""
    # Off is decided before the SDK is imported: off costs not even that.
    if (os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() in ("", "none")
            or os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"):
        return None
    from opentelemetry.sdk._configuration import _get_exporter_names, _import_exporters
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    # The SDK's own reading of OTEL_TRACES_EXPORTER ("otlp" resolved by
    # OTEL_EXPORTER_OTLP_PROTOCOL, exporters found by their entry points):
    # private names of the SDK, pinned in pyproject.toml, rather than a copy
    # of its rules here.
    names = _get_exporter_names("traces")
    exporters = _import_exporters(names, [], [])[0]
    resource = Resource.create()
    if resource.attributes.get(SERVICE_NAME, "").startswith("unknown_service"):
        # Neither OTEL_SERVICE_NAME nor OTEL_RESOURCE_ATTRIBUTES named it.
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    # The sampler (OTEL_TRACES_SAMPLER) and span limits are read by the SDK.
    provider = TracerProvider(resource=resource)
    for exporter_class in exporters.values():
        # Batching (OTEL_BSP_*): a call never waits for an export.
        provider.add_span_processor(BatchSpanProcessor(exporter_class()))
    log.info("tracing on: exporting to %s", ", ".join(exporters))
    return provider


def statement_spans(provider: trace.TracerProvider) -> Callable:
    """A connection pool's `configure` hook (of either pool, sync or async):
    every statement of each new connection gets a span (the psycopg instrumentation, with its
    db.statement, never the parameters), a child of the current span.

    Only within a recording span: the health checks, the sweepers and the
    pool's own statements run outside any call and would otherwise start a
    trace of their own each time; and in a call whose trace is not sampled
    the instrumentation would still cost some 25 µs a statement to make a
    span that records nothing."""
    import psycopg
    from opentelemetry.instrumentation.psycopg import PsycopgInstrumentor

    def configure(connection) -> None:
        PsycopgInstrumentor.instrument_connection(connection, tracer_provider=provider)
        # The instrumentation's cursor class, a psycopg.Cursor (AsyncCursor
        # on an async connection: the group commit's) whose execute and
        # executemany make the span.
        traced = connection.cursor_factory
        if isinstance(connection, psycopg.AsyncConnection):
            class WithinRecordingSpans(traced):
                async def execute(self, *args, **kwargs):
                    if trace.get_current_span().is_recording():
                        return await super().execute(*args, **kwargs)
                    return await psycopg.AsyncCursor.execute(self, *args, **kwargs)

                async def executemany(self, *args, **kwargs):
                    if trace.get_current_span().is_recording():
                        return await super().executemany(*args, **kwargs)
                    return await psycopg.AsyncCursor.executemany(self, *args, **kwargs)
        else:
            class WithinRecordingSpans(traced):
                def execute(self, *args, **kwargs):
                    if trace.get_current_span().is_recording():
                        return super().execute(*args, **kwargs)
                    return psycopg.Cursor.execute(self, *args, **kwargs)

                def executemany(self, *args, **kwargs):
                    if trace.get_current_span().is_recording():
                        return super().executemany(*args, **kwargs)
                    return psycopg.Cursor.executemany(self, *args, **kwargs)

        connection.cursor_factory = WithinRecordingSpans

    return configure
