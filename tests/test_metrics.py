"""Prometheus metrics (server/metrics.py): a real scrape of the server's
/metrics endpoint, parsed with prometheus_client's own parser, after real
calls through the real server and database."""

import concurrent.futures
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from orgbilling.v1 import credit_service_pb2 as pb
from tests.support import Client, new_key, raises_rpc

CODE = grpc.StatusCode
DEDUCT = ("unary", "orgbilling.v1.CreditService", "DeductCredits")


@pytest.fixture
def metered(start_server, database_url, token):
    server = start_server(database_url, metrics_listen="127.0.0.1:0")
    client = Client(f"127.0.0.1:{server.port}", token=token)
    yield server, client
    client.close()


def scrape(server) -> dict[tuple, float]:
    """Every sample: (name, labels as sorted pairs) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as answer:
        assert answer.status == 200
        text = answer.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples, name, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def method_labels(kind, service, method, **more):
    return {"grpc_type": kind, "grpc_service": service, "grpc_method": method, **more}


def deduct(client, amount, org="acme", user="alice", key=None):
    return client.credits.DeductCredits(pb.DeductCreditsRequest(
        org_id=org, user_id=user, amount_millicredits=amount, service_type="llm",
        service_name="chat", idempotency_key=key or new_key()))


def test_calls_are_counted_and_timed_by_method_and_code(metered, token):
    server, client = metered
    client.funded_org("acme", 10_000, {"alice": 1_000})
    for _ in range(3):
        deduct(client, 100)
    with raises_rpc(CODE.FAILED_PRECONDITION, "INSUFFICIENT_CREDITS"):
        deduct(client, 5_000)
    anonymous = Client(f"127.0.0.1:{server.port}", token=None)
    try:
        with raises_rpc(CODE.UNAUTHENTICATED):
            deduct(anonymous, 1)
    finally:
        anonymous.close()
    samples = scrape(server)
    labels = method_labels(*DEDUCT)
    assert value(samples, "grpc_server_started_total", **labels) == 5
    assert value(samples, "grpc_server_handled_total", **labels, grpc_code="OK") == 3
    assert value(samples, "grpc_server_handled_total", **labels, grpc_code="FAILED_PRECONDITION") == 1
    assert value(samples, "grpc_server_handled_total", **labels, grpc_code="UNAUTHENTICATED") == 1
    assert value(samples, "grpc_server_handling_seconds_count", **labels) == 5
    assert 0 < value(samples, "grpc_server_handling_seconds_sum", **labels) < 60
    assert value(samples, "grpc_server_calls_in_flight", **labels) == 0
    # Refusals by reason, the ledger's and the interceptors' alike.
    assert value(samples, "orgbilling_refusals_total", grpc_code="FAILED_PRECONDITION",
                 reason="INSUFFICIENT_CREDITS") == 1
    assert sum(v for (name, labels_), v in samples.items()
               if name == "orgbilling_refusals_total" and ("grpc_code", "UNAUTHENTICATED") in labels_) == 1


def test_charges_and_refunds_are_counted_once_whatever_the_retries(metered):
    server, client = metered
    client.funded_org("acme", 10_000, {"alice": 5_000})
    first = deduct(client, 300, key="k1")
    deduct(client, 300, key="k1")  # a replay: no new charge
    client.credits.DeductCreditsBatch(pb.DeductCreditsBatchRequest(deductions=[
        pb.DeductCreditsRequest(org_id="acme", user_id="alice", amount_millicredits=amount,
                                service_type="llm", service_name="b", idempotency_key=new_key())
        for amount in (10, 20, 10**9)]))  # the last one refused
    hold = client.credits.ReserveCredits(pb.ReserveCreditsRequest(
        org_id="acme", user_id="alice", amount_millicredits=500, service_type="llm",
        service_name="chat", idempotency_key=new_key()))
    client.credits.CommitReservation(pb.CommitReservationRequest(
        org_id="acme", reservation_id=hold.reservation_id, amount_millicredits=400,
        idempotency_key=new_key()))
    refund = pb.RefundCreditsRequest(org_id="acme", deduction_id=first.deduction_id,
                                     amount_millicredits=100, reason="test", idempotency_key="r1")
    client.credits.RefundCredits(refund)
    client.credits.RefundCredits(refund)  # a replay
    samples = scrape(server)
    assert value(samples, "orgbilling_deductions_total") == 4
    assert value(samples, "orgbilling_charged_millicredits_total") == 300 + 10 + 20 + 400
    assert value(samples, "orgbilling_refunds_total") == 1
    assert value(samples, "orgbilling_refunded_millicredits_total") == 100


def test_group_commit_pool_and_database_state_are_read_at_scrape(metered, database_url):
    server, client = metered
    client.funded_org("acme", 10**9, {"alice": 10**9})
    with concurrent.futures.ThreadPoolExecutor(16) as threads:
        list(threads.map(lambda _: deduct(client, 1), range(200)))
    samples = scrape(server)
    batches = value(samples, "orgbilling_group_commit_batch_size_count")
    assert 0 < batches <= 200
    assert value(samples, "orgbilling_group_commit_batch_size_sum") == 200
    lanes = [dict(labels)["lane"] for (name, labels) in samples if name == "orgbilling_group_commit_queue_length"]
    assert sorted(lanes, key=int) == [str(n) for n in range(server.settings.group_commit_lanes)]
    # The server's pool and the group commit's, each by name.
    assert value(samples, "orgbilling_db_pool_max", pool="calls") == server.settings.pool_size_max
    assert 1 <= value(samples, "orgbilling_db_pool_size", pool="calls") <= server.settings.pool_size_max
    lanes_size = server.settings.lane_pool_size
    assert value(samples, "orgbilling_db_pool_max", pool="lanes") == lanes_size
    assert 1 <= value(samples, "orgbilling_db_pool_size", pool="lanes") <= lanes_size
    # Each batch asked the lanes' pool for a connection.
    assert value(samples, "orgbilling_db_pool_requests_total", pool="lanes") >= batches
    assert value(samples, "orgbilling_database_up") == 1


def test_no_label_takes_a_callers_value_so_series_stay_bounded(metered):
    """Calls over many orgs, users and keys add no series: every label value
    is the server's own (methods, codes, reasons, lane numbers, pool names)."""
    server, client = metered
    client.funded_org("org-0", 10**6, {"user-0": 10**6})
    deduct(client, 1, org="org-0", user="user-0")
    with raises_rpc(CODE.NOT_FOUND):
        deduct(client, 1, org="org-x-0", user="user-x-0")
    before = set(scrape(server))
    chosen = []
    for n in range(1, 40):
        org, user, key = f"org-{n}", f"user-{n}", f"key-{n}"
        client.funded_org(org, 10**6, {user: 10**6})
        deduct(client, 1, org=org, user=user, key=key)
        with raises_rpc(CODE.NOT_FOUND):
            deduct(client, 1, org=f"org-x-{n}", user=f"user-x-{n}")
        chosen += [org, user, key, f"org-x-{n}", f"user-x-{n}"]
    after = set(scrape(server))
    assert after == before
    label_values = {v for (_, labels) in after for _, v in labels}
    assert not label_values & set(chosen)


def test_metrics_are_off_by_default(server):
    assert server.metrics is None and server.metrics_port is None
