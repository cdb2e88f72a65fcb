"""`make bench-reports`: every ReportingService RPC, timed through a real
server on the seeded database (benchmarks/seed_data.py, seeded first if it
is not yet), for the largest org and a typical (median) one, at 1 and 16
concurrent callers, against the reporting targets. See benchmarks/README.md.

    python -m benchmarks.reports                   # full scale (seeds it first if needed: ~10 min)
    python -m benchmarks.reports --scale 0.01      # a quick run on 1% of the data
    python -m benchmarks.reports --only ListUsage  # the RPCs whose name contains this

Targets (reported, not asserted: it exits 0 whenever it ran):
every single-org RPC p99 <= 50 ms, over any range up to a year, the largest
org included; GetSystemBilling p99 <= 200 ms; any ListUsage page p99 <= 20 ms;
ExportUsage >= 100,000 rows/s with the server's RSS growing < 50 MB over a
1,000,000-row export.
"""

import argparse
import asyncio
import dataclasses
import datetime
import json
import math
import os
import platform
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import grpc
import psutil
import psycopg
from google.protobuf.timestamp_pb2 import Timestamp

from benchmarks import seed_data
from benchmarks.environment import benchmark_server, postmaster_process, stop_on_sigterm
from benchmarks.load import Probes, measure
from benchmarks.report import _without_nan
from orgbilling.v1 import reporting_service_pb2 as pb
from orgbilling.v1 import reporting_service_pb2_grpc as pb_grpc

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SCOPES = ["credits.read", "billing.admin"]
CALL_TIMEOUT_S = 60.0
PAGE_TARGET_MS = 20.0
SINGLE_ORG_TARGET_MS = 50.0
SYSTEM_TARGET_MS = 200.0
EXPORT_ROWS_PER_S_TARGET = 100_000
EXPORT_RSS_GROWTH_TARGET_MB = 50.0


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def timestamp(at: datetime.datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(at)
    return stamp


def time_range(days: float) -> pb.TimeRange:
    """From `days` days before now (when the case is built) to the server's
    now (end unset)."""
    start = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=days)
    return pb.TimeRange(start_time=timestamp(start))


@dataclasses.dataclass(frozen=True)
class Subject:
    """The org a row measures ("largest" or "typical") and what goes with it."""
    label: str
    org_id: str
    deductions: int
    users: int
    top_user_id: str        # the org's heaviest user: ListUsage by user
    billing_user_id: str    # a user in the most orgs: GetUserBilling


def find_subjects(url: str) -> list[Subject]:
    """The largest org (most deductions) and the median one."""
    with psycopg.connect(url) as conn:
        orgs = conn.execute("""
            SELECT o.org_id, coalesce(sum(d.request_count), 0) AS deductions
              FROM organizations o LEFT JOIN usage_daily d USING (org_id)
             GROUP BY o.org_id ORDER BY deductions DESC, o.org_id""").fetchall()
        picked = [("largest", orgs[0]), ("typical", orgs[len(orgs) // 2])]
        subjects = []
        for label, (org_id, deductions) in picked:
            users = conn.execute("SELECT count(*) FROM user_credit_allocations WHERE org_id = %s",
                                 (org_id,)).fetchone()[0]
            top_user = conn.execute("""
                SELECT user_id FROM user_usage_monthly WHERE org_id = %s
                 GROUP BY user_id ORDER BY sum(request_count) DESC, user_id LIMIT 1""",
                                    (org_id,)).fetchone()
            billing_user = conn.execute("""
                SELECT user_id FROM user_credit_allocations
                 WHERE user_id IN (SELECT user_id FROM user_credit_allocations WHERE org_id = %s)
                 GROUP BY user_id ORDER BY count(*) DESC, user_id LIMIT 1""", (org_id,)).fetchone()
            subjects.append(Subject(label, org_id, int(deductions), users,
                                    top_user[0] if top_user else "", billing_user[0] if billing_user else ""))
    return subjects


@dataclasses.dataclass(frozen=True)
class Case:
    """One measured RPC: a name, the org it is about (None: every org), its
    target p99, and a function that makes one call."""
    name: str
    subject: Subject | None
    target_ms: float
    make_call: Callable[[pb_grpc.ReportingServiceStub, tuple], Callable]


def unary(method: str, request) -> Callable:
    def make(stub, metadata):
        bound = getattr(stub, method)

        async def call():
            return await bound(request, metadata=metadata, timeout=CALL_TIMEOUT_S)
        return call
    return make


async def deep_token(stub, metadata, request: pb.ListUsageRequest, rows_deep: int) -> tuple[str, int]:
    """Follows next_page_token, up to 1,000 rows a page, until rows_deep
    rows are behind; returns the token there and how many rows it skips."""
    walker = pb.ListUsageRequest()
    walker.CopyFrom(request)
    walker.page_size = min(1000, max(1, rows_deep))
    skipped, token = 0, ""
    while skipped < rows_deep:
        walker.page_token = token
        page = await stub.ListUsage(walker, metadata=metadata, timeout=CALL_TIMEOUT_S)
        if not page.next_page_token:
            break
        skipped += len(page.records)
        token = page.next_page_token
    return token, skipped


async def build_cases(stub, metadata, subjects: list[Subject], only: str | None) -> list[Case]:
    cases: list[Case] = []
    for subject in subjects:
        org = subject.org_id
        cases += [
            Case("GetUsageSummary 1 day", subject, SINGLE_ORG_TARGET_MS, unary(
                "GetUsageSummary", pb.GetUsageSummaryRequest(org_id=org, time_range=time_range(1)))),
            Case("GetUsageSummary 30 days", subject, SINGLE_ORG_TARGET_MS, unary(
                "GetUsageSummary", pb.GetUsageSummaryRequest(org_id=org, time_range=time_range(30)))),
            Case("GetUsageSummary 1 year", subject, SINGLE_ORG_TARGET_MS, unary(
                "GetUsageSummary", pb.GetUsageSummaryRequest(org_id=org, time_range=time_range(365)))),
            Case("GetOrgBilling", subject, SINGLE_ORG_TARGET_MS, unary(
                "GetOrgBilling", pb.GetOrgBillingRequest(org_id=org))),
            Case("ListAllocationUsage", subject, SINGLE_ORG_TARGET_MS, unary(
                "ListAllocationUsage", pb.ListAllocationUsageRequest(org_id=org))),
            Case("GetUserBilling", subject, SINGLE_ORG_TARGET_MS, unary(
                "GetUserBilling", pb.GetUserBillingRequest(user_id=subject.billing_user_id))),
            Case("GetOrgBillingMetrics 30 days", subject, SINGLE_ORG_TARGET_MS, unary(
                "GetOrgBillingMetrics", pb.GetOrgBillingMetricsRequest(org_id=org, time_range=time_range(30)))),
            Case("GetOrgBillingMetrics 1 year", subject, SINGLE_ORG_TARGET_MS, unary(
                "GetOrgBillingMetrics", pb.GetOrgBillingMetricsRequest(org_id=org, time_range=time_range(365)))),
            Case("ListUsage first page", subject, PAGE_TARGET_MS, unary(
                "ListUsage", pb.ListUsageRequest(org_id=org))),
            Case("ListUsage by user", subject, PAGE_TARGET_MS, unary(
                "ListUsage", pb.ListUsageRequest(org_id=org, user_id=subject.top_user_id))),
            Case("ListBillingHistory", subject, SINGLE_ORG_TARGET_MS, unary(
                "ListBillingHistory", pb.ListBillingHistoryRequest(org_id=org))),
        ]
        if not only or only.lower() in "listusage deep page":
            # Halfway down the org's rows: the same page again and again.
            request = pb.ListUsageRequest(org_id=org)
            began = time.monotonic()
            try:
                token, skipped = await deep_token(stub, metadata, request, subject.deductions // 2)
            except grpc.aio.AioRpcError as error:
                log(f"  deep ListUsage token for {subject.label}: {error.code().name} {error.details()}")
                token, skipped = "", 0
            log(f"  deep ListUsage token for {subject.label}: {skipped:,} rows down,"
                f" {time.monotonic() - began:.1f} s")
            if token:
                deep = pb.ListUsageRequest(org_id=org, page_token=token)
                depth = f"{skipped // 1000}k" if skipped >= 10_000 else f"{skipped}"
                cases.append(Case(f"ListUsage deep page ({depth} rows in)", subject,
                                  PAGE_TARGET_MS, unary("ListUsage", deep)))
    cases += [
        Case("GetSystemBilling", None, SYSTEM_TARGET_MS, unary(
            "GetSystemBilling", pb.GetSystemBillingRequest())),
        Case("ListOrgSummaries", None, SINGLE_ORG_TARGET_MS, unary(
            "ListOrgSummaries", pb.ListOrgSummariesRequest())),
    ]
    if only:
        cases = [case for case in cases if only.lower() in case.name.lower()]
    return cases


def verdict(p99_ms: float, target_ms: float, errors: int, calls: int) -> str:
    if errors or not calls or math.isnan(p99_ms):
        return "MISS"
    return "PASS" if p99_ms <= target_ms else "MISS"


async def measure_cases(stub, metadata, cases: list[Case], arguments, probes: Probes) -> list[dict]:
    rows = []
    for callers in arguments.callers:
        for case in cases:
            result = await measure(case.make_call(stub, metadata), callers, arguments.warmup_s,
                                   arguments.duration_s, probes)
            row = {
                "rpc": case.name,
                "org": case.subject.label if case.subject else "-",
                "org_id": case.subject.org_id if case.subject else None,
                "target_ms": case.target_ms,
                **dataclasses.asdict(result),
            }
            row["verdict"] = verdict(result.p99_ms, case.target_ms, result.errors, result.calls)
            rows.append(row)
            log(f"  {case.name} [{row['org']}] @{callers}: {result.calls} calls, p50 {result.p50_ms:.1f}"
                f" ms, p99 {result.p99_ms:.1f} ms, {result.errors} errors {result.error_codes or ''}"
                f" {row['verdict']}")
    return rows


async def measure_export(stub, metadata, subject: Subject, rows_wanted: int, chunk_size: int,
                         server_pid: int, probes: Probes) -> dict:
    """Streams the largest org's deductions, oldest first, until rows_wanted
    rows arrived (then cancels); rows/s and the server's RSS around it."""
    server = psutil.Process(server_pid)
    rss_before = server.memory_info().rss
    probes.reset_window_peak()
    request = pb.ExportUsageRequest(org_id=subject.org_id, chunk_size=chunk_size)
    rows = chunks = 0
    first_chunk_s = math.nan
    error = None
    began = time.perf_counter()
    call = stub.ExportUsage(request, metadata=metadata, timeout=600)
    try:
        async for chunk in call:
            if not chunks:
                first_chunk_s = time.perf_counter() - began
            chunks += 1
            rows += len(chunk.records)
            if rows >= rows_wanted:
                break
    except grpc.aio.AioRpcError as failure:
        error = f"{failure.code().name}: {failure.details()}"
    finally:
        call.cancel()
    seconds = time.perf_counter() - began
    await asyncio.sleep(0.5)  # the server lets go of what the stream held
    rss_after = server.memory_info().rss
    result = {
        "org": subject.label, "org_id": subject.org_id, "rows": rows, "chunks": chunks,
        "chunk_size": chunk_size, "seconds": seconds, "rows_per_s": rows / seconds if seconds else math.nan,
        "first_chunk_ms": first_chunk_s * 1000, "error": error,
        "rss_before_mb": rss_before / 2**20, "rss_after_mb": rss_after / 2**20,
        "rss_peak_mb": max(probes.window_peak_rss_bytes, rss_after) / 2**20,
        "rss_growth_mb": (rss_after - rss_before) / 2**20,
    }
    result["verdict"] = "PASS" if (not error and rows >= min(rows_wanted, subject.deductions)
                                   and result["rows_per_s"] >= EXPORT_ROWS_PER_S_TARGET
                                   and result["rss_growth_mb"] < EXPORT_RSS_GROWTH_TARGET_MB) else "MISS"
    log(f"  ExportUsage [{subject.label}]: {rows:,} rows in {seconds:.1f} s = {result['rows_per_s']:,.0f}"
        f" rows/s, RSS {result['rss_before_mb']:.0f} -> {result['rss_after_mb']:.0f} MB"
        f" (peak {result['rss_peak_mb']:.0f}) {error or ''} {result['verdict']}")
    return result


async def run_bench(address: str, token: str, subjects: list[Subject], arguments, probes: Probes,
                    server_pid: int) -> dict:
    metadata = (("authorization", f"Bearer {token}"),)
    options = [("grpc.max_receive_message_length", 64 * 2**20)]
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        stub = pb_grpc.ReportingServiceStub(channel)
        log("preparing the cases...")
        cases = await build_cases(stub, metadata, subjects, arguments.only)
        log(f"measuring {len(cases)} cases at {arguments.callers} callers...")
        rows = await measure_cases(stub, metadata, cases, arguments, probes)
        export = None
        if arguments.export_rows and (not arguments.only or arguments.only.lower() in "exportusage"):
            log(f"ExportUsage of {arguments.export_rows:,} rows...")
            export = await measure_export(stub, metadata, subjects[0], arguments.export_rows,
                                          arguments.export_chunk_size, server_pid, probes)
    return {"cases": rows, "export": export}


def print_table(results: dict) -> None:
    header = (f"{'rpc':<38}{'org':<9}{'callers':>8}{'calls':>7}{'p50 ms':>9}{'p99 ms':>9}"
              f"{'target':>8}{'':>2}{'result':<7}{'errors':>7}{'srv us':>9}{'db us':>9}")
    print(header)
    print("-" * len(header))
    for row in results["cases"]:
        # No call ended inside the window: each took longer than it.
        slower = f">{results['arguments']['duration_s'] * 1000:.0f}" if not row["calls"] else None
        print(f"{row['rpc']:<38}{row['org']:<9}{row['callers']:>8}{row['calls']:>7}"
              f"{slower or _cell(row['p50_ms'], 1):>9}{slower or _cell(row['p99_ms'], 1):>9}"
              f"{'<=' + format(row['target_ms'], '.0f'):>8}{'':>2}{row['verdict']:<7}{row['errors']:>7}"
              f"{_cell(row['server_cpu_us_per_call'], 0):>9}{_cell(row['database_cpu_us_per_call'], 0):>9}")
        if row["errors"]:
            print(f"{'':<38}errors: {row['error_codes']}")
    export = results.get("export")
    if export:
        print()
        print(f"ExportUsage [{export['org']} {export['org_id']}], chunks of {export['chunk_size']:,}:"
              f" {export['rows']:,} rows in {export['seconds']:.1f} s = {export['rows_per_s']:,.0f} rows/s"
              f" (target >= {EXPORT_ROWS_PER_S_TARGET:,}); first chunk {export['first_chunk_ms']:.0f} ms;"
              f" server RSS {export['rss_before_mb']:.0f} -> {export['rss_after_mb']:.0f} MB,"
              f" growth {export['rss_growth_mb']:+.0f} MB (target < {EXPORT_RSS_GROWTH_TARGET_MB:.0f}),"
              f" peak {export['rss_peak_mb']:.0f} MB: {export['verdict']}")
        if export["error"]:
            print(f"  error: {export['error']}")
    missed = [f"{row['rpc']} [{row['org']}] @{row['callers']}" for row in results["cases"]
              if row["verdict"] != "PASS"]
    if export and export["verdict"] != "PASS":
        missed.append("ExportUsage")
    print()
    print(f"{len(results['cases']) + bool(export) - len(missed)} PASS, {len(missed)} MISS"
          + (f": {', '.join(missed)}" if missed else ""))


def _cell(value: float, digits: int) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def write_json(results: dict, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    stamp = results["started_at"].replace(":", "").replace("-", "")
    path = directory / f"reports-{stamp}.json"
    path.write_text(json.dumps(_without_nan(results), indent=2, default=str) + "\n")
    return path


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.reports", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="the seed's scale (1: full)")
    parser.add_argument("--database-url", default=os.environ.get("ORGBILLING_REPORTS_DATABASE_URL"),
                        help="a seeded (or to be seeded) database; default: the embedded one of seed_data")
    parser.add_argument("--data-dir", type=Path, default=seed_data.DEFAULT_DATA_DIR)
    parser.add_argument("--callers", type=lambda text: [int(n) for n in text.split(",")],
                        default=[1, 16], help="concurrent callers, comma-separated (1,16)")
    parser.add_argument("--duration-s", type=float, default=3.0, help="measured seconds per case (3)")
    parser.add_argument("--warmup-s", type=float, default=0.5, help="unmeasured seconds before each (0.5)")
    parser.add_argument("--export-rows", type=int, default=1_000_000,
                        help="rows of the largest org to export (0: skip)")
    parser.add_argument("--export-chunk-size", type=int, default=10_000)
    parser.add_argument("--only", help="only the cases whose name contains this (case-insensitive)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    return parser.parse_args(argv)


def run(arguments) -> dict:
    started_at = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    url = seed_data.resolve_url(arguments.database_url, arguments.scale, arguments.data_dir)
    log("the seed (made once, reused)...")
    marker = seed_data.seed(url, arguments.scale)
    subjects = find_subjects(url)
    for subject in subjects:
        log(f"  {subject.label}: {subject.org_id}, {subject.deductions:,} deductions, {subject.users:,}"
            f" users; ListUsage by {subject.top_user_id}, GetUserBilling of {subject.billing_user_id}")
    from orgbilling.server.auth.api_keys import create_api_key, revoke

    key_name = f"bench-reports-{uuid.uuid4().hex[:12]}"
    token = create_api_key(url, key_name, SCOPES)
    data_dir = None if arguments.database_url else arguments.data_dir
    try:
        log("starting the server...")
        with benchmark_server(url) as server:
            with Probes(server.process.pid, postmaster_process(data_dir), url) as probes:
                measured = asyncio.run(run_bench(server.address, token, subjects, arguments, probes,
                                                 server.process.pid))
                peak_rss_mb = probes.peak_rss_bytes / 2**20
            server_environment = {key: value for key, value in server.env.items()
                                  if key.startswith("ORGBILLING_") and "URL" not in key
                                  and "TOKEN" not in key}
    finally:
        revoke(url, key_name)
    return {
        "started_at": started_at,
        "command": " ".join([os.path.basename(sys.executable), "-m", "benchmarks.reports", *sys.argv[1:]]),
        "arguments": {key: str(value) if isinstance(value, Path) else value
                      for key, value in vars(arguments).items()},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "seed": marker,
        "subjects": [dataclasses.asdict(subject) for subject in subjects],
        "server_environment": server_environment,
        "server_peak_rss_mb": peak_rss_mb,
        **measured,
    }


def main(argv: list[str] | None = None) -> None:
    arguments = parse_arguments(argv)
    stop_on_sigterm()
    try:
        results = run(arguments)
    except KeyboardInterrupt:
        sys.exit("interrupted; everything started was stopped")
    print()
    seed = results["seed"]
    print(f"Seed: scale {seed['scale']:g}, {seed['rows']['credit_usage_attribution']:,} deductions,"
          f" {seed['rows']['organizations']:,} orgs; data up to {seed.get('data_ends_at')}")
    for subject in results["subjects"]:
        print(f"  {subject['label']}: {subject['org_id']} ({subject['deductions']:,} deductions,"
              f" {subject['users']:,} users)")
    print()
    print_table(results)
    print(f"\nServer peak RSS over the run: {results['server_peak_rss_mb']:.0f} MB")
    path = write_json(results, arguments.results_dir)
    print(f"JSON: {path}")


if __name__ == "__main__":
    main()
