"""CheckCredits calls waiting at one moment share one statement
(Store.check_batch through a GroupCommitter of their own): each still gets
exactly the answer a check of its own would give."""

import concurrent.futures
import datetime
import threading

import grpc

from orgbilling.v1 import credit_service_pb2 as pb
from orgbilling.server.store import CreditCheck
from tests.support import raises_rpc, set_ledger_clock


def test_a_batch_of_checks_answers_each_as_alone(server, client, database_url):
    """Sufficient, insufficient (at the limit, one over), no
    allocation, unknown org, and an org whose period has ended (the check
    applies it, taking the pool's lock) in one statement: each result is the
    one check alone gives, in the order asked."""
    client.funded_org("acme", 5_000, {"alice": 1_000, "bob": 4_000})
    client.funded_org("zeta", 700, {"carol": 700})
    checks = [CreditCheck(org_id=o, user_id=u, amount_millicredits=a) for o, u, a in [
        ("zeta", "carol", 700), ("acme", "alice", 1_000), ("acme", "alice", 1_001),
        ("acme", "bob", 4_001), ("acme", "nobody", 1), ("missing", "alice", 1),
        ("zeta", "carol", 701)]]
    check_batch = server.store.check_batch
    alone = [check_batch([c])[0] for c in checks]
    assert [r.outcome for r in alone] == ["OK", "OK", "OK", "OK", "ALLOCATION_NOT_FOUND",
                                          "ORG_NOT_FOUND", "OK"]
    assert [r.sufficient for r in alone] == [True, True, False, False, False, False, False]
    assert check_batch(checks) == alone

    # A month on, acme's period has ended: the batch applies it, as one check would.
    set_ledger_clock(database_url, datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=40))
    batched = check_batch(checks)
    assert batched == [check_batch([c])[0] for c in checks]


def test_concurrent_checks_share_statements_and_each_gets_its_own_answer(server, client):
    """48 threads checking at once, over three orgs with amounts on both
    sides of each balance: every answer is right, and some statements
    carried several checks."""
    limits = {"org-0": 1_000, "org-1": 2_000, "org-2": 3_000}
    for org_id, limit in limits.items():
        client.funded_org(org_id, 10_000, {"u": limit})
    sizes = []
    coalescer = server.check_coalescer
    commit_batch = coalescer._commit_batch

    async def recording(batch):
        sizes.append(len(batch))
        return await commit_batch(batch)
    coalescer._commit_batch = recording
    start = threading.Barrier(48)

    def check(n: int):
        org_id = f"org-{n % 3}"
        amount = limits[org_id] + (n % 2) * 2 - 1  # one under, one over
        start.wait()
        answers = []
        for _ in range(10):
            answer = client.credits.CheckCredits(pb.CheckCreditsRequest(
                org_id=org_id, user_id="u", amount_millicredits=amount))
            answers.append((answer.sufficient, answer.allocation_remaining_millicredits))
        return answers, (amount <= limits[org_id], limits[org_id])

    with concurrent.futures.ThreadPoolExecutor(48) as pool:
        for answers, expected in pool.map(check, range(48)):
            assert set(answers) == {expected}
    assert sum(sizes) == 480 and max(sizes) > 1


def test_a_check_with_bad_input_is_refused_before_it_queues(client):
    with raises_rpc(grpc.StatusCode.INVALID_ARGUMENT):
        client.credits.CheckCredits(pb.CheckCreditsRequest(org_id="acme", user_id="u",
                                                           amount_millicredits=0))
