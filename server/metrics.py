"""Prometheus metrics, on a port of their own (settings.metrics_listen; off
when empty).

The gRPC series are the conventional ones (go-grpc-prometheus, and
py-grpc-prometheus after it), so existing dashboards and alerts work:
grpc_server_started_total, grpc_server_handled_total (with grpc_code) and
the grpc_server_handling_seconds histogram, by grpc_type, grpc_service and
grpc_method; plus grpc_server_calls_in_flight. The service's own series
start with orgbilling_.

No label ever takes an org id, a user id, a key or any other value a caller
chooses: methods are the contract's, codes and reasons the server's own,
lanes numbered by the server. So the number of series is bounded whatever
the traffic.

What is a count of events is counted as it happens; what is a state (the
connection pool, the group-commit queues, the database's health) is read
when Prometheus scrapes, so that it costs the request path nothing.
"""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from orgbilling.server.interceptors import Method

# Seconds: 0.5 ms to 10 s, where this service's calls fall.
HANDLING_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                            2.5, 5.0, 10.0)
# Items per group-commit batch: 1 up to the batch size limit's usual range.
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def method_labels(method: Method) -> tuple[str, str, str]:
    """grpc_type, grpc_service and grpc_method, as go-grpc-prometheus names them."""
    if method.request_streaming:
        kind = "bidi_stream" if method.response_streaming else "client_stream"
    else:
        kind = "server_stream" if method.response_streaming else "unary"
    return kind, method.service, method.path.rsplit("/", 1)[1]


class Metrics:
    """Every series of one server, in a registry of its own (several servers
    may run in one process, as in the tests)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        method_labels = ["grpc_type", "grpc_service", "grpc_method"]
        self.started = Counter(
            "grpc_server_started", "RPCs started on the server.", method_labels, registry=self.registry)
        self.handled = Counter(
            "grpc_server_handled", "RPCs completed on the server, whatever their status.",
            [*method_labels, "grpc_code"], registry=self.registry)
        self.handling_seconds = Histogram(
            "grpc_server_handling_seconds", "Time from an RPC's start to its end on the server.",
            method_labels, buckets=HANDLING_SECONDS_BUCKETS, registry=self.registry)
        self.in_flight = Gauge(
            "grpc_server_calls_in_flight", "RPCs started and not yet ended.", method_labels,
            registry=self.registry)
        self.refusals = Counter(
            "orgbilling_refusals", "Calls refused, by gRPC code and the ErrorInfo reason"
            " (admission, rate limits and ledger refusals alike).",
            ["grpc_code", "reason"], registry=self.registry)
        self.deductions = Counter(
            "orgbilling_deductions", "Charges applied (deductions, batch items, committed holds);"
            " replays are not counted again.", registry=self.registry)
        self.charged = Counter(
            "orgbilling_charged_millicredits", "Millicredits charged by those charges.",
            registry=self.registry)
        self.refunds = Counter(
            "orgbilling_refunds", "Refunds applied; replays are not counted again.",
            registry=self.registry)
        self.refunded = Counter(
            "orgbilling_refunded_millicredits", "Millicredits given back by those refunds.",
            registry=self.registry)
        self.batch_size = Histogram(
            "orgbilling_group_commit_batch_size",
            "Items per group-commit transaction (its _count: the transactions).",
            buckets=BATCH_SIZE_BUCKETS, registry=self.registry)

    def charge(self, amount_millicredits: int) -> None:
        self.deductions.inc()
        self.charged.inc(amount_millicredits)

    def refund(self, amount_millicredits: int) -> None:
        self.refunds.inc()
        self.refunded.inc(amount_millicredits)

    def watch(self, *, pools: dict, committer, health) -> None:
        """Reads these at each scrape: the connection pools (psycopg_pool's
        get_stats(), labelled pool="<name>"), the group-commit lanes, the
        database's health."""
        self.registry.register(_StateCollector(pools=pools, committer=committer, health=health))

    def serve(self, address: str):
        """Starts the HTTP endpoint on address (host:port, port 0 for any);
        returns the HTTP server (its server_port, shutdown())."""
        host, _, port = address.rpartition(":")
        server, _thread = start_http_server(int(port), addr=host.strip("[]") or "0.0.0.0",
                                            registry=self.registry)
        return server


class _StateCollector:
    """What is read at scrape time."""

    def __init__(self, *, pools: dict, committer, health):
        self._pools, self._committer, self._health = pools, committer, health

    def collect(self):
        stats = {name: pool.get_stats() for name, pool in self._pools.items()}
        for kind, family in ((GaugeMetricFamily, (
                ("orgbilling_db_pool_size", "pool_size", "Connections open, in use or not."),
                ("orgbilling_db_pool_available", "pool_available", "Connections idle in the pool."),
                ("orgbilling_db_pool_requests_waiting", "requests_waiting",
                 "Requests waiting for a connection now."),
                ("orgbilling_db_pool_max", "pool_max", "The pool's size limit."))),
                (CounterMetricFamily, (
                ("orgbilling_db_pool_requests", "requests_num", "Connections asked of the pool."),
                ("orgbilling_db_pool_requests_queued", "requests_queued",
                 "Requests that had to wait for a connection."),
                ("orgbilling_db_pool_timeouts", "requests_errors",
                 "Requests that timed out waiting for a connection."),
                ("orgbilling_db_pool_connections_lost", "connections_lost",
                 "Connections found broken and replaced.")))):
            for name, key, help_text in family:
                metric = kind(name, help_text, labels=["pool"])
                for pool, pool_stats in stats.items():
                    metric.add_metric([pool], pool_stats.get(key, 0))
                yield metric
        queues = GaugeMetricFamily("orgbilling_group_commit_queue_length",
                                   "Items waiting in each group-commit lane.", labels=["lane"])
        for lane, length in enumerate(self._committer.queue_lengths()):
            queues.add_metric([str(lane)], length)
        yield queues
        yield GaugeMetricFamily("orgbilling_database_up",
                                "1 while the database answers the health checks, else 0.",
                                value=1 if self._health.healthy else 0)
