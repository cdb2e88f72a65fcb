"""The organizations the benchmark charges, and the table of scenarios.

A scenario is one entry in SCENARIOS: a name and a function that, given the
stubs, returns a coroutine function making one call. The load generator
calls it from N concurrent callers. Adding a scenario is adding one entry.
"""

import concurrent.futures
import dataclasses
import itertools
import os
from collections.abc import Awaitable, Callable

import grpc
import psycopg
from grpc_health.v1 import health_pb2, health_pb2_grpc

from orgbilling.v1 import credit_service_pb2 as credit_pb
from orgbilling.v1 import credit_service_pb2_grpc
from orgbilling.v1 import org_billing_service_pb2 as billing_pb
from orgbilling.v1 import org_billing_service_pb2_grpc
from tests.support import Client


# The metadata every authenticated call carries: the one place credentials
# are wired (use_token). Health checks never carry it.
CALL_METADATA: tuple[tuple[str, str], ...] = ()


def use_token(token: str | None) -> None:
    """Sends `authorization: Bearer <token>` on every call but health checks."""
    global CALL_METADATA
    CALL_METADATA = (("authorization", f"Bearer {token}"),) if token else ()


# No call should take this long; a stuck one counts as an error, not a hang.
CALL_TIMEOUT_S = 10.0

# The largest amount the API accepts: each deduction takes 1 millicredit, so
# this never runs out.
UNLIMITED_MILLICREDITS = 10**15
USER_ID = "bench-user"
HOT_ORG = "bench-hot"
SPREAD_ORGS = [f"bench-spread-{number:04d}" for number in range(1000)]
PGBENCH_ORG = "bench-pgbench"  # baseline B charges its own org, not the hot one
BIG_TABLE_ORG = "bench-big-table"
ALL_ORGS = [HOT_ORG, *SPREAD_ORGS, PGBENCH_ORG, BIG_TABLE_ORG]


def create_orgs(address: str, org_ids: list[str], *, database_url: str, threads: int = 8) -> None:
    """Subscribes, funds and allocates each org through the real API (not
    SQL), so the data is what production would hold; then takes those
    tables' statistics, as autovacuum does a minute after such writes.
    Without, the server's first plans are made on tables never analyzed,
    and made again in the middle of a run when autovacuum comes
    (benchmarks/README.md, "Plans that read whole tables")."""
    client = Client(address, metadata=CALL_METADATA)
    try:
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            funded = pool.map(
                lambda org_id: client.funded_org(
                    org_id, UNLIMITED_MILLICREDITS, {USER_ID: UNLIMITED_MILLICREDITS}
                ),
                org_ids,
            )
            list(funded)  # re-raises the first failure
    finally:
        client.close()
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("ANALYZE organizations, organization_subscriptions, organization_credit_pools,"
                     " user_credit_allocations, org_billing_history")


@dataclasses.dataclass
class Stubs:
    """Stubs over one asyncio channel, shared by every caller."""

    health: health_pb2_grpc.HealthStub
    credits: credit_service_pb2_grpc.CreditServiceStub
    billing: org_billing_service_pb2_grpc.OrgBillingServiceStub

    @classmethod
    def over(cls, channel: grpc.aio.Channel) -> "Stubs":
        return cls(health_pb2_grpc.HealthStub(channel),
                   credit_service_pb2_grpc.CreditServiceStub(channel),
                   org_billing_service_pb2_grpc.OrgBillingServiceStub(channel))


OneCall = Callable[[], Awaitable[object]]


@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    make_call: Callable[[Stubs], OneCall]
    # Deductions one call makes, for deductions/s (a batch of 1,000: 1000).
    deductions_per_call: int = 0
    # Levels of callers above this are skipped (None: every level).
    max_callers: int | None = None


def health_check(stubs: Stubs) -> OneCall:
    request = health_pb2.HealthCheckRequest()

    async def call():
        # Health stays unauthenticated: no CALL_METADATA here, on purpose.
        return await stubs.health.Check(request, timeout=CALL_TIMEOUT_S)

    return call


def check_credits(org_id: str) -> Callable[[Stubs], OneCall]:
    def make(stubs: Stubs) -> OneCall:
        request = credit_pb.CheckCreditsRequest(org_id=org_id, user_id=USER_ID, amount_millicredits=1)

        async def call():
            return await stubs.credits.CheckCredits(
                request, metadata=CALL_METADATA, timeout=CALL_TIMEOUT_S
            )

        return call

    return make


def get_credit_pool(org_id: str) -> Callable[[Stubs], OneCall]:
    def make(stubs: Stubs) -> OneCall:
        request = billing_pb.GetCreditPoolRequest(org_id=org_id)

        async def call():
            return await stubs.billing.GetCreditPool(request, metadata=CALL_METADATA, timeout=CALL_TIMEOUT_S)

        return call

    return make


def deduct_request(org_id: str) -> credit_pb.DeductCreditsRequest:
    # Random keys, as real callers send: they land all over the unique index
    # on (org_id, idempotency_key), which is what a big table makes slower.
    # (os.urandom is several times cheaper than uuid4 for the same 128 bits.)
    return credit_pb.DeductCreditsRequest(
        org_id=org_id, user_id=USER_ID, amount_millicredits=1,
        service_type="llm", service_name="bench", idempotency_key=os.urandom(16).hex(),
        metadata={"model": "bench-model", "tokens": "100"},
    )


def deduct_credits(org_ids: list[str]) -> Callable[[Stubs], OneCall]:
    """Each call charges the next org of org_ids, round robin."""

    def make(stubs: Stubs) -> OneCall:
        next_org = itertools.cycle(org_ids).__next__

        async def call():
            return await stubs.credits.DeductCredits(
                deduct_request(next_org()), metadata=CALL_METADATA, timeout=CALL_TIMEOUT_S
            )

        return call

    return make


def in_turn(*makes: Callable[[Stubs], OneCall]) -> Callable[[Stubs], OneCall]:
    """Each call is the next of makes' calls, round robin: calls of several
    methods at once, as a service's traffic is."""

    def make(stubs: Stubs) -> OneCall:
        next_call = itertools.cycle([make_one(stubs) for make_one in makes]).__next__

        async def call():
            return await next_call()()

        return call

    return make


def deduct_credits_batch(org_id: str, size: int) -> Callable[[Stubs], OneCall]:
    """Each call charges `size` deductions to org_id in one DeductCreditsBatch.
    Batches on one pool run one after another, so a call waits for all the
    others: it gets a longer timeout."""

    def make(stubs: Stubs) -> OneCall:
        template = deduct_request(org_id)

        async def call():
            # Copies of one template with fresh keys: a third of the client CPU
            # of building each deduction, so the client does not cap the figure.
            request = credit_pb.DeductCreditsBatchRequest()
            request.deductions.extend([template] * size)
            for deduction in request.deductions:
                deduction.idempotency_key = os.urandom(16).hex()
            return await stubs.credits.DeductCreditsBatch(
                request, metadata=CALL_METADATA, timeout=6 * CALL_TIMEOUT_S
            )

        return call

    return make


def reserve_then_commit(org_id: str) -> Callable[[Stubs], OneCall]:
    """Each call is a pair: ReserveCredits of 2 millicredits, then
    CommitReservation of 1 (the rest released), as a caller that learns its
    cost afterwards makes them."""

    def make(stubs: Stubs) -> OneCall:
        async def call():
            held = await stubs.credits.ReserveCredits(
                credit_pb.ReserveCreditsRequest(
                    org_id=org_id, user_id=USER_ID, amount_millicredits=2, service_type="llm",
                    service_name="bench", idempotency_key=os.urandom(16).hex(),
                    metadata={"model": "bench-model"}),
                metadata=CALL_METADATA, timeout=CALL_TIMEOUT_S)
            return await stubs.credits.CommitReservation(
                credit_pb.CommitReservationRequest(
                    org_id=org_id, reservation_id=held.reservation_id, amount_millicredits=1,
                    idempotency_key=os.urandom(16).hex(), metadata={"tokens": "100"}),
                metadata=CALL_METADATA, timeout=CALL_TIMEOUT_S)

        return call

    return make


def server_has_rpc(name: str) -> bool:
    """Whether the generated code (so the contract) has this CreditService RPC."""
    return name in credit_pb.DESCRIPTOR.services_by_name["CreditService"].methods_by_name


# Baseline A0: the same health Check on a bare grpcio server (benchmarks.bare_server).
BARE_SCENARIO = Scenario("noop_bare", "A0: health Check on a bare gRPC server, same server"
                         " and options, no interceptors", health_check)

# The first entry is baseline A: every other figure is divided by it.
BASELINE_A = "noop"
SCENARIOS = [
    Scenario(BASELINE_A, "health Check, no database: the cost of a gRPC call itself",
             health_check),
    Scenario("check", "CheckCredits on the hot allocation", check_credits(HOT_ORG)),
    # A call served in the server's thread pool, as every call but the
    # group-committed ones and health is (server.app).
    Scenario("pool_read", "GetCreditPool of the hot org: one read, in the server's thread pool",
             get_credit_pool(HOT_ORG)),
    Scenario("deduct_hot", "DeductCredits, all on one hot allocation",
             deduct_credits([HOT_ORG]), deductions_per_call=1),
    # Each method's calls are accepted through a request of their own when
    # it is registered with gRPC's core, through the one generic request
    # otherwise (server.interceptors.ChainedServices): this shows what sharing it costs.
    Scenario("check_deduct_hot", "CheckCredits and DeductCredits in turn, on the hot allocation",
             in_turn(check_credits(HOT_ORG), deduct_credits([HOT_ORG]))),
    Scenario("deduct_spread", "DeductCredits, round robin over 1,000 orgs",
             deduct_credits(SPREAD_ORGS), deductions_per_call=1),
]
# Issue 5's batch API, measured as soon as the contract has it.
if server_has_rpc("DeductCreditsBatch"):
    SCENARIOS.append(
        Scenario("deduct_batch_hot", "DeductCreditsBatch of 1,000 on the hot allocation",
                 deduct_credits_batch(HOT_ORG, 1000), deductions_per_call=1000,
                 # More callers only queue on the pool's lock; each call
                 # would take longer than the measured window.
                 max_callers=16)
    )

# Issue 11's holds: a reserve and its commit, counted as one call.
if server_has_rpc("ReserveCredits"):
    SCENARIOS.append(
        Scenario("reserve_commit_hot", "ReserveCredits then CommitReservation, on the hot allocation",
                 reserve_then_commit(HOT_ORG), deductions_per_call=1)
    )

# Measured alone at one caller, before and after the attribution table grows.
BIG_TABLE_SCENARIO = Scenario(
    "deduct_big_table_org", "DeductCredits on the org whose attribution table is filled",
    deduct_credits([BIG_TABLE_ORG]), deductions_per_call=1,
)
