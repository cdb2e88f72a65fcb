"""`make seed-data`: a database of a year of realistic usage for the
reporting benchmark (benchmarks/reports.py), written by set-based SQL
(generate_series), never row by row from Python. See benchmarks/README.md.

    python -m benchmarks.seed_data                 # full scale: 10,000 orgs, 100,000 users, 10M deductions
    python -m benchmarks.seed_data --scale 0.01    # 1%, in seconds
    python -m benchmarks.seed_data --force         # seed again even if seeded already

By default it seeds a database of its own (orgbilling_reports, or
orgbilling_reports_<scale> below full scale) on a persistent embedded
PostgreSQL in .orgbilling/reports-bench/, and does nothing when that database
is already seeded at that scale. Every invariant of `orgbilling verify` holds
afterwards (it is checked at the end, unless --skip-verify).

The shape, at scale 1:

- 10,000 organizations, ranked by size: org-00001 is the largest. Users per
  org fall as rank^-0.6 (the largest about 1,000, the smallest 4); 100,000
  allocations in all, 4% of them users who also belong to org-00001.
- One subscription each (mostly ACTIVE; some TRIALING, PAST_DUE, CANCELED;
  some orgs with an earlier, canceled one), plans and prices from
  server/catalog.py, monthly or yearly invoices with their history events.
- 10 million deductions over the last 365 days: 12% to org-00001, the rest as
  1/rank (a long tail of orgs with ~100), users within an org skewed (a few
  heavy users), five service types with two or three service names each,
  amounts by type, busier afternoons (UTC) and usage growing over the year.
- Pools funded by a welcome grant and monthly purchases, allocations whose
  limits cover their use (10% reset MONTHLY, with their PERIOD_RESET events,
  the rest NEVER; 2% revoked), summary tables rebuilt from the rows.
"""

import argparse
import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path

import psycopg
from psycopg import sql

from orgbilling.server.catalog import CATALOG_CURRENCY, MILLICREDITS_PER_CENT, PLAN_PRICES_CENTS
from orgbilling.server.migrate import migrate
from orgbilling.server.summaries import rebuild_usage_summaries
from orgbilling.server.verify import violations

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = REPO / ".orgbilling" / "reports-bench"
# What the marker (a comment on the database) says, so a later run knows.
MARKER_KIND = "orgbilling-reports-seed"
SEED_VERSION = 1

FULL_ORGS = 10_000
FULL_USERS = 100_000
FULL_DEDUCTIONS = 10_000_000
LARGEST_ORG_SHARE = 0.12  # of the deductions: "at least a tenth"
USERS_EXPONENT = 0.6      # users of the org of rank r ~ r^-0.6
SHARED_USER_EVERY = 25    # every 25th allocation of another org is a user of org-00001
MONTHLY_ALLOCATION = 3    # allocation numbers g with g % 10 = 3 reset monthly
REVOKED_ALLOCATION = 7    # ... and those whose hash % 50 = 7 are revoked
WELCOME_GRANT_MILLICREDITS = 1_000_000  # 1,000 credits
PURCHASE_STEP_CENTS = 500               # purchases are whole $5
PURCHASES_PER_ORG = 12                  # one a month

# (service_type, service_name, share of deductions, lowest and highest amount
# in millicredits, skew: amounts are lo + (hi - lo) * random()^skew).
SERVICES = [
    ("llm", "chat-api", 0.25, 300, 60_000, 2.5),
    ("llm", "agent-runtime", 0.12, 2_000, 150_000, 2.5),
    ("llm", "summarizer", 0.08, 500, 20_000, 2.0),
    ("search", "web-search", 0.14, 4_000, 6_000, 1.0),
    ("search", "news-search", 0.06, 4_000, 8_000, 1.0),
    ("scrape", "page-scraper", 0.11, 1_000, 3_000, 1.0),
    ("scrape", "pdf-extractor", 0.04, 2_000, 12_000, 1.5),
    ("embedding", "embed-api", 0.10, 20, 800, 2.0),
    ("embedding", "doc-indexer", 0.05, 100, 4_000, 2.0),
    ("image", "image-gen", 0.04, 20_000, 80_000, 1.0),
    ("image", "image-edit", 0.01, 10_000, 40_000, 1.0),
]
LLM_MODELS = ["gpt-4o-mini", "gpt-4.1", "claude-sonnet-4", "llama-3.3-70b"]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Steps:
    """Times each step, prints it, keeps them for the marker."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.started = time.monotonic()

    @contextlib.contextmanager
    def step(self, name: str):
        log(f"  {name}...")
        began = time.monotonic()
        yield
        self.seconds[name] = time.monotonic() - began
        log(f"  {name}: {self.seconds[name]:.1f} s")

    @property
    def total_s(self) -> float:
        return time.monotonic() - self.started


def database_name(scale: float) -> str:
    if scale == 1:
        return "orgbilling_reports"
    return "orgbilling_reports_" + f"{scale:g}".replace(".", "_").replace("-", "_")


def embedded_server_url(data_dir: Path) -> str:
    from orgbilling.server.database import embedded_database_url

    return embedded_database_url(data_dir)


def ensure_database(server_url: str, name: str) -> str:
    from tests.postgres import with_database

    with psycopg.connect(server_url, autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
            conn.execute(f"CREATE DATABASE {name}")
    return with_database(server_url, name)


def tune_embedded_server(server_url: str) -> None:
    """Larger WAL between checkpoints, so the bulk load is not one long
    series of checkpoints. Only on our own embedded server."""
    with psycopg.connect(server_url, autocommit=True) as conn:
        current = conn.execute("SHOW max_wal_size").fetchone()[0]
        if current != "8GB":
            conn.execute("ALTER SYSTEM SET max_wal_size = '8GB'")
            conn.execute("SELECT pg_reload_conf()")


def read_marker(conn: psycopg.Connection) -> dict | None:
    comment = conn.execute(
        "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = current_database()"
    ).fetchone()[0]
    try:
        marker = json.loads(comment or "")
    except ValueError:
        return None
    return marker if isinstance(marker, dict) and marker.get("kind") == MARKER_KIND else None


def write_marker(conn: psycopg.Connection, marker: dict | None) -> None:
    name = conn.execute("SELECT current_database()").fetchone()[0]
    text = json.dumps(marker) if marker else None
    conn.execute(sql.SQL("COMMENT ON DATABASE {} IS {}").format(
        sql.Identifier(name), sql.Literal(text)))


def is_empty(conn: psycopg.Connection) -> bool:
    return not conn.execute(
        "SELECT EXISTS (SELECT FROM organizations) OR EXISTS (SELECT FROM credit_usage_attribution)"
    ).fetchone()[0]


SUMMARY_TABLES = ["usage_daily", "user_usage_daily", "user_usage_monthly", "org_usage_running",
                  "user_usage_running"]

LEDGER_TABLES = [
    "credit_usage_attribution", "usage_daily", "user_usage_daily", "user_usage_monthly",
    "org_usage_running", "user_usage_running",
    "org_billing_history", "invoices", "idempotency_records", "user_credit_allocations",
    "organization_credit_pools", "organization_subscriptions", "organizations",
]


def sizes(conn: psycopg.Connection) -> dict:
    rows = {table: conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            for table in LEDGER_TABLES if table != "idempotency_records"}
    largest = conn.execute("""
        SELECT o.org_id,
               (SELECT count(*) FROM user_credit_allocations a WHERE a.org_id = o.org_id),
               (SELECT sum(request_count) FROM usage_daily d WHERE d.org_id = o.org_id)
          FROM organizations o WHERE o.org_id = 'org-00001'""").fetchone()
    bytes_ = conn.execute(
        "SELECT pg_database_size(current_database()),"
        " pg_total_relation_size('credit_usage_attribution')").fetchone()
    return {
        "rows": rows,
        "largest_org": {"org_id": largest[0], "users": largest[1], "deductions": int(largest[2] or 0)},
        "database_mb": round(bytes_[0] / 2**20),
        "attribution_with_indexes_mb": round(bytes_[1] / 2**20),
    }


# The generation, one set-based statement at a time. %(name)s are the run's
# parameters (see Seeder.params); {name} are Python-built SQL fragments.

def _service_index_case(column: str) -> str:
    arms, cumulative = [], 0.0
    for number, service in enumerate(SERVICES[:-1], start=1):
        cumulative += service[2]
        arms.append(f"WHEN {column} < {cumulative:.6f} THEN {number}")
    return f"CASE {' '.join(arms)} ELSE {len(SERVICES)} END"


SETUP = [
    "SET statement_timeout = 0",
    "SET TimeZone = 'UTC'",
    "SET maintenance_work_mem = '1GB'",
    "SET work_mem = '512MB'",
    "SET max_parallel_maintenance_workers = 1",
    "SET synchronous_commit = off",
    # The user id of allocation number g: its own, or (every 25th allocation of
    # an org other than the largest) one of the largest org's users, who are
    # allocations 1..top_users. Distinct within every org (see the README).
    """CREATE FUNCTION pg_temp.seed_user_id(g int, org_no int, top_users int) RETURNS text
       LANGUAGE sql IMMUTABLE AS $$
         SELECT 'user-' || lpad((CASE WHEN org_no > 1 AND g % 25 = 0
                                      THEN (g / 25) % top_users + 1 ELSE g END)::text, 6, '0')
       $$""",
    # Months from the allocation's UTC month to the row's: its period number.
    """CREATE FUNCTION pg_temp.months_between(a timestamptz, b timestamptz) RETURNS int
       LANGUAGE sql IMMUTABLE AS $$
         SELECT (12 * (extract(year FROM b) - extract(year FROM a))
                 + extract(month FROM b) - extract(month FROM a))::int
       $$""",
]

STEPS: list[tuple[str, list[str]]] = [
    ("organizations", [
        # Ranks, users and deductions per org. Rounding leaves the largest org
        # with the remainder, so the totals are exact.
        """CREATE UNLOGGED TABLE seed_orgs AS
           WITH w AS (
               SELECT r, power(r, -%(users_exponent)s::float8) AS wu,
                      CASE WHEN r > 1 THEN 1.0 / r END AS wr
                 FROM generate_series(1, %(orgs)s) AS r),
           t AS (SELECT sum(wu) AS su, coalesce(sum(wr), 1) AS sr FROM w)
           SELECT r AS org_no, 'org-' || lpad(r::text, 5, '0') AS org_id,
                  greatest(1, round(%(users)s * wu / su))::int AS n_users,
                  (CASE WHEN r = 1 THEN round(%(deductions)s * %(largest_share)s)
                        ELSE greatest(1, round(%(deductions)s * (1 - %(largest_share)s) * wr / sr)) END
                  )::bigint AS n_rows,
                  %(now)s - interval '366 days' - random() * interval '60 days' AS created_at,
                  random() AS r_status, random() AS r_plan, random() AS r_cycle,
                  random() AS r_prior, random() AS r_when
             FROM w, t""",
        """UPDATE seed_orgs SET
               n_users = n_users + %(users)s - (SELECT sum(n_users) FROM seed_orgs),
               n_rows = n_rows + %(deductions)s - (SELECT sum(n_rows) FROM seed_orgs)
            WHERE org_no = 1""",
        """ALTER TABLE seed_orgs ADD COLUMN first_g int""",
        """UPDATE seed_orgs o SET first_g = c.first_g
             FROM (SELECT org_no, (sum(n_users) OVER (ORDER BY org_no) - n_users + 1)::int AS first_g
                     FROM seed_orgs) c
            WHERE c.org_no = o.org_no""",
        """ALTER TABLE seed_orgs ADD PRIMARY KEY (org_no)""",
        """ANALYZE seed_orgs""",
        """INSERT INTO organizations (org_id, created_at)
           SELECT org_id, created_at FROM seed_orgs ORDER BY org_no""",
    ]),
    ("subscriptions", [
        # The current subscription of each org, and for some an earlier one,
        # canceled. The largest org: ACTIVE, PLATFORM, YEARLY.
        """CREATE UNLOGGED TABLE seed_subscriptions AS
           WITH current AS (
               SELECT o.org_no, o.org_id, o.created_at AS org_created_at, o.r_when,
                      CASE WHEN o.org_no = 1 THEN 'ACTIVE'
                           WHEN o.r_status < 0.05 THEN 'CANCELED'
                           WHEN o.r_status < 0.09 THEN 'PAST_DUE'
                           WHEN o.r_status < 0.13 THEN 'TRIALING'
                           ELSE 'ACTIVE' END AS status,
                      CASE WHEN o.org_no = 1 THEN 'PLATFORM'
                           WHEN o.r_plan < 0.5 THEN 'PLATFORM'
                           WHEN o.r_plan < 0.8 THEN 'HYBRID' ELSE 'BYOK' END AS plan,
                      CASE WHEN o.org_no = 1 OR o.r_cycle < 0.25 THEN 'YEARLY' ELSE 'MONTHLY' END AS cycle,
                      (o.r_prior < 0.03 AND o.org_no > 1) AS has_prior
                 FROM seed_orgs o),
           dated AS (
               SELECT c.*,
                      -- A trial began within the last two weeks, after an earlier
                      -- subscription ended; some others changed plan mid-year.
                      CASE WHEN c.status = 'TRIALING' THEN %(now)s - c.r_when * interval '13 days'
                           WHEN c.has_prior THEN %(now)s - interval '300 days' + c.r_when * interval '200 days'
                           ELSE c.org_created_at END AS created_at
                 FROM current c)
           SELECT org_no, org_id, 2 AS seq, status, plan, cycle, created_at,
                  CASE WHEN status = 'CANCELED' THEN %(now)s - r_when * interval '60 days' END AS canceled_at
             FROM dated
           UNION ALL
           SELECT org_no, org_id, 1, 'CANCELED',
                  CASE WHEN plan = 'PLATFORM' THEN 'HYBRID' ELSE 'PLATFORM' END, 'MONTHLY',
                  org_created_at, created_at - interval '1 hour'
             FROM dated WHERE status = 'TRIALING' OR has_prior""",
        """ALTER TABLE seed_subscriptions
               ADD COLUMN subscription_id uuid, ADD COLUMN price_cents bigint,
               ADD COLUMN cycle_length interval, ADD COLUMN periods int""",
        # periods: how many billing periods began up to now (or the cancel).
        """UPDATE seed_subscriptions s SET
               subscription_id = uuidv7(s.created_at - %(now)s),
               price_cents = (%(prices)s::int8[])[array_position(%(price_keys)s::text[], s.plan || '/' || s.cycle)],
               cycle_length = CASE s.cycle WHEN 'MONTHLY' THEN interval '1 month' ELSE interval '1 year' END,
               periods = CASE WHEN s.status = 'TRIALING' THEN 0 ELSE (
                   SELECT count(*) FROM generate_series(
                       0, 400, 1) AS k
                    WHERE s.created_at + k * CASE s.cycle WHEN 'MONTHLY' THEN interval '1 month'
                                                         ELSE interval '1 year' END
                          <= coalesce(s.canceled_at, %(now)s)) END""",
        """INSERT INTO organization_subscriptions (
               org_id, subscription_id, plan, billing_cycle, status, price_cents, currency,
               current_period_start, current_period_end, period_anchor, trial_end,
               external_customer_id, external_subscription_id,
               created_at, updated_at, canceled_at)
           SELECT org_id, subscription_id, plan, cycle, status, price_cents, %(currency)s,
                  CASE WHEN status = 'TRIALING' THEN created_at
                       ELSE created_at + (periods - 1) * cycle_length END,
                  CASE WHEN status = 'TRIALING' THEN created_at + interval '14 days'
                       ELSE created_at + periods * cycle_length END,
                  -- The period's end as its own anchor, as 0007 set existing ones.
                  CASE WHEN status = 'TRIALING' THEN created_at + interval '14 days'
                       ELSE created_at + periods * cycle_length END,
                  CASE WHEN status = 'TRIALING' THEN created_at + interval '14 days' END,
                  'cus_' || substr(md5(org_id), 1, 14), 'sub_' || substr(md5(subscription_id::text), 1, 14),
                  created_at, coalesce(canceled_at, created_at), canceled_at
             FROM seed_subscriptions ORDER BY created_at""",
    ]),
    ("invoices", [
        # One invoice per billing period begun: PAID, but the last one of a
        # PAST_DUE subscription FAILED and one begun in the last two days still
        # CREATED; 2% were paid after a failed attempt.
        """CREATE UNLOGGED TABLE seed_invoices AS
           SELECT s.org_no, s.org_id, s.subscription_id, s.price_cents,
                  'in_' || substr(md5(s.subscription_id::text || k), 1, 24) AS external_invoice_id,
                  s.created_at + k * s.cycle_length AS period_start,
                  s.created_at + (k + 1) * s.cycle_length AS period_end,
                  CASE WHEN s.status = 'PAST_DUE' AND k = s.periods - 1 THEN 'FAILED'
                       WHEN s.created_at + k * s.cycle_length > %(now)s - interval '2 days' THEN 'CREATED'
                       ELSE 'PAID' END AS status,
                  random() < 0.02 AS failed_first,
                  random() AS r_delay
             FROM seed_subscriptions s, generate_series(0, s.periods - 1) AS k""",
        """INSERT INTO invoices (org_id, external_invoice_id, status, amount_cents, currency,
                                 period_start, period_end, created_at, updated_at)
           SELECT org_id, external_invoice_id, status, price_cents, %(currency)s,
                  period_start, period_end, period_start + interval '5 minutes',
                  CASE status WHEN 'CREATED' THEN period_start + interval '5 minutes'
                              ELSE least(%(now)s, period_start + interval '1 hour' + r_delay * interval '3 days') END
             FROM seed_invoices ORDER BY period_start""",
    ]),
    ("pools and allocations", [
        """INSERT INTO organization_credit_pools (org_id, updated_at, period_ends_at)
           SELECT o.org_id, o.created_at, s.current_period_end
             FROM seed_orgs AS o
             LEFT JOIN organization_subscriptions AS s
               ON s.org_id = o.org_id AND s.status IN ('TRIALING', 'ACTIVE', 'PAST_DUE')
            ORDER BY o.org_no""",
        """INSERT INTO user_credit_allocations (
               org_id, user_id, limit_millicredits, reset_period, period_number, next_reset_at,
               created_at, updated_at)
           SELECT o.org_id, pg_temp.seed_user_id(g, o.org_no, %(top_users)s), 0,
                  CASE WHEN g %% 10 = %(monthly)s THEN 'MONTHLY' ELSE 'NEVER' END,
                  CASE WHEN g %% 10 = %(monthly)s
                       THEN pg_temp.months_between(o.created_at + (g * 37 %% 720) * interval '1 minute', %(now)s)
                       ELSE 0 END,
                  CASE WHEN g %% 10 = %(monthly)s
                       THEN date_trunc('month', %(now)s) + interval '1 month' END,
                  o.created_at + (g * 37 %% 720) * interval '1 minute',
                  o.created_at + (g * 37 %% 720) * interval '1 minute'
             FROM seed_orgs o, generate_series(o.first_g, o.first_g + o.n_users - 1) AS g
            ORDER BY o.org_no, g""",
    ]),
    ("deductions: skeleton", [
        # Narrow rows first (org, allocation, time, two random numbers), sorted
        # by time below so the table is in time order as a real one is, each
        # org's rows spread among everyone's.
        """CREATE UNLOGGED TABLE seed_skeleton AS
           SELECT o.org_no,
                  o.first_g + floor(o.n_users * power(random(), 2))::int AS g,
                  date_trunc('day', %(now)s - interval '365 days')
                    + floor(366 * CASE WHEN random() < 0.5 THEN random() ELSE sqrt(random()) END)
                      * interval '1 day'
                    + ((14 + 8 * (random() + random() + random() - 1.5) + 48)::numeric %% 24)
                      * interval '1 hour' AS created_at,
                  random() AS r_service, random() AS r_amount
             FROM seed_orgs o, generate_series(1, o.n_rows)""",
        # Keep it inside [now - 365 days, now).
        """UPDATE seed_skeleton SET created_at = CASE
               WHEN created_at >= %(now)s THEN created_at - interval '1 day'
               ELSE created_at + interval '1 day' END
            WHERE created_at >= %(now)s OR created_at < %(now)s - interval '365 days'""",
    ]),
    ("deductions: insert", [
        # The indexes and keys are built after the load, by a sort each: many
        # times faster than keeping them up to date row by row.
        "__drop_attribution_indexes__",
        """INSERT INTO credit_usage_attribution (
               org_id, deduction_id, user_id, amount_millicredits, service_type, service_name,
               idempotency_key, request_hash, request_id, metadata, allocation_period,
               allocation_remaining_after, pool_spendable_after, created_at)
           SELECT o.org_id, uuidv7(x.created_at - %(now)s), x.user_id, x.amount,
                  (%(service_types)s::text[])[x.service], (%(service_names)s::text[])[x.service],
                  x.idempotency_key, sha256(convert_to(x.idempotency_key, 'UTF8')),
                  gen_random_uuid()::text,
                  CASE (%(service_types)s::text[])[x.service]
                    WHEN 'llm' THEN jsonb_build_object(
                        'model', (%(llm_models)s::text[])[1 + (x.g + x.service) %% %(llm_model_count)s],
                        'input_tokens', (x.amount / 3)::text, 'output_tokens', (x.amount / 12)::text)
                    WHEN 'search' THEN jsonb_build_object('results', '10')
                    WHEN 'scrape' THEN jsonb_build_object('pages', (1 + x.amount / 4000)::text)
                    WHEN 'embedding' THEN jsonb_build_object(
                        'model', 'text-embedding-3-small', 'tokens', (x.amount * 10)::text)
                    ELSE jsonb_build_object('model', 'image-1', 'size', '1024x1024') END,
                  CASE WHEN x.g %% 10 = %(monthly)s
                       THEN pg_temp.months_between(o.created_at + (x.g * 37 %% 720) * interval '1 minute',
                                                   x.created_at)
                       ELSE 0 END,
                  0, 0, x.created_at
             FROM (SELECT y.*,
                          ((%(amount_lo)s::int8[])[y.service]
                           + floor(((%(amount_hi)s::int8[])[y.service] - (%(amount_lo)s::int8[])[y.service])
                                   * power(y.r_amount, (%(amount_skew)s::float8[])[y.service])))::bigint AS amount
                     FROM (SELECT s.*, pg_temp.seed_user_id(s.g, s.org_no, %(top_users)s) AS user_id,
                                  {service_index} AS service,
                                  gen_random_uuid()::text AS idempotency_key
                             FROM seed_skeleton s OFFSET 0) y) x
             JOIN seed_orgs o USING (org_no)
            ORDER BY x.created_at""",
        "DROP TABLE seed_skeleton",
    ]),
    ("deductions: indexes and keys", ["__restore_attribution_indexes__"]),
    ("summaries", ["__rebuild_summaries__"]),
    ("allocations: limits and use", [
        # Per allocation: lifetime use, this period's use (this UTC month for a
        # monthly one) and the last use, from the monthly summary.
        """CREATE UNLOGGED TABLE seed_allocation_use AS
           SELECT org_id, user_id, sum(used_millicredits) AS lifetime,
                  sum(used_millicredits) FILTER (WHERE month = date_trunc('month', %(now)s)::date) AS this_month,
                  max(used_millicredits) AS busiest_month_service,
                  max(last_used_at) AS last_used_at
             FROM user_usage_monthly GROUP BY org_id, user_id""",
        """ALTER TABLE seed_allocation_use ADD PRIMARY KEY (org_id, user_id)""",
        # Limits cover the use with room to spare, in whole 1,000 credits;
        # revoked ones are 0, as the schema wants.
        """UPDATE user_credit_allocations a SET
               used_millicredits = CASE a.reset_period WHEN 'NEVER' THEN x.lifetime ELSE x.this_month END,
               limit_millicredits = CASE WHEN x.revoked THEN 0 ELSE 1000000 * (1 + ceil(
                   CASE a.reset_period WHEN 'NEVER'
                        THEN x.lifetime * (1.2 + (hashtext(a.user_id) & 3) * 0.3)
                        ELSE greatest(x.this_month * 1.3, x.lifetime / 6.0) END
                   / 1000000.0)) END::bigint,
               revoked_at = CASE WHEN x.revoked THEN x.revoked_at END,
               updated_at = CASE WHEN x.revoked THEN x.revoked_at ELSE a.created_at END
             FROM (SELECT a2.org_id, a2.user_id,
                          coalesce(u.lifetime, 0) AS lifetime, coalesce(u.this_month, 0) AS this_month,
                          abs(hashtext(a2.org_id || '/' || a2.user_id)) %% 50 = %(revoked)s
                            AND a2.user_id <> 'user-000001' AS revoked,
                          least(%(now)s - interval '1 minute',
                                coalesce(u.last_used_at, a2.created_at) + interval '1 hour') AS revoked_at
                     FROM user_credit_allocations a2
                     LEFT JOIN seed_allocation_use u USING (org_id, user_id)) x
            WHERE x.org_id = a.org_id AND x.user_id = a.user_id""",
    ]),
    ("billing history", [
        # Subscriptions created and canceled.
        """INSERT INTO org_billing_history (org_id, event_id, event_type, subscription_id, details,
                                            idempotency_key, request_id, created_at)
           SELECT org_id, uuidv7(at - %(now)s), event_type, subscription_id, details,
                  gen_random_uuid()::text, gen_random_uuid()::text, at
             FROM (SELECT org_id, created_at AS at, 'SUBSCRIPTION_CREATED' AS event_type, subscription_id,
                          jsonb_build_object('plan', plan, 'billing_cycle', cycle, 'price_cents', price_cents,
                                             'trial_days', CASE WHEN status = 'TRIALING' THEN 14 ELSE 0 END)
                            AS details
                     FROM seed_subscriptions
                   UNION ALL
                   SELECT org_id, canceled_at, 'SUBSCRIPTION_CANCELED', subscription_id,
                          jsonb_build_object('reason', 'customer request')
                     FROM seed_subscriptions WHERE canceled_at IS NOT NULL) e
            ORDER BY at""",
        # Allocations set, revoked, and reset each month.
        """INSERT INTO org_billing_history (org_id, event_id, event_type, user_id, details,
                                            idempotency_key, request_id, created_at)
           SELECT org_id, uuidv7(at - %(now)s), event_type, user_id, details, key, request_id, at
             FROM (SELECT org_id, created_at AS at, 'ALLOCATION_CHANGED' AS event_type, user_id,
                          jsonb_build_object('old_limit', 0,
                              'new_limit', CASE WHEN revoked_at IS NULL THEN limit_millicredits
                                                ELSE 1000000 END,
                              'reset_period', reset_period) AS details,
                          gen_random_uuid()::text AS key, gen_random_uuid()::text AS request_id
                     FROM user_credit_allocations
                   UNION ALL
                   SELECT org_id, revoked_at, 'ALLOCATION_REVOKED', user_id,
                          jsonb_build_object('old_limit', 1000000),
                          gen_random_uuid()::text, gen_random_uuid()::text
                     FROM user_credit_allocations WHERE revoked_at IS NOT NULL
                   UNION ALL
                   SELECT a.org_id, m.month_start, 'PERIOD_RESET', a.user_id,
                          jsonb_build_object('used_before', coalesce((
                              SELECT sum(used_millicredits) FROM user_usage_monthly s
                               WHERE s.org_id = a.org_id AND s.user_id = a.user_id
                                 AND s.month = (m.month_start - interval '1 month')::date), 0),
                              'period_number', m.period_number),
                          NULL, ''
                     FROM user_credit_allocations a
                     CROSS JOIN LATERAL (
                         SELECT date_trunc('month', a.created_at) + k * interval '1 month' AS month_start,
                                k AS period_number
                           FROM generate_series(1, a.period_number) AS k) m
                    WHERE a.reset_period = 'MONTHLY') e
            ORDER BY at""",
        # Invoices: created, failed, paid.
        """INSERT INTO org_billing_history (org_id, event_id, event_type, subscription_id,
                                            external_invoice_id, amount_paid_cents, currency, details,
                                            idempotency_key, request_id, created_at)
           SELECT org_id, uuidv7(at - %(now)s), event_type, subscription_id, external_invoice_id,
                  price_cents, %(currency)s,
                  jsonb_build_object('period_start', period_start, 'period_end', period_end),
                  gen_random_uuid()::text, gen_random_uuid()::text, at
             FROM (SELECT *, period_start + interval '5 minutes' AS at, 'INVOICE_CREATED' AS event_type
                     FROM seed_invoices
                   UNION ALL
                   SELECT *, least(%(now)s - interval '1 minute',
                                   period_start + interval '1 hour' + r_delay * interval '1 day'),
                          'INVOICE_PAYMENT_FAILED'
                     FROM seed_invoices WHERE status = 'FAILED' OR (status = 'PAID' AND failed_first)
                   UNION ALL
                   SELECT *, least(%(now)s - interval '1 minute',
                                   period_start + interval '1 hour'
                                   + r_delay * interval '1 day' * CASE WHEN failed_first THEN 3 ELSE 1 END
                                   + interval '1 minute'),
                          'INVOICE_PAID'
                     FROM seed_invoices WHERE status = 'PAID') e
            ORDER BY at""",
        # Credits: a welcome grant, then monthly purchases of whole $5 that
        # cover what the org allocated and used, with a tenth to spare.
        """CREATE UNLOGGED TABLE seed_funding AS
           SELECT o.org_no, o.org_id, o.created_at,
                  greatest(0, ceil((greatest(coalesce(a.allocated, 0), coalesce(u.used, 0)) * 1.1
                                    - %(grant)s)
                                   / %(purchases)s / %(millicredits_per_cent)s / %(purchase_step)s)
                  )::bigint * %(purchase_step)s AS purchase_cents
             FROM seed_orgs o
             LEFT JOIN (SELECT org_id, sum(limit_millicredits) AS allocated
                          FROM user_credit_allocations GROUP BY org_id) a USING (org_id)
             LEFT JOIN (SELECT org_id, sum(lifetime) AS used
                          FROM seed_allocation_use GROUP BY org_id) u USING (org_id)""",
        """INSERT INTO org_billing_history (org_id, event_id, event_type, credits_delta_millicredits,
                                            credit_source, payment_reference, amount_paid_cents, currency,
                                            details, idempotency_key, request_id, created_at)
           SELECT org_id, uuidv7(at - %(now)s), 'CREDITS_ADDED', delta, source, reference, cents,
                  CASE WHEN cents IS NOT NULL THEN %(currency)s END,
                  jsonb_build_object('reason', reason), gen_random_uuid()::text, gen_random_uuid()::text, at
             FROM (SELECT org_id, created_at + interval '1 minute' AS at, %(grant)s::bigint AS delta,
                          'GRANT' AS source, NULL AS reference, NULL::bigint AS cents,
                          'welcome credits' AS reason
                     FROM seed_funding
                   UNION ALL
                   SELECT org_id, created_at + interval '2 minutes' + k * interval '1 month',
                          purchase_cents * %(millicredits_per_cent)s, 'PURCHASE',
                          'pi_' || substr(md5(org_id || '/' || k), 1, 24), purchase_cents, 'monthly top-up'
                     FROM seed_funding, generate_series(0, %(purchases)s - 1) AS k
                    WHERE purchase_cents > 0) e
            ORDER BY at""",
    ]),
    ("pools: totals", [
        """UPDATE organization_credit_pools p SET
               total_millicredits = f.total, allocated_millicredits = coalesce(a.allocated, 0),
               used_millicredits = coalesce(u.used, 0), updated_at = %(now)s
             FROM (SELECT org_id, sum(credits_delta_millicredits) AS total FROM org_billing_history
                    WHERE event_type = 'CREDITS_ADDED' GROUP BY org_id) f
             LEFT JOIN (SELECT org_id, sum(limit_millicredits) AS allocated
                          FROM user_credit_allocations GROUP BY org_id) a USING (org_id)
             LEFT JOIN (SELECT org_id, sum(lifetime) AS used
                          FROM seed_allocation_use GROUP BY org_id) u USING (org_id)
            WHERE p.org_id = f.org_id""",
        "DROP TABLE seed_orgs, seed_subscriptions, seed_invoices, seed_allocation_use, seed_funding",
    ]),
    ("vacuum and analyze", ["__vacuum__"]),
]


# The seed's own tables, unlogged, dropped when done.
WORK_TABLES = ["seed_orgs", "seed_subscriptions", "seed_invoices", "seed_skeleton",
               "seed_allocation_use", "seed_funding"]


class Seeder:
    def __init__(self, url: str, scale: float):
        self.url = url
        self.scale = scale
        orgs = max(10, round(FULL_ORGS * scale))
        users = max(orgs, round(FULL_USERS * scale))
        deductions = max(orgs, round(FULL_DEDUCTIONS * scale))
        self.counts = {"orgs": orgs, "users": users, "deductions": deductions}
        self.saved_indexes: list[str] = []

    def params(self, conn: psycopg.Connection) -> dict:
        now = conn.execute("SELECT date_trunc('second', now())").fetchone()[0]
        keys = [f"{plan}/{cycle}" for plan, cycle in PLAN_PRICES_CENTS]
        return {
            "now": now,
            **self.counts,
            "users_exponent": USERS_EXPONENT,
            "largest_share": LARGEST_ORG_SHARE,
            "monthly": MONTHLY_ALLOCATION,
            "revoked": REVOKED_ALLOCATION,
            "currency": CATALOG_CURRENCY,
            "prices": list(PLAN_PRICES_CENTS.values()),
            "price_keys": keys,
            "service_types": [service[0] for service in SERVICES],
            "service_names": [service[1] for service in SERVICES],
            "amount_lo": [service[3] for service in SERVICES],
            "amount_hi": [service[4] for service in SERVICES],
            "amount_skew": [float(service[5]) for service in SERVICES],
            "llm_models": LLM_MODELS,
            "llm_model_count": len(LLM_MODELS),
            "grant": WELCOME_GRANT_MILLICREDITS,
            "purchases": PURCHASES_PER_ORG,
            "purchase_step": PURCHASE_STEP_CENTS,
            "millicredits_per_cent": MILLICREDITS_PER_CENT,
        }

    def run(self, conn: psycopg.Connection, steps: Steps) -> None:
        for statement in SETUP:
            conn.execute(statement)
        conn.execute("SELECT setseed(0.42)")
        params = self.params(conn)
        self.anchor = params["now"]
        # top_users is known once the organizations exist.
        with contextlib.ExitStack() as load:
            for name, statements in STEPS:
                # The attribution table's keys are dropped, the rows loaded and
                # the keys built again in one transaction: if interrupted,
                # nothing is lost.
                if statements[0] == "__drop_attribution_indexes__":
                    load.enter_context(conn.transaction())
                with steps.step(name):
                    for statement in statements:
                        self.execute(conn, statement, params)
                if statements[-1] == "__restore_attribution_indexes__":
                    load.close()
                if name == "organizations":
                    params["top_users"] = conn.execute(
                        "SELECT n_users FROM seed_orgs WHERE org_no = 1").fetchone()[0]

    def execute(self, conn: psycopg.Connection, statement: str, params: dict) -> None:
        if statement == "__drop_attribution_indexes__":
            self.drop_attribution_indexes(conn)
        elif statement == "__restore_attribution_indexes__":
            self.restore_attribution_indexes(conn)
        elif statement == "__rebuild_summaries__":
            self.rebuild_summaries(conn)
        elif statement == "__vacuum__":
            for table in LEDGER_TABLES:
                conn.execute(f"VACUUM (ANALYZE) {table}")
        else:
            conn.execute(statement.replace("{service_index}", _service_index_case("s.r_service")),
                         params if "%(" in statement else None)

    def rebuild_summaries(self, conn: psycopg.Connection) -> None:
        """rebuild_usage_summaries, with the summary tables' primary keys
        dropped meanwhile and built again after, by a sort each: inserting
        millions of rows in hash order into a key larger than shared_buffers
        is several times slower. All in one transaction."""
        with conn.transaction():
            keys = conn.execute("""
                SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) FROM pg_constraint
                 WHERE conrelid = ANY(%s::regclass[])
                   AND contype = 'p'""", (SUMMARY_TABLES,)).fetchall()
            for table, name, _ in keys:
                conn.execute(f"ALTER TABLE {table} DROP CONSTRAINT {name}")
            rebuild_usage_summaries(conn)
            for table, name, definition in keys:
                conn.execute(f"ALTER TABLE {table} ADD CONSTRAINT {name} {definition}")

    def drop_attribution_indexes(self, conn: psycopg.Connection) -> None:
        """Drops credit_usage_attribution's keys and indexes, keeping their
        definitions to build them again after the load."""
        constraints = conn.execute("""
            SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint
             WHERE conrelid = 'credit_usage_attribution'::regclass AND contype IN ('p', 'u', 'f')
             ORDER BY contype DESC""").fetchall()  # p, u before f when restored? see below
        indexes = conn.execute("""
            SELECT indexname, indexdef FROM pg_indexes
             WHERE tablename = 'credit_usage_attribution' AND schemaname = current_schema()
               AND indexname NOT IN (SELECT conname FROM pg_constraint
                                      WHERE conrelid = 'credit_usage_attribution'::regclass)""").fetchall()
        self.saved_indexes = (
            [f"ALTER TABLE credit_usage_attribution ADD CONSTRAINT {name} {definition}"
             for name, definition in constraints]
            + [definition for _, definition in indexes])
        for name, _ in sorted(constraints, key=lambda c: "FOREIGN" not in c[1]):
            conn.execute(f"ALTER TABLE credit_usage_attribution DROP CONSTRAINT {name}")
        for name, _ in indexes:
            conn.execute(f"DROP INDEX {name}")

    def restore_attribution_indexes(self, conn: psycopg.Connection) -> None:
        # Keys first; the foreign key last, which checks every row against
        # the allocations in one join.
        for statement in sorted(self.saved_indexes, key=lambda s: "FOREIGN KEY" in s):
            began = time.monotonic()
            conn.execute(statement)
            log(f"    {statement[:90]}... {time.monotonic() - began:.1f} s")


def seed(url: str, scale: float, *, force: bool = False, verify: bool = True) -> dict:
    """Seeds the database at url at `scale` unless it is seeded at that scale
    already (then returns its marker); returns the marker written."""
    migrate(url)
    with psycopg.connect(url, autocommit=True) as conn:
        marker = read_marker(conn)
        if marker and marker.get("scale") == scale and marker.get("version") == SEED_VERSION \
                and marker.get("complete") and not force:
            log(f"already seeded at scale {scale:g} on {marker.get('seeded_at')}: nothing to do"
                " (--force to seed again)")
            return marker
        if not is_empty(conn):
            if not marker and not force:
                raise SystemExit("the database holds data it did not seed: refusing to empty it"
                                 " (--force empties its ledger tables)")
            log("emptying the ledger tables...")
            conn.execute("SET statement_timeout = 0")
            conn.execute(f"TRUNCATE {', '.join(LEDGER_TABLES)}")
        for table in WORK_TABLES:
            conn.execute(f"DROP TABLE IF EXISTS {table}")
        # Marks the database as ours before anything is written, so that an
        # interrupted seed is emptied by the next run, not refused.
        write_marker(conn, {"kind": MARKER_KIND, "version": SEED_VERSION, "scale": scale,
                            "complete": False})
        seeder = Seeder(url, scale)
        log(f"seeding at scale {scale:g}: {seeder.counts['orgs']:,} orgs, {seeder.counts['users']:,}"
            f" allocations, {seeder.counts['deductions']:,} deductions")
        steps = Steps()
        seeder.run(conn, steps)
        found = {}
        if verify:
            with steps.step("verify"):
                found = violations(url)
        if found:
            for name, rows in found.items():
                log(f"  INVARIANT BROKEN: {name}: {len(rows)} rows, e.g. {rows[:3]}")
            raise SystemExit("the seed breaks invariants (see above)")
        marker = {
            "kind": MARKER_KIND, "version": SEED_VERSION, "scale": scale, "complete": True,
            "seeded_at": conn.execute("SELECT now()::text").fetchone()[0],
            "data_ends_at": str(seeder.anchor),
            "seconds": {name: round(seconds, 1) for name, seconds in steps.seconds.items()},
            "total_s": round(steps.total_s, 1),
            **sizes(conn),
        }
        write_marker(conn, marker)
        conn.execute("CHECKPOINT")
    log(f"seeded in {marker['total_s']:.0f} s")
    return marker


def resolve_url(database_url: str | None, scale: float, data_dir: Path) -> str:
    if database_url:
        return database_url
    server_url = embedded_server_url(data_dir)
    tune_embedded_server(server_url)
    return ensure_database(server_url, database_name(scale))


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.seed_data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0,
                        help="fraction of the full size (1: 10,000 orgs, 10M deductions; 0.01 for a quick run)")
    parser.add_argument("--database-url", default=os.environ.get("ORGBILLING_REPORTS_DATABASE_URL"),
                        help="the database to seed (default: a persistent embedded PostgreSQL in"
                             f" {DEFAULT_DATA_DIR.relative_to(REPO)}/, database {database_name(1)})")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR,
                        help="the embedded PostgreSQL's directory, without --database-url")
    parser.add_argument("--force", action="store_true",
                        help="seed again even if seeded at this scale (empties the ledger tables)")
    parser.add_argument("--skip-verify", action="store_true",
                        help="skip the invariant check at the end (minutes at full scale)")
    arguments = parser.parse_args(argv)
    if not 0 < arguments.scale <= 10:
        parser.error("--scale must be in (0, 10]")
    return arguments


def main(argv: list[str] | None = None) -> None:
    arguments = parse_arguments(argv)
    url = resolve_url(arguments.database_url, arguments.scale, arguments.data_dir)
    marker = seed(url, arguments.scale, force=arguments.force, verify=not arguments.skip_verify)
    print(json.dumps({"database_url": url, **marker}, indent=2, default=str))


if __name__ == "__main__":
    main()
