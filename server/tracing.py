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

import contextlib
import logging
import os
from collections.abc import Callable

from opentelemetry import trace
from opentelemetry.util.types import Attributes

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
    """A connection pool's `configure` hook: every statement of each new
    connection gets a span (the psycopg instrumentation, with its
    db.statement, never the parameters), a child of the current span.

    Only within a span: the health checks, the sweepers and the pool's own
    statements run outside any call and would otherwise start a trace of
    their own each time."""
    from opentelemetry.instrumentation.psycopg import PsycopgInstrumentor

    within_spans = _ChildSpansOnly(provider)

    def configure(connection) -> None:
        PsycopgInstrumentor.instrument_connection(connection, tracer_provider=within_spans)

    return configure


class _ChildSpansOnly(trace.TracerProvider):
    """Tracers that start a span only when one is current, and otherwise
    return the no-op INVALID_SPAN at the cost of a context lookup."""

    def __init__(self, provider: trace.TracerProvider):
        self._provider = provider

    def get_tracer(self, *args, **kwargs) -> trace.Tracer:
        return _ChildSpansOnlyTracer(self._provider.get_tracer(*args, **kwargs))


class _ChildSpansOnlyTracer(trace.Tracer):
    def __init__(self, tracer: trace.Tracer):
        self._tracer = tracer

    def start_span(self, name: str, context=None, *args, **kwargs) -> trace.Span:
        if not trace.get_current_span(context).get_span_context().is_valid:
            return trace.INVALID_SPAN
        return self._tracer.start_span(name, context, *args, **kwargs)

    @contextlib.contextmanager
    def start_as_current_span(self, name: str, context=None, kind=trace.SpanKind.INTERNAL,
                              attributes: Attributes = None, links=None, start_time=None,
                              record_exception: bool = True, set_status_on_exception: bool = True,
                              end_on_exit: bool = True):
        span = self.start_span(name, context, kind, attributes, links, start_time,
                               record_exception, set_status_on_exception)
        with trace.use_span(span, end_on_exit=end_on_exit, record_exception=record_exception,
                            set_status_on_exception=set_status_on_exception) as current:
            yield current
