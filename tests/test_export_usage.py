"""ExportUsage through a real server: every deduction of a range exactly
once, oldest first, in chunks; resumable after any chunk; bounded at the
instant it started; and a cancelled stream holds no connection.

The big export streams EXPORT_ROWS bulk-inserted rows: 250,000 by default,
about 12 s on a 2-core machine; ORGBILLING_TEST_EXPORT_ROWS=1000000 runs the
million-row check (about 40 s: 20 s of it inserting the rows).
"""

import hashlib
import os
import time

import grpc
import psycopg
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from orgbilling.v1 import credit_service_pb2 as cp
from orgbilling.v1 import reporting_service_pb2 as rp
from orgbilling.v1 import reporting_service_pb2_grpc
from orgbilling.server.report_store import ReportStore
from orgbilling.server.summaries import rebuild_usage_summaries
from tests.support import Client, field_violations, new_key, raises_rpc

CODE = grpc.StatusCode
EXPORT_ROWS = int(os.environ.get("ORGBILLING_TEST_EXPORT_ROWS", "250000"))
BIG_USERS = 10

# Rows in bulk, at times of our choosing: three rows share each millisecond
# (as a group-committed batch shares its transaction's time), so the
# deduction id decides their order; one row in 1,000 has metadata.
FILL = """
INSERT INTO credit_usage_attribution (
    org_id, user_id, amount_millicredits, service_type, service_name, idempotency_key,
    request_hash, request_id, metadata, allocation_period, allocation_remaining_after,
    pool_spendable_after, created_at)
SELECT %(org_id)s, 'u' || (g %% %(users)s), 1 + g %% 7, 'llm', 'svc-' || (g %% 5), 'bulk-' || g,
       '\\x00'::bytea, 'req-' || g,
       CASE WHEN g %% 1000 = 0 THEN jsonb_build_object('n', g::text) ELSE '{}' END,
       0, 0, 0, now() - interval '2 days' + (g / 3) * interval '1 millisecond'
  FROM generate_series(1, %(rows)s) AS g
"""
CHARGE = [
    """UPDATE organization_credit_pools SET used_millicredits = used_millicredits
           + (SELECT sum(amount_millicredits) FROM credit_usage_attribution WHERE org_id = %(org_id)s)
        WHERE org_id = %(org_id)s""",
    """UPDATE user_credit_allocations AS a SET used_millicredits = s.used
         FROM (SELECT user_id, sum(amount_millicredits) AS used FROM credit_usage_attribution
                WHERE org_id = %(org_id)s GROUP BY user_id) AS s
        WHERE a.org_id = %(org_id)s AND a.user_id = s.user_id""",
]


def fill(database_url, org_id, rows):
    """Adds `rows` deductions to org_id in one statement, charged to its pool
    and allocations, its usage summaries rebuilt."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("SET statement_timeout = 0")
        # Every row references an allocation that exists: skip the per-row
        # foreign key check, most of the time of the insert.
        conn.execute("SET session_replication_role = replica")
        with conn.transaction():
            conn.execute(FILL, {"org_id": org_id, "rows": rows, "users": BIG_USERS})
            for statement in CHARGE:
                conn.execute(statement, {"org_id": org_id})
        rebuild_usage_summaries(conn, org_ids=[org_id])
        conn.execute("VACUUM (ANALYZE) credit_usage_attribution")


def ids_digest(database_url, org_id) -> tuple[int, str]:
    """(count, md5 of "id," for every id in export order), by PostgreSQL."""
    with psycopg.connect(database_url) as conn:
        return conn.execute(
            "SELECT count(*), md5(coalesce(string_agg(deduction_id::text || ',', ''"
            " ORDER BY created_at, deduction_id), '')) FROM credit_usage_attribution"
            " WHERE org_id = %s", (org_id,)).fetchone()


def export_ids(database_url, org_id) -> list[str]:
    with psycopg.connect(database_url) as conn:
        return [str(d) for (d,) in conn.execute(
            "SELECT deduction_id FROM credit_usage_attribution WHERE org_id = %s"
            " ORDER BY created_at, deduction_id", (org_id,))]


@pytest.fixture
def reports(client):
    return reporting_service_pb2_grpc.ReportingServiceStub(client.channel)


def funded(client, org_id):
    client.funded_org(org_id, 10**15, {f"u{i}": 10**12 for i in range(BIG_USERS)})


def deduct(client, org_id, count):
    for _ in range(count):
        client.credits.DeductCredits(cp.DeductCreditsRequest(
            org_id=org_id, user_id="u1", amount_millicredits=1, service_type="llm",
            service_name="late", idempotency_key=new_key()))


def test_a_big_export_streams_every_row_once_oldest_first(client, reports, database_url):
    """EXPORT_ROWS rows in chunks of 10,000: the ids arrive in (time, id)
    order, each once (same count and digest as PostgreSQL's own ordering),
    metadata included, at a rate worth reporting."""
    funded(client, "big")
    fill(database_url, "big", EXPORT_ROWS)
    expected = ids_digest(database_url, "big")

    digest = hashlib.md5()
    count = chunks = with_metadata = 0
    last = None
    started = time.monotonic()
    for chunk in reports.ExportUsage(rp.ExportUsageRequest(org_id="big", chunk_size=10_000)):
        chunks += 1
        for record in chunk.records:
            key = (record.create_time.ToMicroseconds(), record.deduction_id)
            assert last is None or key > last
            last = key
            digest.update(record.deduction_id.encode() + b",")
            with_metadata += bool(record.metadata)
        count += len(chunk.records)
        assert chunk.resume_token
    elapsed = time.monotonic() - started
    print(f"\nexported {count:,} rows in {elapsed:.2f} s: {count / elapsed:,.0f} rows/s")

    assert (count, digest.hexdigest()) == expected
    assert count == EXPORT_ROWS and chunks == -(-EXPORT_ROWS // 10_000)
    assert with_metadata == EXPORT_ROWS // 1000


@pytest.fixture
def small(client, database_url):
    """An org with 2,500 bulk deductions; their ids in export order."""
    funded(client, "small")
    fill(database_url, "small", 2500)
    return export_ids(database_url, "small")


def records_of(chunks) -> list[str]:
    return [r.deduction_id for chunk in chunks for r in chunk.records]


def test_chunks_hold_chunk_size_rows_and_resume_gives_exactly_the_rest(reports, small):
    chunks = list(reports.ExportUsage(rp.ExportUsageRequest(org_id="small", chunk_size=300)))
    assert [len(c.records) for c in chunks] == [300] * 8 + [100]
    assert records_of(chunks) == small
    for cut in (0, 3, 7):
        rest = reports.ExportUsage(rp.ExportUsageRequest(
            org_id="small", chunk_size=1000, resume_token=chunks[cut].resume_token))
        assert records_of(rest) == small[300 * (cut + 1):]
    # After the last chunk, nothing is left.
    assert list(reports.ExportUsage(rp.ExportUsageRequest(
        org_id="small", resume_token=chunks[-1].resume_token))) == []
    # chunk_size 0 means 1,000.
    assert [len(c.records) for c in reports.ExportUsage(rp.ExportUsageRequest(org_id="small"))] == [
        1000, 1000, 500]


def test_an_export_ends_where_it_started_and_so_does_its_resumption(client, reports, small):
    """With no end, the export is bounded at the instant it started: rows
    charged while it runs, or before it is resumed, are not in it."""
    stream = reports.ExportUsage(rp.ExportUsageRequest(org_id="small", chunk_size=1000))
    first = next(stream)
    deduct(client, "small", 3)
    assert records_of([first, *stream]) == small

    token = first.resume_token
    deduct(client, "small", 2)
    rest = reports.ExportUsage(rp.ExportUsageRequest(org_id="small", resume_token=token))
    assert records_of(rest) == small[1000:]
    # A new export sees them: the five late rows come last.
    fresh = records_of(reports.ExportUsage(rp.ExportUsageRequest(org_id="small", chunk_size=10_000)))
    assert fresh[:-5] == small and len(fresh) == len(small) + 5


def test_a_range_exports_its_rows_only(reports, small, database_url):
    with psycopg.connect(database_url) as conn:
        (start, end), = conn.execute(
            "SELECT min(epoch_micros(created_at)) + 100000, max(epoch_micros(created_at)) - 200000"
            " FROM credit_usage_attribution WHERE org_id = 'small'").fetchall()
        expected = [str(d) for (d,) in conn.execute(
            "SELECT deduction_id FROM credit_usage_attribution WHERE org_id = 'small'"
            " AND epoch_micros(created_at) >= %s AND epoch_micros(created_at) < %s"
            " ORDER BY created_at, deduction_id", (start, end))]
    time_range = rp.TimeRange(start_time=Timestamp(seconds=start // 10**6, nanos=start % 10**6 * 1000),
                              end_time=Timestamp(seconds=end // 10**6, nanos=end % 10**6 * 1000))
    chunks = list(reports.ExportUsage(rp.ExportUsageRequest(
        org_id="small", time_range=time_range, chunk_size=250)))
    assert records_of(chunks) == expected and 0 < len(expected) < len(small)
    # Its tokens belong to this range: another range (or none) refuses them.
    with raises_rpc(CODE.INVALID_ARGUMENT) as failed:
        list(reports.ExportUsage(rp.ExportUsageRequest(org_id="small", resume_token=chunks[0].resume_token)))
    assert field_violations(failed["error"]) == {"resume_token"}
    rest = reports.ExportUsage(rp.ExportUsageRequest(
        org_id="small", time_range=time_range, resume_token=chunks[0].resume_token))
    assert records_of(rest) == expected[250:]


def test_bad_requests_are_refused_before_anything_is_sent(client, reports, small):
    for request, field in (
        (rp.ExportUsageRequest(org_id="small", chunk_size=10_001), "chunk_size"),
        (rp.ExportUsageRequest(org_id="small", chunk_size=-1), "chunk_size"),
        (rp.ExportUsageRequest(org_id="small", resume_token="AQID"), "resume_token"),
        (rp.ExportUsageRequest(org_id="bad org"), "org_id"),
        (rp.ExportUsageRequest(org_id="small", time_range=rp.TimeRange(
            start_time=Timestamp(seconds=5), end_time=Timestamp(seconds=4))), "time_range.start_time"),
    ):
        with raises_rpc(CODE.INVALID_ARGUMENT) as failed:
            list(reports.ExportUsage(request))
        assert field_violations(failed["error"]) == {field}
    token = next(reports.ExportUsage(rp.ExportUsageRequest(org_id="small", chunk_size=10))).resume_token
    altered = token[:5] + ("A" if token[5] != "A" else "B") + token[6:]
    with raises_rpc(CODE.INVALID_ARGUMENT) as failed:
        list(reports.ExportUsage(rp.ExportUsageRequest(org_id="small", resume_token=altered)))
    assert field_violations(failed["error"]) == {"resume_token"}
    with raises_rpc(CODE.NOT_FOUND, "ORG_NOT_FOUND"):
        list(reports.ExportUsage(rp.ExportUsageRequest(org_id="nobody")))
    client.subscribe("idle")
    assert list(reports.ExportUsage(rp.ExportUsageRequest(org_id="idle"))) == []


def test_a_cancelled_export_holds_no_connection_and_reads_no_more(client, server, database_url,
                                                                 monkeypatch):
    """The client reads one chunk of many and cancels: every connection is
    back in the pool, none is busy in PostgreSQL, and the stream reads no
    more chunks."""
    chunks_read = []
    read_chunk = ReportStore.export_chunk

    def counted(self, *args, **kwargs):
        chunks_read.append(time.monotonic())
        return read_chunk(self, *args, **kwargs)

    monkeypatch.setattr(ReportStore, "export_chunk", counted)
    funded(client, "small")
    fill(database_url, "small", 20_000)
    reports = reporting_service_pb2_grpc.ReportingServiceStub(client.channel)
    stream = reports.ExportUsage(rp.ExportUsageRequest(org_id="small", chunk_size=100))
    assert len(next(stream).records) == 100
    stream.cancel()
    with pytest.raises(grpc.RpcError) as cancelled:
        list(stream)
    assert cancelled.value.code() == CODE.CANCELLED

    deadline = time.monotonic() + 5
    while True:  # the health monitor borrows one now and then
        stats = server.pool.get_stats()
        # The stream may be between two chunks, its connection back in the
        # pool, when the cancel reaches it: wait for reads to have stopped too.
        quiet = time.monotonic() - chunks_read[-1] > 0.2
        if stats["pool_available"] == stats["pool_size"] and quiet or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert stats["pool_available"] == stats["pool_size"]
    read_by_now = len(chunks_read)
    time.sleep(0.5)
    # At most the chunk being sent when the cancel arrived, and none since.
    assert len(chunks_read) == read_by_now <= 3
    with psycopg.connect(database_url) as conn:
        busy = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'orgbilling'"
            " AND state <> 'idle' AND pid <> pg_backend_pid()").fetchone()[0]
    assert busy == 0
