"""Reservations (holds): an amount held against an allocation and its pool,
ended exactly once by a commit (charging the actual amount, one attribution
row), a release, or its expiry, which counts from its expires_at whether or
not the sweeper has run. Through the real server and database."""

import concurrent.futures
import random
import threading
import uuid

import grpc
import psycopg
import pytest
from google.protobuf.duration_pb2 import Duration

from orgbilling.v1 import credit_service_pb2 as pb
from orgbilling.v1 import org_billing_service_pb2 as billing_pb
from orgbilling.v1 import types_pb2 as t
from orgbilling.server.store import RESERVATION_SWEEP_LOCK_KEY
from orgbilling.server.sweeper import ReservationSweeper
from orgbilling.server.verify import violations
from tests.support import api_key, field_violations, new_key, raises_rpc


def reserve(client, amount=300, user="alice", org="acme", key=None, ttl_s=None, **extra):
    request = pb.ReserveCreditsRequest(
        org_id=org, user_id=user, amount_millicredits=amount, service_type="llm",
        service_name="chat", idempotency_key=key or new_key(), **extra)
    if ttl_s is not None:
        request.ttl.FromMilliseconds(int(ttl_s * 1000))
    return client.credits.ReserveCredits(request)


def commit(client, reservation_id, amount, org="acme", key=None, **extra):
    return client.credits.CommitReservation(pb.CommitReservationRequest(
        org_id=org, reservation_id=reservation_id, amount_millicredits=amount,
        idempotency_key=key or new_key(), **extra))


def release(client, reservation_id, org="acme", key=None):
    return client.credits.ReleaseReservation(pb.ReleaseReservationRequest(
        org_id=org, reservation_id=reservation_id, idempotency_key=key or new_key()))


def get(client, reservation_id, org="acme"):
    return client.credits.GetReservation(
        pb.GetReservationRequest(org_id=org, reservation_id=reservation_id)).reservation


def refund(client, deduction_id, amount, org="acme"):
    return client.credits.RefundCredits(pb.RefundCreditsRequest(
        org_id=org, deduction_id=deduction_id, amount_millicredits=amount, reason="test",
        idempotency_key=new_key()))


def deduct(client, amount, user="alice", org="acme", key=None):
    return client.credits.DeductCredits(pb.DeductCreditsRequest(
        org_id=org, user_id=user, amount_millicredits=amount, service_type="llm",
        service_name="chat", idempotency_key=key or new_key()))


def check(client, amount=1, user="alice", org="acme"):
    return client.credits.CheckCredits(pb.CheckCreditsRequest(
        org_id=org, user_id=user, amount_millicredits=amount))


def balances(database_url, org="acme", user="alice"):
    """(allocation used, allocation reserved, pool used, pool reserved) as stored."""
    with psycopg.connect(database_url) as conn:
        return conn.execute(
            """SELECT a.used_millicredits, a.reserved_millicredits, p.used_millicredits,
                      p.reserved_millicredits
                 FROM user_credit_allocations a JOIN organization_credit_pools p USING (org_id)
                WHERE a.org_id = %s AND a.user_id = %s""", (org, user)).fetchone()


def set_expiry(database_url, reservation_id, offset: str):
    """Moves a hold's expiry to the database's now() plus offset (an interval)."""
    with psycopg.connect(database_url) as conn:
        conn.execute("UPDATE credit_reservations SET expires_at = now() + %(offset)s::interval,"
                     " created_at = least(created_at, now() + %(offset)s::interval - interval '1 microsecond')"
                     " WHERE reservation_id = %(id)s", {"offset": offset, "id": reservation_id})


# Happy paths.

def test_reserve_holds_then_commit_charges_the_actual_amount_and_releases_the_rest(client, database_url):
    client.funded_org("acme", 10_000, {"alice": 1_000})
    held = reserve(client, 300, metadata={"model": "small"})
    assert uuid.UUID(held.reservation_id).version == 7
    assert (held.allocation_remaining_millicredits, held.pool_spendable_millicredits) == (700, 9_700)
    assert check(client).allocation_remaining_millicredits == 700
    assert balances(database_url) == (0, 300, 0, 300)
    shown = get(client, held.reservation_id)
    assert shown.state == t.RESERVATION_STATE_OPEN and shown.amount_millicredits == 300
    assert shown.expire_time == held.expire_time and shown.metadata == {"model": "small"}

    charged = commit(client, held.reservation_id, 120, metadata={"tokens": "1200"})
    assert (charged.allocation_remaining_millicredits, charged.pool_spendable_millicredits) == (880, 9_880)
    assert balances(database_url) == (120, 0, 120, 0)
    shown = get(client, held.reservation_id)
    assert shown.state == t.RESERVATION_STATE_COMMITTED
    assert shown.committed_millicredits == 120 and shown.deduction_id == charged.deduction_id
    assert shown.HasField("resolve_time")
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT amount_millicredits, reservation_id::text, metadata, service_name"
                           " FROM credit_usage_attribution").fetchall()
        summary = conn.execute("SELECT used_millicredits, request_count FROM usage_daily").fetchall()
    assert row == [(120, held.reservation_id, {"model": "small", "tokens": "1200"}, "chat")]
    assert summary == [(120, 1)]
    assert violations(database_url) == {}


def test_release_gives_the_hold_back_and_charges_nothing(client, database_url):
    client.funded_org("acme", 10_000, {"alice": 1_000})
    held = reserve(client, 400)
    released = release(client, held.reservation_id)
    assert (released.allocation_remaining_millicredits, released.pool_spendable_millicredits) == (1_000, 10_000)
    assert get(client, held.reservation_id).state == t.RESERVATION_STATE_RELEASED
    assert balances(database_url) == (0, 0, 0, 0)
    assert violations(database_url) == {}


def test_a_hold_is_refused_exactly_as_a_deduction_would_be(client, database_url):
    client.funded_org("acme", 10_000, {"alice": 1_000})
    reserve(client, 800)
    with raises_rpc(grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_CREDITS") as refused:
        reserve(client, 201)
    assert refused["info"].metadata["available_millicredits"] == "200"
    assert refused["info"].metadata["requested_millicredits"] == "201"
    with raises_rpc(grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_CREDITS"):
        deduct(client, 201)  # the hold is spent for everyone else too
    deduct(client, 200)
    with raises_rpc(grpc.StatusCode.FAILED_PRECONDITION, "ALLOCATION_NOT_FOUND"):
        reserve(client, 1, user="nobody")
    with raises_rpc(grpc.StatusCode.NOT_FOUND, "ORG_NOT_FOUND"):
        reserve(client, 1, org="ghost")
    assert violations(database_url) == {}


def test_committing_more_than_held_charges_only_what_the_balances_allow(client, database_url):
    client.funded_org("acme", 10_000, {"alice": 1_000})
    held = reserve(client, 300)
    deduct(client, 500)  # 200 left free beside the hold
    with raises_rpc(grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_CREDITS") as refused:
        commit(client, held.reservation_id, 501)
    assert refused["info"].metadata["available_millicredits"] == "500"
    assert refused["info"].metadata["held_millicredits"] == "300"
    # The hold is kept, so the caller can decide.
    assert get(client, held.reservation_id).state == t.RESERVATION_STATE_OPEN
    assert balances(database_url) == (500, 300, 500, 300)
    charged = commit(client, held.reservation_id, 500)
    assert charged.allocation_remaining_millicredits == 0
    assert balances(database_url) == (1_000, 0, 1_000, 0)
    assert violations(database_url) == {}


def test_a_reservation_resolves_once_and_says_how_it_ended(client, database_url):
    client.funded_org("acme", 10_000, {"alice": 1_000})
    committed, released, expired = reserve(client, 100), reserve(client, 100), reserve(client, 100)
    commit(client, committed.reservation_id, 50)
    release(client, released.reservation_id)
    set_expiry(database_url, expired.reservation_id, "-1 microsecond")
    for held, state in ((committed, "COMMITTED"), (released, "RELEASED"), (expired, "EXPIRED")):
        with raises_rpc(grpc.StatusCode.FAILED_PRECONDITION, "RESERVATION_NOT_OPEN") as refused:
            commit(client, held.reservation_id, 10)
        assert refused["info"].metadata["state"] == state
        with raises_rpc(grpc.StatusCode.FAILED_PRECONDITION, "RESERVATION_NOT_OPEN") as refused:
            release(client, held.reservation_id)
        assert refused["info"].metadata["state"] == state
    assert balances(database_url) == (50, 0, 50, 0)
    assert violations(database_url) == {}


# Keys.

def test_retries_with_the_same_key_return_the_original_result(client, database_url):
    client.funded_org("acme", 10_000, {"alice": 1_000})
    first = reserve(client, 300, key="hold-1")
    again = reserve(client, 300, key="hold-1")
    assert again.replayed and not first.replayed
    assert (again.reservation_id, again.expire_time) == (first.reservation_id, first.expire_time)
    assert again.allocation_remaining_millicredits == 700

    charged = commit(client, first.reservation_id, 100, key="commit-1")
    replay = commit(client, first.reservation_id, 100, key="commit-1")
    assert replay.replayed and replay.deduction_id == charged.deduction_id
    assert replay.allocation_remaining_millicredits == charged.allocation_remaining_millicredits

    other = reserve(client, 200)
    assert not release(client, other.reservation_id, key="release-1").replayed
    assert release(client, other.reservation_id, key="release-1").replayed
    # A refusal replays too: the same answer under the same key.
    with raises_rpc(grpc.StatusCode.FAILED_PRECONDITION, "RESERVATION_NOT_OPEN"):
        commit(client, other.reservation_id, 10, key="late")
    with raises_rpc(grpc.StatusCode.FAILED_PRECONDITION, "RESERVATION_NOT_OPEN"):
        commit(client, other.reservation_id, 10, key="late")
    assert balances(database_url) == (100, 0, 100, 0)
    assert violations(database_url) == {}


def test_a_key_reused_for_another_request_is_refused_across_the_deductions_family(client, database_url):
    client.funded_org("acme", 10_000, {"alice": 1_000, "bob": 1_000})
    held = reserve(client, 300, key="k-hold")
    for attempt in (lambda: reserve(client, 301, key="k-hold"),
                    lambda: reserve(client, 300, user="bob", key="k-hold"),
                    lambda: deduct(client, 300, key="k-hold"),
                    lambda: commit(client, held.reservation_id, 10, key="k-hold"),
                    lambda: release(client, held.reservation_id, key="k-hold")):
        with raises_rpc(grpc.StatusCode.FAILED_PRECONDITION, "IDEMPOTENCY_KEY_REUSED"):
            attempt()
    deduct(client, 10, key="k-deduct")
    with raises_rpc(grpc.StatusCode.FAILED_PRECONDITION, "IDEMPOTENCY_KEY_REUSED"):
        reserve(client, 10, key="k-deduct")
    with raises_rpc(grpc.StatusCode.FAILED_PRECONDITION, "IDEMPOTENCY_KEY_REUSED"):
        commit(client, held.reservation_id, 10, key="k-deduct")
    commit(client, held.reservation_id, 10, key="k-commit")
    with raises_rpc(grpc.StatusCode.FAILED_PRECONDITION, "IDEMPOTENCY_KEY_REUSED"):
        commit(client, held.reservation_id, 11, key="k-commit")
    with raises_rpc(grpc.StatusCode.FAILED_PRECONDITION, "IDEMPOTENCY_KEY_REUSED"):
        deduct(client, 10, key="k-commit")
    assert balances(database_url) == (20, 0, 20, 0)
    assert violations(database_url) == {}


# Organizations and inputs.

def test_another_orgs_reservation_is_not_found(client, database_url, server):
    client.funded_org("acme", 10_000, {"alice": 1_000})
    client.funded_org("globex", 10_000, {"alice": 1_000})
    held = reserve(client, 300, org="acme")
    for attempt in (lambda: get(client, held.reservation_id, org="globex"),
                    lambda: commit(client, held.reservation_id, 100, org="globex"),
                    lambda: release(client, held.reservation_id, org="globex"),
                    lambda: get(client, str(uuid.uuid4()))):
        with raises_rpc(grpc.StatusCode.NOT_FOUND, "RESERVATION_NOT_FOUND"):
            attempt()
    listed = client.credits.ListReservations(pb.ListReservationsRequest(org_id="globex"))
    assert list(listed.reservations) == []
    # A caller limited to globex cannot even name acme.
    from tests.support import Client
    globex_only = Client(client.address, token=api_key(database_url, ["credits.read", "credits.deduct"],
                                                       org_ids=["globex"]))
    try:
        with raises_rpc(grpc.StatusCode.PERMISSION_DENIED, "ORG_NOT_PERMITTED"):
            get(globex_only, held.reservation_id, org="acme")
        with raises_rpc(grpc.StatusCode.NOT_FOUND, "RESERVATION_NOT_FOUND"):
            commit(globex_only, held.reservation_id, 100, org="globex")
    finally:
        globex_only.close()
    assert get(client, held.reservation_id).state == t.RESERVATION_STATE_OPEN
    assert balances(database_url) == (0, 300, 0, 300)


def test_bad_inputs_are_refused_field_by_field_and_change_nothing(client, database_url, server):
    client.funded_org("acme", 10_000, {"alice": 1_000})
    bad_reserve = pb.ReserveCreditsRequest(org_id="a b", user_id="", amount_millicredits=0,
                                           service_type="LLM", service_name="", idempotency_key="",
                                           metadata={"": "x"})
    bad_reserve.ttl.FromMilliseconds(999)
    with raises_rpc(grpc.StatusCode.INVALID_ARGUMENT) as refused:
        client.credits.ReserveCredits(bad_reserve)
    assert {"org_id", "user_id", "amount_millicredits", "ttl", "service_type", "service_name",
            "idempotency_key"} <= field_violations(refused["error"])
    for ttl in (Duration(seconds=86_401), Duration(seconds=-5), Duration(seconds=1, nanos=-1),
                Duration(seconds=2, nanos=1_000_000_000)):
        with raises_rpc(grpc.StatusCode.INVALID_ARGUMENT) as refused:
            client.credits.ReserveCredits(pb.ReserveCreditsRequest(
                org_id="acme", user_id="alice", amount_millicredits=1, ttl=ttl, service_type="llm",
                service_name="chat", idempotency_key=new_key()))
        assert field_violations(refused["error"]) == {"ttl"}
    with raises_rpc(grpc.StatusCode.INVALID_ARGUMENT) as refused:
        reserve(client, 10**15 + 1)
    assert field_violations(refused["error"]) == {"amount_millicredits"}
    for bad_id in ("", "not-a-uuid", str(uuid.uuid4()) + "0", "{" + str(uuid.uuid4()) + "}"):
        with raises_rpc(grpc.StatusCode.INVALID_ARGUMENT) as refused:
            commit(client, bad_id, 1)
        assert field_violations(refused["error"]) == {"reservation_id"}
        with raises_rpc(grpc.StatusCode.INVALID_ARGUMENT) as refused:
            release(client, bad_id)
        assert field_violations(refused["error"]) == {"reservation_id"}
        with raises_rpc(grpc.StatusCode.INVALID_ARGUMENT):
            get(client, bad_id)
    held = reserve(client, 100)
    with raises_rpc(grpc.StatusCode.INVALID_ARGUMENT) as refused:
        commit(client, held.reservation_id, 0, key="bad key")
    assert field_violations(refused["error"]) == {"amount_millicredits", "idempotency_key"}
    with raises_rpc(grpc.StatusCode.INVALID_ARGUMENT) as refused:
        client.credits.ListReservations(pb.ListReservationsRequest(
            org_id="acme", state=99, page_size=-1, page_token="nope"))
    assert field_violations(refused["error"]) == {"state", "page_size", "page_token"}
    assert balances(database_url) == (0, 100, 0, 100)


def test_the_ttl_defaults_from_the_settings_and_bounds_the_expiry(client, database_url, server):
    client.funded_org("acme", 10_000, {"alice": 1_000})
    default = reserve(client, 1)
    shown = get(client, default.reservation_id)
    lasted_ms = (shown.expire_time.ToMicroseconds() - shown.create_time.ToMicroseconds()) / 1000
    assert lasted_ms == server.settings.reservation_ttl_default_ms
    short = reserve(client, 1, ttl_s=1)
    shown = get(client, short.reservation_id)
    assert shown.expire_time.ToMicroseconds() - shown.create_time.ToMicroseconds() == 1_000_000


def test_list_pages_newest_first_and_filters_by_state_as_of_now(client, database_url):
    client.funded_org("acme", 10_000, {"alice": 1_000})
    holds = [reserve(client, 10).reservation_id for _ in range(7)]
    commit(client, holds[0], 5)
    release(client, holds[1])
    set_expiry(database_url, holds[2], "-1 microsecond")  # expired, not swept

    seen, token = [], ""
    while True:
        page = client.credits.ListReservations(pb.ListReservationsRequest(
            org_id="acme", page_size=3, page_token=token))
        seen += [r.reservation_id for r in page.reservations]
        token = page.next_page_token
        if not token:
            break
    assert seen == holds[::-1]

    def states(state):
        return [r.reservation_id for r in client.credits.ListReservations(
            pb.ListReservationsRequest(org_id="acme", state=state)).reservations]

    assert states(t.RESERVATION_STATE_OPEN) == holds[3:][::-1]
    assert states(t.RESERVATION_STATE_COMMITTED) == [holds[0]]
    assert states(t.RESERVATION_STATE_RELEASED) == [holds[1]]
    assert states(t.RESERVATION_STATE_EXPIRED) == [holds[2]]
    # A token is for its own filter only.
    first = client.credits.ListReservations(pb.ListReservationsRequest(org_id="acme", page_size=1))
    with raises_rpc(grpc.StatusCode.INVALID_ARGUMENT):
        client.credits.ListReservations(pb.ListReservationsRequest(
            org_id="acme", state=t.RESERVATION_STATE_OPEN, page_token=first.next_page_token))


# Expiry.

def test_expiry_is_exact_for_checks_deductions_holds_and_reads(client, database_url):
    """A hold a microsecond past its expiry counts for nothing in every
    check and charge, before any sweeper ran; one a second before, fully."""
    client.funded_org("acme", 10_000, {"alice": 1_000, "bob": 1_000})
    alive = reserve(client, 600).reservation_id
    set_expiry(database_url, alive, "1 second")
    assert check(client).allocation_remaining_millicredits == 400
    with raises_rpc(grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_CREDITS"):
        deduct(client, 401)
    assert get(client, alive).state == t.RESERVATION_STATE_OPEN

    set_expiry(database_url, alive, "-1 microsecond")
    # Reads show it expired, and nothing was written yet.
    assert check(client).allocation_remaining_millicredits == 1_000
    assert check(client).pool_spendable_millicredits == 10_000
    shown = get(client, alive)
    assert shown.state == t.RESERVATION_STATE_EXPIRED and shown.resolve_time == shown.expire_time
    assert balances(database_url) == (0, 600, 0, 600)
    pool = client.billing.GetCreditPool(billing_pb.GetCreditPoolRequest(org_id="acme")).pool
    assert (pool.reserved_millicredits, pool.spendable_millicredits) == (0, 10_000)
    allocations = client.billing.ListAllocations(billing_pb.ListAllocationsRequest(org_id="acme"))
    assert [a.reserved_millicredits for a in allocations.allocations] == [0, 0]
    # A charge by another user of the org persists it first: pool and allocation.
    deduct(client, 1_000, user="bob")
    assert balances(database_url) == (0, 0, 1_000, 0)
    assert balances(database_url, user="bob")[:2] == (1_000, 0)
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT state, resolved_at = expires_at FROM credit_reservations").fetchone() \
            == ("EXPIRED", True)
    assert violations(database_url) == {}


@pytest.mark.parametrize("charge", ["deduct", "batch", "reserve", "commit"])
def test_every_charge_counts_an_expired_hold_as_released(client, database_url, charge):
    client.funded_org("acme", 10_000, {"alice": 1_000})
    other = reserve(client, 100).reservation_id
    expired = reserve(client, 900).reservation_id
    set_expiry(database_url, expired, "-1 microsecond")
    if charge == "deduct":
        deduct(client, 900)
    elif charge == "batch":
        results = client.credits.DeductCreditsBatch(pb.DeductCreditsBatchRequest(deductions=[
            pb.DeductCreditsRequest(org_id="acme", user_id="alice", amount_millicredits=450,
                                    service_type="llm", service_name="b", idempotency_key=new_key())
            for _ in range(2)], all_or_nothing=True)).results
        assert results[1].deduction.allocation_remaining_millicredits == 0
    elif charge == "reserve":
        reserve(client, 900)
    else:
        commit(client, other, 1_000)  # 900 beyond its hold, free once the other expired
    assert violations(database_url) == {}
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT state FROM credit_reservations WHERE reservation_id = %s",
                            (expired,)).fetchone() == ("EXPIRED",)


def test_the_sweeper_persists_expiries_in_batches_one_replica_at_a_time(client, database_url, server):
    client.funded_org("acme", 10_000, {"alice": 1_000})
    client.funded_org("globex", 10_000, {"bob": 1_000})
    holds = [reserve(client, 10).reservation_id for _ in range(5)]
    kept = reserve(client, 10, org="globex", user="bob").reservation_id
    gone = reserve(client, 10, org="globex", user="bob").reservation_id
    for held in holds + [gone]:
        set_expiry(database_url, held, "-1 second")
    sweeper = ReservationSweeper(server.store, interval_ms=60_000, batch_size_max=100)
    # Another replica sweeping: this one does nothing.
    with psycopg.connect(database_url) as conn:
        conn.execute("BEGIN")
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (RESERVATION_SWEEP_LOCK_KEY,))
        assert sweeper.sweep_once() == 0
        conn.execute("ROLLBACK")
    assert sweeper.sweep_once() == 6
    assert sweeper.sweep_once() == 0
    assert balances(database_url) == (0, 0, 0, 0)
    assert balances(database_url, org="globex", user="bob") == (0, 10, 0, 10)
    assert get(client, kept, org="globex").state == t.RESERVATION_STATE_OPEN
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM credit_reservations WHERE state = 'EXPIRED'"
                            " AND resolved_at = expires_at").fetchone()[0] == 6
    assert violations(database_url) == {}


def test_the_running_sweeper_persists_expiries(start_server, database_url, token):
    from tests.support import Client
    running = start_server(database_url, reservation_sweeper_interval_ms=50)
    client = Client(f"127.0.0.1:{running.port}", token=token)
    try:
        client.funded_org("acme", 10_000, {"alice": 1_000})
        held = reserve(client, 10).reservation_id
        set_expiry(database_url, held, "-1 second")
        import time
        deadline = time.monotonic() + 10
        while balances(database_url) != (0, 0, 0, 0):
            assert time.monotonic() < deadline, "the sweeper did not run"
            time.sleep(0.05)
    finally:
        client.close()


# Concurrency.

def test_threads_reserving_committing_releasing_refunding_and_deducting_at_once_never_overdraw(
        client, database_url, server, start_server, token):
    """24 threads on one allocation, through two replicas of the real server
    (group commit on): no overdraft, every hold ends in exactly one state, no
    deduction refunded past its charge, and the ledger balances."""
    from tests.support import Client
    client.funded_org("acme", 1_000_000, {"alice": 20_000})
    replica = start_server(database_url)
    other_client = Client(f"127.0.0.1:{replica.port}", token=token)
    barrier = threading.Barrier(24)
    charges = []
    outcomes = {}
    lock = threading.Lock()
    batch_kinds = []
    commit_batch = server.committer._commit_batch

    async def recording(items):
        batch_kinds.append({type(item).__name__ for item in items} if len(items) > 1 else set())
        return await commit_batch(items)

    server.committer._commit_batch = recording

    def note(kind):
        with lock:
            outcomes[kind] = outcomes.get(kind, 0) + 1

    def work(seed):
        rng = random.Random(seed)
        client = other_client if seed % 2 else first_client
        barrier.wait()
        for _ in range(25):
            try:
                roll = rng.random()
                if roll < 0.3:
                    amount = rng.randint(1, 300)
                    charged = deduct(client, amount)
                    note("deducted")
                    with lock:
                        charges.append((charged.deduction_id, amount))
                        # Any thread's charge: refunds of one race each other.
                        deduction_id, charged_amount = rng.choice(charges)
                    refund(client, deduction_id, rng.randint(1, charged_amount))
                    note("refunded")
                    continue
                held = reserve(client, rng.randint(1, 400), ttl_s=rng.choice([1, 60]))
                note("reserved")
                if roll < 0.65:
                    commit(client, held.reservation_id, rng.randint(1, 500))
                    note("committed")
                elif roll < 0.9:
                    release(client, held.reservation_id)
                    note("released")
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error
                note(error.code().name)

    first_client = client
    try:
        with concurrent.futures.ThreadPoolExecutor(24) as pool:
            for future in [pool.submit(work, n) for n in range(24)]:
                future.result(timeout=300)
    finally:
        other_client.close()
    assert outcomes.get("reserved", 0) > 50 and outcomes.get("committed", 0) > 20, outcomes
    assert outcomes.get("refunded", 0) > 20, outcomes
    assert violations(database_url) == {}
    with psycopg.connect(database_url) as conn:
        limit, used, reserved = conn.execute(
            "SELECT limit_millicredits, used_millicredits, reserved_millicredits"
            " FROM user_credit_allocations").fetchone()
        assert used + reserved <= limit
        states = dict(conn.execute("SELECT state, count(*) FROM credit_reservations GROUP BY 1").fetchall())
        assert sum(states.values()) == outcomes["reserved"]
        assert states.get("COMMITTED", 0) == outcomes.get("committed", 0)
        assert states.get("RELEASED", 0) == outcomes.get("released", 0)
    # Holds and commits shared transactions with deductions.
    assert any(len(kinds) > 1 for kinds in batch_kinds), batch_kinds[:20]


def commit_group(server, items):
    """One group commit batch, as a lane runs it: on the server's loop."""
    return server.event_loop.run(server.lane_store.commit_group(items))


def test_a_mixed_group_commit_batch_runs_in_arrival_order(client, database_url, server):
    """LaneStore.commit_group with deductions, holds and a commit: each sees what
    the ones before it left, in one transaction."""
    from orgbilling.server.store import Deduction, Reservation, ReservationCommit, ReservationRelease

    client.funded_org("acme", 10_000, {"alice": 1_000})
    held = reserve(client, 100).reservation_id
    released = reserve(client, 50).reservation_id

    def deduction(amount):
        return Deduction(org_id="acme", user_id="alice", amount_millicredits=amount, service_type="llm",
                         service_name="mix", idempotency_key=new_key(), request_hash=b"d",
                         request_id="", metadata={})

    def hold(amount):
        return Reservation(org_id="acme", user_id="alice", amount_millicredits=amount, ttl_ms=60_000,
                           service_type="llm", service_name="mix", idempotency_key=new_key(),
                           request_hash=b"r", request_id="", metadata={})

    results = commit_group(server, [
        deduction(200), deduction(100), hold(300),
        ReservationCommit(org_id="acme", reservation_id=held, amount_millicredits=150,
                          idempotency_key=new_key(), request_hash=b"c", request_id="", metadata={}),
        hold(300), deduction(1),
        ReservationRelease(org_id="acme", reservation_id=released, idempotency_key=new_key(),
                           request_hash=b"r", request_id=""),
    ])
    assert [r.allocation_remaining_millicredits for r in results[:2]] == [650, 550]
    assert results[2]["allocation_remaining"] == 250
    assert results[3]["allocation_remaining"] == 200  # 150 charged, its 100 released
    assert results[4]["outcome"] == "INSUFFICIENT_CREDITS"
    assert results[5].allocation_remaining_millicredits == 199
    assert results[6]["allocation_remaining"] == 249
    assert violations(database_url) == {}


def test_a_batch_of_holds_commits_and_releases_answers_as_one_call_at_a_time(client, database_url, server):
    """reservations_batch keeps the balances in memory for the whole batch:
    the same calls, over two orgs and two users each, answer exactly as they
    do one transaction each (replays, refusals, a hold ended twice, a commit
    beyond its hold, keys used again in the batch, which it answers from
    memory since it writes its rows after the last call), and leave the
    same balances."""
    from orgbilling.server.store import Reservation, ReservationCommit, ReservationRelease

    def calls(orgs: dict[str, str], holds: dict[str, str]) -> list:
        def hold(org, user, amount, key):
            return Reservation(org_id=orgs[org], user_id=user, amount_millicredits=amount,
                               ttl_ms=60_000, service_type="llm", service_name="mix",
                               idempotency_key=key, request_hash=f"{user} {amount}".encode(),
                               request_id="", metadata={"n": key})

        def commit_(org, hold_name, amount, key):
            return ReservationCommit(org_id=orgs[org], reservation_id=holds[hold_name],
                                     amount_millicredits=amount, idempotency_key=key,
                                     request_hash=f"{hold_name} {amount}".encode(), request_id="",
                                     metadata={})

        def release_(org, hold_name, key):
            return ReservationRelease(org_id=orgs[org], reservation_id=holds[hold_name],
                                      idempotency_key=key, request_hash=hold_name.encode(),
                                      request_id="")

        return [
            hold("a", "alice", 450, "k0"),            # after her reset: 500 - 100 held - 450
            hold("b", "alice", 200, "k1"), hold("a", "alice", 200, "k1"),
            hold("a", "alice", 200, "k1"),            # the same call again: its replay
            commit_("a", "a-alice", 150, "k2"),
            release_("a", "a-alice", "k3"),           # ended just before: not open
            hold("a", "bob", 250, "k4"),              # bob has 300 - 100 held
            commit_("a", "a-bob", 250, "k5"),         # 150 more than held: fits
            commit_("b", "b-bob", 400, "k5"),         # 300 more than held: does not
            release_("b", "b-bob", "k6"),
            hold("a", "alice", 10**6, "k7"),
            hold("a", "nobody", 1, "k8"),
            release_("a", "missing", "k9"),
            commit_("a", "a-bob", 250, "k5"),         # replayed, not charged twice
            hold("a", "bob", 50, "k10"),
            commit_("a", "a-alice", 1, "k2"),         # k2 with another request
            hold("b", "alice", 400, "k11"),           # 200 held by k1: 400 does not fit
            hold("a", "alice", 0, "k12"),             # refused before its key is stored
            hold("a", "alice", 10, "k12"),            # so the key is new
            commit_("b", "b-alice", 5000, "k13"),     # refused, and stored
            commit_("b", "b-alice", 5000, "k13"),     # its replay
            commit_("b", "b-alice", 50, "k14"),       # the refusal kept the hold open
            release_("b", "b-alice", "k15"),          # committed just before
            hold("b", "bob", 20, "k16"),
            release_("b", "b-bob", "k16"),            # k16 is the hold's key
            hold("b", "bob", 20, "k16"),              # the hold's replay, past the refused release
        ]

    def setup(name):
        client.funded_org(name, 10_000, {"alice": 500, "bob": 300})
        holds = {user: reserve(client, 100, user=user, org=name).reservation_id
                 for user in ("alice", "bob")}
        if name.endswith("-a"):
            # alice spent 100 this period, which ends before the calls arrive.
            deduct(client, 100, org=name)
            with psycopg.connect(database_url, autocommit=True) as conn:
                conn.execute("UPDATE user_credit_allocations SET reset_period = 'MONTHLY',"
                             " next_reset_at = now() - interval '1 second'"
                             " WHERE org_id = %s AND user_id = 'alice'", (name,))
        return holds

    orgs_batch, orgs_alone = {"a": "batch-a", "b": "batch-b"}, {"a": "alone-a", "b": "alone-b"}
    holds_batch, holds_alone = {"missing": str(uuid.uuid4())}, {"missing": str(uuid.uuid4())}
    for letter in "ab":
        for holds, orgs in ((holds_batch, orgs_batch), (holds_alone, orgs_alone)):
            for user, reservation_id in setup(orgs[letter]).items():
                holds[f"{letter}-{user}"] = reservation_id

    batched = commit_group(server, calls(orgs_batch, holds_batch))
    alone = [commit_group(server, [call])[0] for call in calls(orgs_alone, holds_alone)]

    def comparable(answer):
        return {k: v for k, v in answer.items() if k not in ("reservation_id", "deduction_id", "expires_at_us")}

    assert [comparable(a) for a in batched] == [comparable(a) for a in alone]
    assert [a["outcome"] for a in batched] == [
        "INSUFFICIENT_CREDITS", "OK", "OK", "OK", "OK", "RESERVATION_NOT_OPEN", "INSUFFICIENT_CREDITS", "OK",
        "INSUFFICIENT_CREDITS", "OK", "INSUFFICIENT_CREDITS", "ALLOCATION_NOT_FOUND",
        "RESERVATION_NOT_FOUND", "OK", "OK", "IDEMPOTENCY_KEY_REUSED", "INSUFFICIENT_CREDITS",
        "INVALID_AMOUNT", "OK", "INSUFFICIENT_CREDITS", "INSUFFICIENT_CREDITS", "OK",
        "RESERVATION_NOT_OPEN", "OK", "IDEMPOTENCY_KEY_REUSED", "OK"]
    assert [i for i, a in enumerate(batched) if a.get("replayed")] == [3, 13, 20, 25]
    assert batched[13]["deduction_id"] == batched[7]["deduction_id"]
    assert batched[25]["reservation_id"] == batched[23]["reservation_id"]
    assert batched[22]["state"] == "COMMITTED"
    assert batched[0]["allocation_remaining"] == 400  # the reset came first
    for letter in "ab":
        for user in ("alice", "bob"):
            assert (balances(database_url, orgs_batch[letter], user)
                    == balances(database_url, orgs_alone[letter], user))
    def periods(org):
        with psycopg.connect(database_url) as conn:
            return conn.execute(
                """SELECT array_agg(period_number ORDER BY user_id),
                          (SELECT count(*) FROM org_billing_history
                            WHERE org_id = %(org)s AND event_type = 'PERIOD_RESET')
                     FROM user_credit_allocations WHERE org_id = %(org)s""", {"org": org}).fetchone()

    assert periods("batch-a") == periods("alone-a") == ([1, 0], 1)
    assert balances(database_url, "batch-a", "bob") == (250, 50, 500, 260)
    assert balances(database_url, "batch-a", "alice") == (150, 210, 500, 260)
    assert violations(database_url) == {}
