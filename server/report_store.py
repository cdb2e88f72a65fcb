"""The reports' database access: ReportingService's reads, on the Store's
connections and with its handling of them (deadlines, a dead connection
retried once). Each report is one statement, or a few in one read-only
snapshot; the figures' SQL is in migrations/functions/60_reporting.sql, the
keyset lists' here.

Times go in and come out as epoch microseconds (PostgreSQL's precision), the
form the servicer's timestamps use.
"""

import contextlib
import datetime
import uuid

from psycopg.pq import TransactionStatus
from psycopg.rows import dict_row

from orgbilling.server.store import Store

_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
# Sorts after every real deduction id at the same time, and before none:
# a position from which a list or an export starts at a time boundary.
NIL_UUID = "00000000-0000-0000-0000-000000000000"


def at(micros: int) -> datetime.datetime:
    return _EPOCH + datetime.timedelta(microseconds=micros)


# One deduction as UsageRecord needs it, cheap to turn into a message: ids
# as text, the time in epoch microseconds, metadata as JSON text only when
# there is any (most deductions have none, and parsing '{}' a million times
# is not free). The id's text has a name of its own: named deduction_id, it
# would be what ORDER BY deduction_id sorts by, a sort of text after the
# index scan instead of the index's own order.
_USAGE_COLUMNS = """
    deduction_id::text AS deduction_id_text, user_id, amount_millicredits, service_type, service_name, request_id,
    CASE WHEN metadata = '{}'::jsonb THEN NULL ELSE metadata::text END,
    epoch_micros(created_at)
"""

# Keyset pages over the indexes (org_id, created_at, deduction_id) and
# (org_id, user_id, created_at, deduction_id): a page starts strictly after
# the row that ended the one before, so rows written meanwhile never make a
# row appear twice or be skipped.
_LIST_USAGE = """
    SELECT {columns} FROM credit_usage_attribution
     WHERE org_id = %(org_id)s {filters}
       AND created_at >= %(start)s AND (created_at, deduction_id) < (%(before_at)s, %(before_id)s)
     ORDER BY created_at DESC, deduction_id DESC
     LIMIT %(limit)s
"""
_USAGE_FILTERS = ("user_id", "service_type", "service_name")

# The export, oldest first. Its first chunk starts after (start, NIL_UUID).
_EXPORT_CHUNK = f"""
    SELECT {_USAGE_COLUMNS} FROM credit_usage_attribution
     WHERE org_id = %(org_id)s AND created_at < %(end)s
       AND (created_at, deduction_id) > (%(after_at)s, %(after_id)s)
     ORDER BY created_at, deduction_id
     LIMIT %(limit)s
"""

# Billing events, newest first, over (org_id, created_at, event_id). An
# invoice event without an amount of its own shows its invoice's.
_LIST_HISTORY = """
    SELECT h.event_id::text AS event_id, h.event_type, h.credits_delta_millicredits,
           h.credit_source, h.user_id, h.subscription_id::text AS subscription_id,
           coalesce(h.payment_reference, h.external_invoice_id) AS payment_reference,
           coalesce(h.amount_paid_cents, i.amount_cents) AS amount_cents,
           coalesce(h.currency, i.currency) AS currency,
           h.details, h.request_id, epoch_micros(h.created_at) AS created_at_us
      FROM org_billing_history AS h
      LEFT JOIN invoices AS i
             ON i.org_id = h.org_id AND i.external_invoice_id = h.external_invoice_id
     WHERE h.org_id = %(org_id)s {filters}
       AND h.created_at >= %(start)s AND (h.created_at, h.event_id) < (%(before_at)s, %(before_id)s)
     ORDER BY h.created_at DESC, h.event_id DESC
     LIMIT %(limit)s
"""

# ListOrgSummaries, by org_id: the live plan and status through the view
# (70_views.sql), the pool as GetCreditPool shows it.
_ORG_SUMMARIES = """
    SELECT v.org_id, v.plan, v.status, pool_json_now(p) AS pool
      FROM org_billing_summary AS v JOIN organization_credit_pools AS p USING (org_id)
     WHERE v.org_id > %s
     ORDER BY v.org_id
     LIMIT %s
"""


class ReportStore(Store):
    """The Store, with the reports' reads."""

    def _rows(self, sql: str, params) -> list[dict]:
        return self._run(lambda conn: conn.cursor(row_factory=dict_row).execute(sql, params).fetchall())

    def _snapshot(self, work):
        """Runs work(conn) in one read-only transaction on one snapshot, so
        that a report's several statements agree with each other."""
        def in_snapshot(conn):
            # A short deadline's connection comes in the transaction that
            # bounds its statements (Store._connection): set the level there,
            # for in a nested block (a savepoint) it can no longer be set.
            opened = conn.info.transaction_status == TransactionStatus.INTRANS
            with contextlib.nullcontext() if opened else conn.transaction():
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                return work(conn)

        return self._run(in_snapshot)

    # Summaries.

    def usage_summary(self, org_id: str, *, start_us: int, end_us: int,
                      top_users: int) -> dict | None:
        """{"groups": usage_summary rows, "top_users": usage_top_users rows},
        or None when the organization does not exist."""
        params = (org_id, at(start_us), at(end_us))

        def work(conn):
            cursor = conn.cursor(row_factory=dict_row)
            if cursor.execute("SELECT 1 FROM organizations WHERE org_id = %s", (org_id,)).fetchone() is None:
                return None
            groups = cursor.execute("SELECT * FROM usage_summary(%s, %s, %s)", params).fetchall()
            top = cursor.execute(
                "SELECT user_id, used_millicredits, request_count, services_used, active_users,"
                " epoch_micros(last_used_at) AS last_used_at_us"
                " FROM usage_top_users(%s, %s, %s, %s)", (*params, top_users)).fetchall()
            return {"groups": groups, "top_users": top}

        return self._snapshot(work)

    def org_billing(self, org_id: str) -> dict | None:
        found = self._rows("SELECT * FROM org_billing(%s)", (org_id,))
        return found[0] if found else None

    def org_metrics(self, org_id: str, *, start_us: int, end_us: int) -> dict | None:
        found = self._rows("SELECT * FROM org_metrics_between(%s, %s, %s)",
                           (org_id, at(start_us), at(end_us)))
        return found[0] if found else None

    def user_billing(self, user_id: str, *, org_ids: list[str] | None) -> list[dict]:
        return self._rows("SELECT * FROM user_billing(%s, %s)", (user_id, org_ids))

    def system_billing(self, *, top_orgs: int) -> dict:
        def work(conn):
            cursor = conn.cursor(row_factory=dict_row)
            return {
                "plans": cursor.execute("SELECT * FROM subscriptions_by_plan()").fetchall(),
                "top_orgs": cursor.execute("SELECT * FROM top_orgs_last_30_days(%s)", (top_orgs,)).fetchall(),
                "organization_count": cursor.execute("SELECT count(*) AS n FROM organizations").fetchone()["n"],
            }

        return self._snapshot(work)

    # Lists.

    def allocations_by_use(self, org_id: str, *, after: tuple[int, str] | None, limit: int) -> list[dict]:
        after_used, after_user_id = after if after else (None, None)
        return self._rows("SELECT * FROM allocations_by_use(%s, %s, %s, %s)",
                          (org_id, after_used, after_user_id, limit))

    def org_summaries(self, *, after_org_id: str, limit: int) -> list[dict]:
        return self._rows(_ORG_SUMMARIES, (after_org_id, limit))

    def list_usage(self, org_id: str, *, filters: dict[str, str], start_us: int, end_us: int,
                   before: tuple[int, str] | None, limit: int) -> list[tuple]:
        """Deductions newest first, before `before` (time, id) or from the end;
        `filters` maps user_id, service_type, service_name to a value, only
        those set. Rows as _USAGE_COLUMNS."""
        unknown = set(filters) - set(_USAGE_FILTERS)
        if unknown:
            raise ValueError(f"unknown usage filters {sorted(unknown)}")
        before_at, before_id = (at(before[0]), before[1]) if before else (at(end_us), NIL_UUID)
        sql = _LIST_USAGE.format(
            columns=_USAGE_COLUMNS,
            filters="".join(f" AND {name} = %({name})s" for name in _USAGE_FILTERS if name in filters))
        params = {"org_id": org_id, **filters, "start": at(start_us),
                  "before_at": before_at, "before_id": uuid.UUID(before_id), "limit": limit}
        return self._run(lambda conn: conn.execute(sql, params).fetchall())

    def list_history(self, org_id: str, *, event_type: str | None, start_us: int, end_us: int,
                     before: tuple[int, str] | None, limit: int) -> list[dict]:
        before_at, before_id = (at(before[0]), before[1]) if before else (at(end_us), NIL_UUID)
        sql = _LIST_HISTORY.format(filters=" AND h.event_type = %(event_type)s" if event_type else "")
        params = {"org_id": org_id, "event_type": event_type, "start": at(start_us),
                  "before_at": before_at, "before_id": uuid.UUID(before_id), "limit": limit}
        return self._rows(sql, params)

    def export_chunk(self, org_id: str, *, end_us: int, after: tuple[int, str],
                     limit: int) -> list[tuple]:
        """Up to `limit` deductions oldest first, strictly after `after`
        (time, id), before end_us: one short statement, whose connection goes
        back to the pool before the chunk is sent."""
        params = {"org_id": org_id, "end": at(end_us), "after_at": at(after[0]),
                  "after_id": uuid.UUID(after[1]), "limit": limit}
        return self._run(lambda conn: conn.execute(_EXPORT_CHUNK, params).fetchall())
