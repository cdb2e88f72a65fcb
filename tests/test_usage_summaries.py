"""The running totals stay right when a deduction's day is not the newest:
a transaction that started before midnight and commits after the next day's
first charge adds to its own day and to every later day already written."""

import psycopg

from orgbilling.v1 import credit_service_pb2 as pb
from orgbilling.server.verify import violations
from tests.support import new_key


def deduct(client, amount: int) -> None:
    client.credits.DeductCredits(pb.DeductCreditsRequest(
        org_id="late", user_id="u", amount_millicredits=amount, service_type="llm",
        service_name="late", idempotency_key=new_key()))


def running_rows(conn) -> dict[str, list[tuple]]:
    return {
        "org": conn.execute(
            "SELECT day - current_date, used_millicredits_total, request_count_total"
            " FROM org_usage_running WHERE org_id = 'late' ORDER BY day").fetchall(),
        "user": conn.execute(
            "SELECT day - current_date, used_millicredits_total, request_count_total"
            " FROM user_usage_running WHERE org_id = 'late' ORDER BY day").fetchall(),
    }


def write_yesterday_and_tomorrow(conn) -> None:
    """Usage of 'late' (user u) up to yesterday (100 in 2 charges), and
    tomorrow's row as if one charge of 7 had already been committed after
    midnight."""
    conn.execute("SET TIME ZONE 'UTC'")
    conn.execute("""INSERT INTO org_usage_running VALUES
                      ('late', current_date - 1, 100, 2), ('late', current_date + 1, 107, 3)""")
    conn.execute("""INSERT INTO user_usage_running VALUES
                      ('late', 'u', current_date - 1, 100, 2, now() - interval '1 day'),
                      ('late', 'u', current_date + 1, 107, 3, now() + interval '1 day')""")


def test_a_charge_dated_before_a_later_days_row_adds_to_both(client, database_url):
    """With a row already written for tomorrow (what a transaction that
    started before midnight finds when it commits after), a charge dated today
    starts today's row from the latest before it and adds to tomorrow's too."""
    client.funded_org("late", 10**9, {"u": 10**8})
    with psycopg.connect(database_url, autocommit=True) as conn:
        write_yesterday_and_tomorrow(conn)
        deduct(client, 5)
        assert running_rows(conn) == {
            "org": [(-1, 100, 2), (0, 105, 3), (1, 112, 4)],
            "user": [(-1, 100, 2), (0, 105, 3), (1, 112, 4)],
        }
        deduct(client, 1)  # today's row exists now: it and tomorrow's grow
        assert running_rows(conn)["org"] == [(-1, 100, 2), (0, 106, 4), (1, 113, 5)]


def test_running_totals_match_the_ledger_after_deductions(client, database_url):
    """Lone deductions and a batch over two users: verify finds the running
    totals equal to the running sums of the attribution rows."""
    client.funded_org("late", 10**9, {"u": 10**8, "v": 10**8})
    for amount in (3, 4):
        deduct(client, amount)
    client.credits.DeductCreditsBatch(pb.DeductCreditsBatchRequest(deductions=[
        pb.DeductCreditsRequest(org_id="late", user_id=user, amount_millicredits=2,
                                service_type="llm", service_name="late", idempotency_key=new_key())
        for user in ("u", "v", "u")]))
    assert violations(database_url) == {}
    with psycopg.connect(database_url, autocommit=True) as conn:
        assert running_rows(conn)["org"][-1][1:] == (13, 5)


def test_verify_finds_a_tampered_running_total(client, database_url):
    """A running total off by one is reported, for each running table."""
    client.funded_org("late", 10**9, {"u": 10**8})
    deduct(client, 3)
    for table in ("org_usage_running", "user_usage_running"):
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(f"UPDATE {table} SET used_millicredits_total = used_millicredits_total + 1")
        assert f"{table} equals the running sums of the attribution rows" in violations(database_url)
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(f"UPDATE {table} SET used_millicredits_total = used_millicredits_total - 1")
    assert violations(database_url) == {}


def batch(client, items: list[tuple[str, str, str, int]]):
    """One DeductCreditsBatch of (org_id, user_id, service_name, amount)."""
    return client.credits.DeductCreditsBatch(pb.DeductCreditsBatchRequest(deductions=[
        pb.DeductCreditsRequest(org_id=org_id, user_id=user_id, amount_millicredits=amount,
                                service_type="llm", service_name=service, idempotency_key=new_key())
        for org_id, user_id, service, amount in items]))


def test_a_batch_dated_before_a_later_days_row_adds_to_both(client, database_url):
    """A batch's summaries keep the same rules as a lone charge's: with
    tomorrow's row already written, the batch's charges
    of today start today's row from yesterday's and add to tomorrow's, for
    the org and the user, next to another org that had no row at all."""
    client.funded_org("late", 10**9, {"u": 10**8})
    client.funded_org("fresh", 10**9, {"w": 10**8})
    with psycopg.connect(database_url, autocommit=True) as conn:
        write_yesterday_and_tomorrow(conn)
        batch(client, [("late", "u", "a", 2), ("fresh", "w", "a", 9), ("late", "u", "b", 3)])
        assert running_rows(conn) == {
            "org": [(-1, 100, 2), (0, 105, 4), (1, 112, 5)],
            "user": [(-1, 100, 2), (0, 105, 4), (1, 112, 5)],
        }
        assert conn.execute("SELECT used_millicredits_total, request_count_total"
                            " FROM org_usage_running WHERE org_id = 'fresh'").fetchall() == [(9, 1)]


def test_batches_over_many_orgs_users_and_services_keep_every_summary_exact(client, database_url):
    """Batches spread over five orgs, two users each, two services, with
    refused items and replays among them: verify finds every summary table
    (daily, monthly, running) equal to the attribution rows it sums."""
    for org in range(5):
        client.funded_org(f"org-{org}", 10**9, {"u": 10**8, "v": 300})
    items = [(f"org-{n % 5}", "uv"[n % 2], f"svc-{n % 3 % 2}", 100 + n) for n in range(40)]
    results = batch(client, items).results
    assert {r.WhichOneof("result") for r in results} == {"deduction", "error"}  # v's limit ran out
    batch(client, items[:7] + [("org-0", "nobody", "svc-0", 1)])
    assert violations(database_url) == {}
