"""RecordInvoice through a real server: replays, conflicts, statuses arriving
in any order, final statuses, the subscription following the payments,
every bad field, and one event stored when many callers race to record it."""

import threading

import grpc
import psycopg
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from orgbilling.v1 import org_billing_service_pb2 as pb
from orgbilling.v1 import types_pb2 as t
from tests.support import field_violations, new_key, raises_rpc, with_fields

CODE = grpc.StatusCode
CREATED, PAID, FAILED, VOIDED = (t.INVOICE_STATUS_CREATED, t.INVOICE_STATUS_PAID,
                                 t.INVOICE_STATUS_FAILED, t.INVOICE_STATUS_VOIDED)
JANUARY = (1_767_225_600, 1_769_904_000)  # 2026-01-01 and 2026-02-01, UTC


def invoice_request(status=CREATED, invoice="inv-1", org="acme", amount=4_900, currency="USD",
                    period=JANUARY) -> pb.RecordInvoiceRequest:
    return pb.RecordInvoiceRequest(
        org_id=org, external_invoice_id=invoice, status=status, amount_cents=amount,
        currency=currency, period_start_time=Timestamp(seconds=period[0]),
        period_end_time=Timestamp(seconds=period[1]))


def record(client, status=CREATED, **fields) -> pb.RecordInvoiceResponse:
    return client.billing.RecordInvoice(invoice_request(status, **fields))


def subscribe(client, org="acme", trial_days=0):
    return client.billing.CreateSubscription(pb.CreateSubscriptionRequest(
        org_id=org, plan=t.PLAN_PLATFORM, billing_cycle=t.BILLING_CYCLE_MONTHLY,
        trial_days=trial_days, idempotency_key=new_key())).subscription


def events(database_url, org="acme"):
    """The org's invoice events, oldest first, as dicts."""
    with psycopg.connect(database_url) as conn:
        cursor = conn.execute(
            "SELECT event_id::text, event_type, external_invoice_id, amount_paid_cents, currency,"
            " subscription_id::text, request_id, details, created_at FROM org_billing_history"
            " WHERE org_id = %s AND external_invoice_id IS NOT NULL ORDER BY event_id", (org,))
        names = [column.name for column in cursor.description]
        return [dict(zip(names, row)) for row in cursor.fetchall()]


def snapshot(database_url) -> dict:
    """Every row RecordInvoice may write: to show that a call wrote nothing."""
    with psycopg.connect(database_url) as conn:
        return {table: conn.execute(f"SELECT t::text FROM {table} t ORDER BY 1").fetchall()
                for table in ("invoices", "org_billing_history", "organization_subscriptions",
                              "organization_credit_pools", "idempotency_records")}


def subscription_updated_at(database_url, org="acme"):
    with psycopg.connect(database_url) as conn:
        return conn.execute("SELECT updated_at FROM organization_subscriptions WHERE org_id = %s",
                            (org,)).fetchone()[0]


# Recording and replaying.

def test_first_event_records_the_invoice_and_one_history_event(client, database_url):
    subscription = subscribe(client)
    answer = record(client, CREATED)
    invoice = answer.invoice
    assert (invoice.org_id, invoice.external_invoice_id, invoice.status) == ("acme", "inv-1", CREATED)
    assert (invoice.amount_cents, invoice.currency) == (4_900, "USD")
    assert (invoice.period_start_time.seconds, invoice.period_end_time.seconds) == JANUARY
    assert invoice.create_time == invoice.update_time
    assert answer.subscription == subscription and not answer.replayed
    [event] = events(database_url)
    assert event["event_id"] == answer.event_id
    assert (event["event_type"], event["external_invoice_id"]) == ("INVOICE_CREATED", "inv-1")
    assert (event["amount_paid_cents"], event["currency"]) == (4_900, "USD")
    assert event["subscription_id"] == subscription.subscription_id
    assert event["request_id"]
    assert "subscription_status" not in event["details"]


def test_same_event_again_is_replayed_and_changes_nothing(client, database_url):
    subscribe(client)
    first = record(client, FAILED)
    before = snapshot(database_url)
    again = record(client, FAILED)
    assert again.replayed
    assert with_fields(again, {"replayed": False}) == first
    assert snapshot(database_url) == before


def test_replay_after_the_invoice_moved_on_returns_the_first_answer(client, database_url):
    subscribe(client)
    created = record(client, CREATED)
    record(client, PAID)
    before = snapshot(database_url)
    again = record(client, CREATED)
    assert again.replayed and again.invoice.status == CREATED
    assert with_fields(again, {"replayed": False}) == created
    assert snapshot(database_url) == before


@pytest.mark.parametrize("changes, field", [
    ({"amount": 5_000}, "amount_cents"),
    ({"currency": "EUR"}, "currency"),
    ({"period": (JANUARY[0] + 1, JANUARY[1])}, "period_start_time"),
    ({"period": (JANUARY[0], JANUARY[1] + 1)}, "period_end_time"),
])
def test_same_event_with_other_values_is_refused_as_key_reused(client, database_url, changes, field):
    subscribe(client)
    record(client, CREATED)
    before = snapshot(database_url)
    with raises_rpc(CODE.FAILED_PRECONDITION, "IDEMPOTENCY_KEY_REUSED") as refused:
        record(client, CREATED, **changes)
    assert refused["info"].metadata["field"] == field
    assert snapshot(database_url) == before


@pytest.mark.parametrize("changes, field", [
    ({"amount": 0}, "amount_cents"),
    ({"currency": "EUR"}, "currency"),
    ({"period": (JANUARY[0] - 1, JANUARY[1])}, "period_start_time"),
    ({"period": (JANUARY[0], JANUARY[1] - 1)}, "period_end_time"),
])
def test_another_status_with_other_values_is_an_invoice_mismatch(client, database_url, changes, field):
    subscribe(client)
    record(client, CREATED)
    before = snapshot(database_url)
    with raises_rpc(CODE.FAILED_PRECONDITION, "INVOICE_MISMATCH") as refused:
        record(client, PAID, **changes)
    assert refused["info"].metadata["field"] == field
    assert snapshot(database_url) == before


def test_invoices_are_named_per_org_and_id(client, database_url):
    subscribe(client)
    subscribe(client, org="globex")
    record(client, PAID)
    # Another invoice id, or the same id in another org, is another invoice.
    assert record(client, CREATED, invoice="inv-2", amount=1).invoice.status == CREATED
    assert record(client, FAILED, org="globex", currency="EUR").invoice.status == FAILED
    assert [e["event_type"] for e in events(database_url)] == ["INVOICE_PAID", "INVOICE_CREATED"]


# Statuses in any order.

@pytest.mark.parametrize("status", [CREATED, PAID, FAILED, VOIDED])
def test_any_status_may_be_the_first_seen(client, database_url, status):
    subscribe(client)
    assert record(client, status).invoice.status == status
    assert len(events(database_url)) == 1


def test_created_after_failed_is_recorded_but_the_invoice_stays_failed(client, database_url):
    subscribe(client)
    failed = record(client, FAILED).invoice
    late = record(client, CREATED)
    assert not late.replayed
    assert late.invoice == failed  # status and update_time unchanged
    assert [(e["event_type"], e["details"]["invoice_status"]) for e in events(database_url)] == [
        ("INVOICE_PAYMENT_FAILED", "FAILED"), ("INVOICE_CREATED", "FAILED")]


def test_created_then_failed_then_paid(client):
    subscribe(client)
    created = record(client, CREATED).invoice
    failed = record(client, FAILED).invoice
    paid = record(client, PAID).invoice
    assert (created.status, failed.status, paid.status) == (CREATED, FAILED, PAID)
    assert paid.create_time == created.create_time
    assert created.update_time.ToMicroseconds() < failed.update_time.ToMicroseconds() < paid.update_time.ToMicroseconds()


@pytest.mark.parametrize("final", [PAID, VOIDED])
@pytest.mark.parametrize("later", [CREATED, PAID, FAILED, VOIDED])
def test_final_statuses_take_no_other_status(client, database_url, final, later):
    subscribe(client)
    record(client, final)
    before = snapshot(database_url)
    if later == final:
        assert record(client, later).replayed
    else:
        with raises_rpc(CODE.FAILED_PRECONDITION, "INVOICE_FINAL") as refused:
            record(client, later)
        assert refused["info"].metadata["current_status"] == t.InvoiceStatus.Name(final).removeprefix(
            "INVOICE_STATUS_")
    assert snapshot(database_url) == before


# The subscription follows the payments.

def test_failed_payment_makes_the_subscription_past_due_and_payment_makes_it_active(client, database_url):
    subscribe(client)
    record(client, CREATED)
    created_at = subscription_updated_at(database_url)
    failed = record(client, FAILED)
    assert failed.subscription.status == t.SUBSCRIPTION_STATUS_PAST_DUE
    assert client.billing.GetSubscription(pb.GetSubscriptionRequest(org_id="acme")).subscription == failed.subscription
    past_due_at = subscription_updated_at(database_url)
    assert past_due_at > created_at
    # A second invoice failing changes nothing more: the subscription is PAST_DUE already.
    assert record(client, FAILED, invoice="inv-2").subscription.status == t.SUBSCRIPTION_STATUS_PAST_DUE
    assert subscription_updated_at(database_url) == past_due_at
    paid = record(client, PAID)
    assert paid.subscription.status == t.SUBSCRIPTION_STATUS_ACTIVE
    assert subscription_updated_at(database_url) > past_due_at
    moved = [(e["event_type"], e["details"].get("subscription_status")) for e in events(database_url)]
    assert moved == [("INVOICE_CREATED", None), ("INVOICE_PAYMENT_FAILED", "PAST_DUE"),
                     ("INVOICE_PAYMENT_FAILED", None), ("INVOICE_PAID", "ACTIVE")]


def test_paid_invoice_leaves_an_active_subscription_as_it_is(client, database_url):
    subscribe(client)
    before = subscription_updated_at(database_url)
    assert record(client, PAID).subscription.status == t.SUBSCRIPTION_STATUS_ACTIVE
    assert subscription_updated_at(database_url) == before


def test_voided_invoice_leaves_a_past_due_subscription_past_due(client):
    subscribe(client)
    record(client, FAILED)
    assert record(client, VOIDED).subscription.status == t.SUBSCRIPTION_STATUS_PAST_DUE


def test_trialing_subscription_is_not_moved(client, database_url):
    subscribe(client, trial_days=14)
    answer = record(client, FAILED)
    assert answer.subscription.status == t.SUBSCRIPTION_STATUS_TRIALING
    assert "subscription_status" not in events(database_url)[0]["details"]


def test_canceled_subscription_is_not_moved_and_not_returned(client, database_url):
    subscribe(client)
    client.billing.CancelSubscription(pb.CancelSubscriptionRequest(org_id="acme", idempotency_key=new_key()))
    answer = record(client, FAILED)
    assert not answer.HasField("subscription")
    assert events(database_url)[0]["subscription_id"] is None
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT status FROM organization_subscriptions").fetchall() == [("CANCELED",)]


# Refusals before the ledger.

def test_unknown_org_is_not_found_and_nothing_is_written(client, database_url):
    before = snapshot(database_url)
    with raises_rpc(CODE.NOT_FOUND, "ORG_NOT_FOUND"):
        record(client, CREATED, org="ghost")
    assert snapshot(database_url) == before


def _timestamp(seconds=JANUARY[0], nanos=0):
    return Timestamp(seconds=seconds, nanos=nanos)


@pytest.mark.parametrize("changes, bad_field", [
    ({"org_id": ""}, "org_id"),
    ({"org_id": "a b"}, "org_id"),
    ({"org_id": "o" * 129}, "org_id"),
    ({"external_invoice_id": ""}, "external_invoice_id"),
    ({"external_invoice_id": "i" * 129}, "external_invoice_id"),
    ({"external_invoice_id": "inv 1"}, "external_invoice_id"),
    ({"external_invoice_id": "inv-é"}, "external_invoice_id"),
    ({"external_invoice_id": "inv\x00"}, "external_invoice_id"),
    ({"status": t.INVOICE_STATUS_UNSPECIFIED}, "status"),
    ({"status": 99}, "status"),
    ({"amount_cents": -1}, "amount_cents"),
    ({"amount_cents": 10**13 + 1}, "amount_cents"),
    ({"currency": ""}, "currency"),
    ({"currency": "usd"}, "currency"),
    ({"currency": "USDX"}, "currency"),
    ({"currency": "US"}, "currency"),
    ({"currency": "USD\n"}, "currency"),
    ({"period_start_time": _timestamp(nanos=1)}, "period_start_time"),
    ({"period_start_time": _timestamp(seconds=-62_135_596_801)}, "period_start_time"),
    ({"period_end_time": _timestamp(seconds=253_402_300_800)}, "period_end_time"),
    ({"period_end_time": _timestamp(nanos=10**9)}, "period_end_time"),
    ({"period_end_time": _timestamp(nanos=-1000)}, "period_end_time"),
    ({"period_end_time": _timestamp(seconds=JANUARY[0])}, "period_end_time"),
    ({"period_end_time": _timestamp(seconds=JANUARY[0] - 1)}, "period_end_time"),
])
def test_record_invoice_rejects_bad_fields(client, database_url, changes, bad_field):
    subscribe(client)
    request = invoice_request()
    for name, value in changes.items():
        if isinstance(value, Timestamp):
            getattr(request, name).CopyFrom(value)
        else:
            setattr(request, name, value)
    before = snapshot(database_url)
    with raises_rpc(CODE.INVALID_ARGUMENT) as refused:
        client.billing.RecordInvoice(request)
    assert field_violations(refused["error"]) == {bad_field}
    assert snapshot(database_url) == before


@pytest.mark.parametrize("field", ["period_start_time", "period_end_time"])
def test_record_invoice_requires_both_period_times(client, field):
    request = invoice_request()
    request.ClearField(field)
    with raises_rpc(CODE.INVALID_ARGUMENT) as refused:
        client.billing.RecordInvoice(request)
    assert field_violations(refused["error"]) == {field}


def test_record_invoice_accepts_the_extremes(client):
    subscribe(client)
    answer = record(client, CREATED, amount=10**13, currency="JPY",
                    period=(-62_135_596_800, 253_402_300_799))
    assert answer.invoice.amount_cents == 10**13
    assert answer.invoice.period_start_time.seconds == -62_135_596_800
    assert answer.invoice.period_end_time.seconds == 253_402_300_799
    assert record(client, CREATED, invoice="free", amount=0).invoice.amount_cents == 0


# Concurrency and consistency.

def test_concurrent_recordings_of_one_event_store_it_once(client, database_url):
    """Callers on real threads race through the real server: one records the
    event, every other gets its answer as a replay."""
    subscribe(client)
    callers = 8
    start = threading.Barrier(callers)
    answers, failures = [], []

    def call():
        start.wait()
        try:
            answers.append(record(client, FAILED))
        except grpc.RpcError as error:  # kept, to be shown by the assertion below
            failures.append(error)

    threads = [threading.Thread(target=call) for _ in range(callers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert failures == [] and len(answers) == callers
    assert sorted(answer.replayed for answer in answers) == [False] + [True] * (callers - 1)
    first = next(answer for answer in answers if not answer.replayed)
    assert all(with_fields(answer, {"replayed": False}) == first for answer in answers)
    assert [e["event_id"] for e in events(database_url)] == [first.event_id]
    assert first.subscription.status == t.SUBSCRIPTION_STATUS_PAST_DUE


def test_history_events_and_invoices_agree(client, database_url):
    """After a mix of events, in and out of order, replays and refusals: every
    invoice's events carry its amount and currency, the first of them was
    written with the invoice row, and each status was recorded once."""
    subscribe(client)
    sequence = [("a", CREATED), ("a", FAILED), ("a", PAID), ("b", PAID), ("b", CREATED),
                ("c", FAILED), ("c", CREATED), ("c", FAILED), ("d", VOIDED), ("a", FAILED)]
    for number, (invoice, status) in enumerate(sequence):
        try:
            record(client, status, invoice=invoice, amount=100 * (ord(invoice) - 96),
                   currency="EUR" if invoice == "d" else "USD")
        except grpc.RpcError as error:
            assert error.code() == CODE.FAILED_PRECONDITION, (number, error)
    with psycopg.connect(database_url) as conn:
        invoices = {row[0]: row[1:] for row in conn.execute(
            "SELECT external_invoice_id, status, amount_cents, currency, created_at FROM invoices"
            " WHERE org_id = 'acme'")}
    assert {key: value[0] for key, value in invoices.items()} == {
        "a": "PAID", "b": "PAID", "c": "FAILED", "d": "VOIDED"}
    recorded = events(database_url)
    assert sorted((e["external_invoice_id"], e["event_type"]) for e in recorded) == sorted([
        ("a", "INVOICE_CREATED"), ("a", "INVOICE_PAYMENT_FAILED"), ("a", "INVOICE_PAID"),
        ("b", "INVOICE_PAID"), ("c", "INVOICE_PAYMENT_FAILED"), ("c", "INVOICE_CREATED"),
        ("d", "INVOICE_VOIDED")])
    for event in recorded:
        _, amount, currency, _ = invoices[event["external_invoice_id"]]
        assert (event["amount_paid_cents"], event["currency"]) == (amount, currency)
    for invoice, (_, _, _, created_at) in invoices.items():
        first = min(e["created_at"] for e in recorded if e["external_invoice_id"] == invoice)
        assert first == created_at
