"""Every call is traceable: a sane x-request-id is kept, anything else
replaced by a fresh one; it comes back in the trailing metadata (refusals
included, which send nothing else before their status), is on every log line
of the call, and is stored on the attribution and history rows the call
writes."""

import re
import time

import grpc
import psycopg
import pytest

from orgbilling.v1 import credit_service_pb2 as pb
from orgbilling.v1 import org_billing_service_pb2 as billing_pb
from orgbilling.v1 import types_pb2
from tests.server_process import ServerProcess
from tests.support import Client, new_key

FRESH_ID = re.compile(r"[0-9a-f]{32}")


def returned_request_id(call) -> str:
    values = [value for key, value in call.trailing_metadata() if key == "x-request-id"]
    assert len(values) == 1, call.trailing_metadata()
    if isinstance(call, grpc.RpcError):
        assert not call.initial_metadata(), "a failure must be a trailers-only response"
    return values[0]


def check_with_id(client, request_id=None):
    metadata = () if request_id is None else (("x-request-id", request_id),)
    _, call = client.credits.CheckCredits.with_call(
        pb.CheckCreditsRequest(org_id="acme", user_id="alice", amount_millicredits=1), metadata=metadata)
    return returned_request_id(call)


def test_a_sane_request_id_comes_back_and_others_are_replaced(client):
    client.funded_org("acme", 1_000, {"alice": 100})
    assert check_with_id(client, "req-2026.11/abc:42") == "req-2026.11/abc:42"
    made = [check_with_id(client), check_with_id(client)]
    assert all(FRESH_ID.fullmatch(r) for r in made) and made[0] != made[1]
    for insane in ("has spaces", "x" * 129, "semi;colon", ""):
        replaced = check_with_id(client, insane)
        assert FRESH_ID.fullmatch(replaced), (insane, replaced)


def test_refusals_carry_the_request_id_too(client):
    """Even a call refused before authentication gets its ID back, to quote
    in a support request."""
    anonymous = Client(client.address)
    with pytest.raises(grpc.RpcError) as refused:
        anonymous.credits.CheckCredits(pb.CheckCreditsRequest(), metadata=(("x-request-id", "who-am-i"),))
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert returned_request_id(refused.value) == "who-am-i"
    anonymous.close()

    with pytest.raises(grpc.RpcError) as invalid:
        client.credits.CheckCredits(pb.CheckCreditsRequest(), metadata=(("x-request-id", "bad-body"),))
    assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert returned_request_id(invalid.value) == "bad-body"


def test_request_ids_reach_the_attribution_and_history_rows(client, database_url):
    def with_id(request_id):
        return (("x-request-id", request_id),)

    client.billing.CreateSubscription(billing_pb.CreateSubscriptionRequest(
        org_id="acme", plan=types_pb2.PLAN_PLATFORM, billing_cycle=types_pb2.BILLING_CYCLE_MONTHLY,
        idempotency_key=new_key()), metadata=with_id("rid-subscribe"))
    client.billing.AddCredits(billing_pb.AddCreditsRequest(
        org_id="acme", source=types_pb2.CREDIT_SOURCE_GRANT, amount_millicredits=10_000,
        idempotency_key=new_key()), metadata=with_id("rid-grant"))
    client.billing.AllocateCredits(billing_pb.AllocateCreditsRequest(
        org_id="acme", user_id="alice", limit_millicredits=1_000, reset_period=types_pb2.RESET_PERIOD_NEVER,
        idempotency_key=new_key()), metadata=with_id("rid-allocate"))
    client.credits.DeductCredits(pb.DeductCreditsRequest(
        org_id="acme", user_id="alice", amount_millicredits=5, service_type="llm", service_name="chat",
        idempotency_key=new_key()), metadata=with_id("rid-deduct"))
    client.credits.DeductCreditsBatch(pb.DeductCreditsBatchRequest(deductions=[
        pb.DeductCreditsRequest(org_id="acme", user_id="alice", amount_millicredits=1, service_type="llm",
                                service_name="chat", idempotency_key=new_key()) for _ in range(2)
    ]), metadata=with_id("rid-batch"))

    with psycopg.connect(database_url) as conn:
        history = {event: request_id for event, request_id in conn.execute(
            "SELECT event_type, request_id FROM org_billing_history")}
        attributions = sorted(r for (r,) in conn.execute("SELECT request_id FROM credit_usage_attribution"))
    assert history == {"SUBSCRIPTION_CREATED": "rid-subscribe", "CREDITS_ADDED": "rid-grant",
                       "ALLOCATION_CHANGED": "rid-allocate"}
    assert attributions == ["rid-batch", "rid-batch", "rid-deduct"]


def test_the_request_id_is_on_the_calls_log_lines(database_url):
    server = ServerProcess(database_url).start()
    try:
        client = server.client()
        with pytest.raises(grpc.RpcError):
            client.credits.CheckCredits(pb.CheckCreditsRequest(org_id="nobody", user_id="u",
                                                               amount_millicredits=1),
                                        metadata=(("x-request-id", "trace-me-42"),))
        anonymous = Client(server.address)
        with pytest.raises(grpc.RpcError):
            anonymous.credits.CheckCredits(pb.CheckCreditsRequest(), metadata=(("x-request-id", "anon-7"),))
        client.close()
        anonymous.close()
        deadline = time.monotonic() + 5
        while not ("[trace-me-42]" in server.log() and "[anon-7]" in server.log()):
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.1)
        assert re.search(r"\[trace-me-42\].*CheckCredits failed: NOT_FOUND", server.log())
        assert re.search(r"\[anon-7\].*CheckCredits failed: UNAUTHENTICATED", server.log())
    finally:
        assert server.stop() == 0
