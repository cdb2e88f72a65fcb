"""What the reporting tests share: deductions placed at chosen times, straight
into the ledger's table, and the reports computed again from those rows in
plain Python, independently of the server's SQL (summary tables, views)."""

import collections
import dataclasses
import datetime as dt
import uuid

import psycopg
from google.protobuf.timestamp_pb2 import Timestamp

from orgbilling.server.summaries import rebuild_usage_summaries

UTC = dt.timezone.utc
EPOCH = dt.datetime(1970, 1, 1, tzinfo=UTC)
MICROSECOND = dt.timedelta(microseconds=1)
DAY = dt.timedelta(days=1)


def at(*parts) -> dt.datetime:
    """A UTC datetime: at(2024, 2, 29, 23, 59, 59, 999999)."""
    return dt.datetime(*parts, tzinfo=UTC)


def timestamp(moment: dt.datetime) -> Timestamp:
    """The Timestamp of an aware datetime, exact to the microsecond."""
    delta = moment - EPOCH
    micros = (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
    seconds, micro = divmod(micros, 1_000_000)
    return Timestamp(seconds=seconds, nanos=micro * 1000)


def moment(value: Timestamp) -> dt.datetime:
    """The aware datetime of a Timestamp (whole microseconds)."""
    assert value.nanos % 1000 == 0, value
    return EPOCH + dt.timedelta(seconds=value.seconds, microseconds=value.nanos // 1000)


def midnight(moment_: dt.datetime) -> dt.datetime:
    return moment_.replace(hour=0, minute=0, second=0, microsecond=0)


@dataclasses.dataclass(frozen=True)
class Usage:
    """One deduction as the test placed it."""
    org_id: str
    user_id: str
    amount: int
    created_at: dt.datetime
    service_type: str = "llm"
    service_name: str = "chat"


def insert_usage(database_url: str, rows) -> None:
    """Writes these deductions straight into credit_usage_attribution, at their
    times, then rebuilds the summaries of their organizations (the reports
    read them). Their allocations must exist (a foreign key)."""
    rows = list(rows)
    with psycopg.connect(database_url) as conn:
        with conn.cursor() as cursor:
            cursor.executemany(
                """INSERT INTO credit_usage_attribution
                       (org_id, user_id, amount_millicredits, service_type, service_name,
                        idempotency_key, request_hash, allocation_period,
                        allocation_remaining_after, pool_spendable_after, created_at)
                   VALUES (%s, %s, %s, %s, %s, %s, %s, 0, 0, 0, %s)""",
                [(r.org_id, r.user_id, r.amount, r.service_type, r.service_name,
                  f"placed-{uuid.uuid4().hex}", b"\x00" * 32, r.created_at) for r in rows],
            )
        rebuild_usage_summaries(conn, org_ids=sorted({r.org_id for r in rows}))


# The reports, computed again from the rows.

def in_range(rows, org_id, start, end):
    return [r for r in rows if r.org_id == org_id and start <= r.created_at < end]


def totals(rows) -> tuple[int, int, int]:
    """(used, requests, active users)."""
    return sum(r.amount for r in rows), len(rows), len({r.user_id for r in rows})


def by_service_type(rows) -> list[tuple]:
    sums = collections.defaultdict(lambda: [0, 0])
    for r in rows:
        sums[r.service_type][0] += r.amount
        sums[r.service_type][1] += 1
    return sorted(((k, "", used, n) for k, (used, n) in sums.items()), key=lambda e: (-e[2], e[0]))


def by_service_name(rows) -> list[tuple]:
    sums = collections.defaultdict(lambda: [0, 0])
    for r in rows:
        sums[(r.service_type, r.service_name)][0] += r.amount
        sums[(r.service_type, r.service_name)][1] += 1
    return sorted(((t, n, used, c) for (t, n), (used, c) in sums.items()),
                  key=lambda e: (-e[2], e[0], e[1]))


def top_users(rows, limit: int) -> list[tuple]:
    """(user, used, requests, services used, last use), most used first, ties by user."""
    users = collections.defaultdict(list)
    for r in rows:
        users[r.user_id].append(r)
    entries = [(user, sum(r.amount for r in mine), len(mine),
                len({(r.service_type, r.service_name) for r in mine}), max(r.created_at for r in mine))
               for user, mine in users.items()]
    return sorted(entries, key=lambda e: (-e[1], e[0]))[:limit]


def daily(rows, start, end) -> list[tuple]:
    """(midnight, used, requests) for every UTC day from start's to that of
    the last microsecond before end."""
    day, last = midnight(start), midnight(end - MICROSECOND)
    sums = collections.defaultdict(lambda: [0, 0])
    for r in rows:
        sums[midnight(r.created_at)][0] += r.amount
        sums[midnight(r.created_at)][1] += 1
    entries = []
    while day <= last:
        entries.append((day, *sums.get(day, (0, 0))))
        day += DAY
    return entries


def expected_summary(all_rows, org_id, start, end, top: int = 10) -> dict:
    rows = in_range(all_rows, org_id, start, end)
    return {
        "totals": totals(rows),
        "by_service_type": by_service_type(rows),
        "by_service_name": by_service_name(rows),
        "top_users": top_users(rows, top),
        "daily": daily(rows, start, end),
    }


def summary_as_tuples(response) -> dict:
    """A GetUsageSummaryResponse in the shape of expected_summary."""
    return {
        "totals": (response.totals.used_millicredits, response.totals.request_count,
                   response.totals.active_users),
        "by_service_type": [(s.service_type, s.service_name, s.used_millicredits, s.request_count)
                            for s in response.by_service_type],
        "by_service_name": [(s.service_type, s.service_name, s.used_millicredits, s.request_count)
                            for s in response.by_service_name],
        "top_users": [(u.user_id, u.used_millicredits, u.request_count, u.services_used,
                       moment(u.last_use_time)) for u in response.top_users],
        "daily": [(moment(d.day_start_time), d.used_millicredits, d.request_count) for d in response.daily],
    }


def last_30_days_start(now: dt.datetime) -> dt.datetime:
    """Midnight UTC 29 days before today: "the last 30 days" is whole UTC days."""
    return midnight(now) - 29 * DAY


def money(entries) -> dict[str, int]:
    """repeated Money as {currency: cents}, zero amounts left out (an absent
    currency and a zero one say the same)."""
    found = {}
    for entry in entries:
        assert entry.currency not in found, f"currency {entry.currency} twice"
        found[entry.currency] = entry.amount_cents
    return {currency: cents for currency, cents in found.items() if cents}


def round_half_up_div(numerator: int, denominator: int) -> int:
    """numerator / denominator rounded half up, in integers (no floats near money)."""
    quotient, remainder = divmod(numerator, denominator)
    return quotient + (1 if 2 * remainder >= denominator else 0)
