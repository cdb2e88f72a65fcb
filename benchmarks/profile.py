"""Where one scenario's time goes: the server sampled by py-spy, the ledger
functions timed by PostgreSQL (track_functions) and their statements by
pg_stat_statements, while the benchmark's load runs one scenario
(benchmarks/README.md, "Profiles").

    python -m benchmarks.profile                          # deduct_hot, 64 callers, 10 s
    python -m benchmarks.profile --scenario check --callers 64 --duration-s 10
    python -m benchmarks.profile --bare          # baseline A0's server under the noop load
    python -m benchmarks.profile --bare --bare-batch-ms 0.3   # waiting for a group commit, alone
    python -m benchmarks.profile --canned-ledger  # the real server, but deductions and checks answered at once
    python -m benchmarks.profile --scenario noop --unchained-health   # the real server, health outside the chain

Prints the server's top functions by own time and by time inside them (as a
share of the samples, and as CPU microseconds per call from the measured
CPU), then each ledger function's calls and time per scenario call, then
the statements that took the most time, those run inside the functions
included (pg_stat_statements.track = all), then the plans of the costliest
as they ran (auto_explain's EXPLAIN ANALYZE with BUFFERS, on 2% of the
statements, without per-node timing). Both cost each statement a little: the
figures are a few percent higher than make bench's. With
ORGBILLING_DATABASE_URL, statements and plans are shown only where that
server preloads pg_stat_statements and auto_explain so.
"""

import argparse
import asyncio
import collections
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import grpc
import psycopg
from psycopg import sql

from benchmarks.environment import (
    bench_token, benchmark_database, benchmark_server, postmaster_process, stop_on_sigterm,
)
from orgbilling.server.database import restart_embedded_database
from benchmarks.load import Probes, measure
from benchmarks.run import bare_server
from benchmarks.scenarios import BARE_SCENARIO, HOT_ORG, SCENARIOS, SPREAD_ORGS, Stubs, create_orgs, use_token

PY_SPY = Path(sys.executable).parent / "py-spy"


def parse_arguments(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", default="deduct_hot",
                        choices=[scenario.name for scenario in SCENARIOS])
    parser.add_argument("--callers", type=int, default=64)
    parser.add_argument("--duration-s", type=float, default=10.0)
    parser.add_argument("--warmup-s", type=float, default=2.0)
    parser.add_argument("--bare", action="store_true",
                        help="profile the bare grpcio server (baseline A0) under the noop scenario")
    parser.add_argument("--bare-batch-ms", type=float, default=0.0,
                        help="with --bare: each call waits in a group commit whose batches take this long")
    parser.add_argument("--canned-ledger", action="store_true",
                        help="the server's ledger answers DeductCredits and CheckCredits at once"
                             " (benchmarks.canned_ledger_server)")
    parser.add_argument("--unchained-health", action="store_true",
                        help="the server's health service outside the interceptor chain, as the bare"
                             " server adds it (benchmarks.unchained_health_server): with --scenario"
                             " noop, what the chain costs a no-op")
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--native", action="store_true",
                        help="sample native frames too (py-spy --native, which pauses the server"
                             " for each sample): where the time in gRPC's core, uvloop and the"
                             " interpreter goes")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--stacks", type=Path, metavar="FILE",
                        help="also keep py-spy's samples in FILE (one `frame;frame;... count` line"
                             " a stack, as flame graph tools read them)")
    parser.add_argument("--plans", type=int, default=5,
                        help="print the plans (EXPLAIN ANALYZE, BUFFERS, by auto_explain on a"
                             " sample of the calls) of the statements that took the most time")
    return parser.parse_args(argv)


def server_module(arguments) -> str:
    """The module the profiled server runs as (`python -m module serve`)."""
    if arguments.canned_ledger and arguments.unchained_health:
        raise SystemExit("choose one of --canned-ledger and --unchained-health")
    if arguments.canned_ledger:
        return "benchmarks.canned_ledger_server"
    if arguments.unchained_health:
        return "benchmarks.unchained_health_server"
    return "orgbilling.server"


def collapsed_stacks(path: Path) -> list[tuple[list[str], int]]:
    """py-spy's raw output: one `frame;frame;... count` line a stack."""
    stacks = []
    for line in path.read_text().splitlines():
        frames, _, count = line.rpartition(" ")
        if frames:
            stacks.append((frames.split(";"), int(count)))
    return stacks


def frame_name(frame: str) -> str:
    """`function (path/to/file.py:12)` -> `function (file.py)`: lines apart."""
    function, _, where = frame.partition(" (")
    where = where.rstrip(")").rsplit(":", 1)[0]
    return f"{function} ({'/'.join(Path(where).parts[-2:])})"


def top_functions(stacks, top: int) -> tuple[list, list, int]:
    own, inside = collections.Counter(), collections.Counter()
    total = 0
    for frames, count in stacks:
        total += count
        names = [frame_name(frame) for frame in frames if not frame.startswith("process ")
                 and not frame.startswith("thread ")]
        if names:
            own[names[-1]] += count
        for name in set(names):
            inside[name] += count
    return own.most_common(top), inside.most_common(top), total


def function_times(conn) -> dict[str, tuple[int, float]]:
    rows = conn.execute("SELECT funcname, calls, self_time FROM pg_stat_user_functions").fetchall()
    return {name: (calls, self_ms) for name, calls, self_ms in rows}


# What the embedded PostgreSQL is restarted with: every statement counted,
# those inside functions too, and a sample of them explained into its log.
STATEMENT_SETTINGS = {
    "shared_preload_libraries": ("pg_stat_statements", "auto_explain"),
    "pg_stat_statements.track": "all",
    "auto_explain.log_min_duration": "0",
    "auto_explain.sample_rate": "0.02",
    "auto_explain.log_analyze": "on",
    "auto_explain.log_buffers": "on",
    "auto_explain.log_timing": "off",
    "auto_explain.log_nested_statements": "on",
    "auto_explain.log_format": "json",
    "auto_explain.log_parameter_max_length": "0",
}
LOG_FILE = "restart.log"  # in the data directory's postgres/, by restart_embedded_database


def with_statement_statistics(database_url: str, data_dir: Path | None) -> bool:
    """Restarts the embedded PostgreSQL in data_dir with STATEMENT_SETTINGS;
    whether the database now has pg_stat_statements (with another server,
    whether it preloads it)."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        if data_dir is not None:
            for name, value in STATEMENT_SETTINGS.items():
                values = value if isinstance(value, tuple) else (value,)
                conn.execute(sql.SQL("ALTER SYSTEM SET {} = {}").format(
                    sql.Identifier(*name.split(".")), sql.SQL(", ").join(map(sql.Literal, values))))
    if data_dir is not None:
        restart_embedded_database(data_dir)
    with psycopg.connect(database_url, autocommit=True) as conn:
        try:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            conn.execute("SELECT pg_stat_statements_reset()")
        except psycopg.Error:
            return False
    return True


def explained_plans(log: Path, *, start: int) -> list[tuple[float, int, str, dict]]:
    """auto_explain's entries in the server's log from byte start on, by
    statement: (total ms, times explained, the statement, its first plan),
    most time first. Only statements that read or write a table: a call of a
    function shows as a bare Function Scan or Result, its statements on their own."""
    with log.open("rb") as file:
        file.seek(start)
        text = file.read().decode(errors="replace")
    plans: dict[str, list] = {}
    for found in re.finditer(r"duration: ([\d.]+) ms\s+plan:\s*\n\t(\{.*?\n\t\})", text, re.S):
        if '"Relation Name"' not in found[2]:
            continue
        explained = json.loads(found[2])
        query = " ".join(explained["Query Text"].split())
        entry = plans.setdefault(query, [0.0, 0, explained["Plan"]])
        entry[0] += float(found[1])
        entry[1] += 1
    return sorted(((total, count, query, plan) for query, (total, count, plan) in plans.items()),
                  key=lambda entry: -entry[0])


def plan_lines(node: dict, depth: int = 0) -> list[str]:
    """A plan node and its children, one line each, as EXPLAIN's text shows
    the essentials: the node, what it reads, the rows and the buffers."""
    target = " ".join(f"{key.split()[0].lower()} {node[key]}" for key in
                      ("Relation Name", "Index Name") if key in node)
    buffers = ", ".join(f"{key.split()[-2].lower()}={node[key]}" for key in
                        ("Shared Hit Blocks", "Shared Read Blocks", "Shared Dirtied Blocks",
                         "Shared Written Blocks") if node.get(key))
    line = (f"{'  ' * depth}-> {node['Node Type']} {target} (rows={node.get('Actual Rows', '?')}"
            f"{', ' + buffers if buffers else ''})")
    return [line] + [child for sub in node.get("Plans", []) for child in plan_lines(sub, depth + 1)]


def statement_times(conn, database: str) -> dict[str, tuple[int, float]]:
    rows = conn.execute(
        "SELECT s.query, s.calls, s.total_exec_time FROM pg_stat_statements AS s"
        " JOIN pg_database AS d ON d.oid = s.dbid WHERE d.datname = %s", (database,)).fetchall()
    return {" ".join(query.split()): (calls, total_ms) for query, calls, total_ms in rows}


def print_growth(title: str, before: dict, after: dict, calls: float, *, top: int, width: int) -> None:
    """The entries of after that grew since before, most time first: calls
    and milliseconds as calls and microseconds per scenario call."""
    print(f"\n{title}")
    grown = [(name, count - before.get(name, (0, 0.0))[0], ms - before.get(name, (0, 0.0))[1])
             for name, (count, ms) in after.items()]
    for name, count, ms in sorted(grown, key=lambda entry: -entry[2])[:top]:
        if count:
            print(f"  {count / calls:6.2f} calls  {ms * 1000 / calls:7.1f} us  {name[:width]}")


async def load(address: str, scenario, arguments, probes):
    async with grpc.aio.insecure_channel(address) as channel:
        return await measure(scenario.make_call(Stubs.over(channel)), arguments.callers,
                             arguments.warmup_s, arguments.duration_s, probes)


def main(argv=None) -> None:
    arguments = parse_arguments(argv)
    stop_on_sigterm()
    scenario = (BARE_SCENARIO if arguments.bare
                else next(s for s in SCENARIOS if s.name == arguments.scenario))
    with benchmark_database() as (database_url, data_dir):
        with psycopg.connect(database_url, autocommit=True) as conn:
            database = conn.info.dbname
            conn.execute(f"ALTER DATABASE {database} SET track_functions = 'pl'")
        has_statements = with_statement_statistics(database_url, data_dir)
        with (bare_server(database_url, f"--batch-ms={arguments.bare_batch_ms}") if arguments.bare
              else benchmark_server(database_url, module=server_module(arguments))) as server:
            use_token(bench_token(database_url))
            if not arguments.bare:
                create_orgs(server.address, [HOT_ORG, *SPREAD_ORGS], database_url=database_url)
            with tempfile.TemporaryDirectory() as scratch, \
                    Probes(server.process.pid, postmaster_process(data_dir), database_url) as probes, \
                    psycopg.connect(database_url, autocommit=True) as stats:
                profile = Path(scratch) / "profile.txt"
                # Sampling starts with the warm-up and ends with the window.
                sampler = subprocess.Popen(
                    [str(PY_SPY), "record", "--pid", str(server.process.pid), "--format", "raw",
                     "--rate", str(arguments.rate), "--duration",
                     str(int(arguments.warmup_s + arguments.duration_s)), "--output", str(profile),
                     "--gil", *(["--native"] if arguments.native else ["--nonblocking"])],
                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                log = data_dir / "postgres" / LOG_FILE if data_dir is not None else None
                log_start = log.stat().st_size if log is not None else 0
                stats.execute("SELECT pg_stat_reset()")
                before = function_times(stats)
                statements_before = statement_times(stats, database) if has_statements else {}
                result = asyncio.run(load(server.address, scenario, arguments, probes))
                stats.execute("SELECT pg_stat_clear_snapshot()")
                after = function_times(stats)
                statements_after = statement_times(stats, database) if has_statements else {}
                _, sampler_errors = sampler.communicate(timeout=60)
                if sampler.returncode != 0:
                    sys.exit(f"py-spy failed: {sampler_errors.decode(errors='replace')}")
                stacks = collapsed_stacks(profile)
                if arguments.stacks is not None:
                    shutil.copyfile(profile, arguments.stacks)
        explained = explained_plans(log, start=log_start) if log is not None else []

    # The function counters run from the warm-up on, as the sampler does.
    calls = result.calls_per_s * (arguments.warmup_s + arguments.duration_s)
    print(f"{scenario.name} @{arguments.callers}: {result.calls_per_s:.0f} calls/s, "
          f"p50 {result.p50_ms:.2f} ms, p99 {result.p99_ms:.2f} ms; server CPU "
          f"{result.server_cpu_us_per_call:.0f} us a call, PostgreSQL "
          f"{result.database_cpu_us_per_call:.0f} us"
          + (f"; {result.errors} calls failed: {result.error_codes}" if result.errors else ""))
    own, inside, total = top_functions(stacks, arguments.top)
    # Only the thread holding the GIL is sampled (--gil): a thread waiting
    # for a lock or a socket is not using the CPU. What gRPC's core does in
    # its own threads, without the GIL, is not in these samples.
    for title, rows in (("own time", own), ("time inside (with what it calls)", inside)):
        print(f"\nserver, top functions by {title}: share of samples, us of server CPU a call")
        for name, count in rows:
            share = count / total
            print(f"  {share * 100:5.1f}%  {share * result.server_cpu_us_per_call:6.0f} us  {name}")
    print_growth("PostgreSQL, ledger functions (track_functions): calls and own time per scenario call",
                 before, after, calls, top=arguments.top, width=80)
    if has_statements:
        print_growth("PostgreSQL, statements (pg_stat_statements, those inside functions"
                     " included): calls and execution time per scenario call",
                     statements_before, statements_after, calls, top=arguments.top, width=150)
    else:
        print("\nPostgreSQL, statements: pg_stat_statements is not loaded by that server")
    if arguments.plans and explained:
        print("\nPostgreSQL, plans of the statements that took the most time (auto_explain on"
              " a sample of the calls): time in the sample, and one call's plan")
        for total_ms, count, query, plan in explained[:arguments.plans]:
            print(f"\n  {total_ms:.1f} ms in {count} explained: {query[:150]}")
            print("\n".join("    " + line for line in plan_lines(plan)))


if __name__ == "__main__":
    main()
