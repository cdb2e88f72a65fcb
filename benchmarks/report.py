"""The printed table, the issue-5 targets next to what was measured, and
the JSON file. Every figure is also given as a ratio to a baseline of the
same run, because the machine is small, shared and noisy."""

import dataclasses
import json
import math
from pathlib import Path

from benchmarks.load import Measurement
from benchmarks.scenarios import BASELINE_A


def ratio(value: float, baseline: float) -> float:
    if not baseline or math.isnan(baseline) or math.isnan(value):
        return math.nan
    return value / baseline


def with_ratios_to_a(rows: list[dict]) -> list[dict]:
    """Adds to each row its throughput and latencies over baseline A's at
    the same number of callers."""
    baseline = {row["callers"]: row for row in rows if row["scenario"] == BASELINE_A}
    for row in rows:
        a = baseline.get(row["callers"])
        row["vs_a"] = {
            key: ratio(row[key], a[key]) if a else math.nan
            for key in ("calls_per_s", "p50_ms", "p99_ms")
        }
    return rows


def with_ratios_to_b(rows: list[dict], baseline_b: dict | None) -> list[dict]:
    """Adds to each deduction row its deductions/s over pgbench's tps."""
    for row in rows:
        if row["deductions_per_s"] and baseline_b:
            row["vs_b"] = ratio(row["deductions_per_s"], baseline_b["tps"])
    return rows


def scenario_row(name: str, description: str, deductions_per_call: int,
                 measurement: Measurement) -> dict:
    row = {"scenario": name, "description": description, **dataclasses.asdict(measurement)}
    row["deductions_per_s"] = measurement.calls_per_s * deductions_per_call
    return row


def _cell(value: float, digits: int) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _ratio_cell(value: float) -> str:
    """Three significant digits at most, so a column never overflows."""
    if value is None or math.isnan(value):
        return "-"
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def _print_header(*columns: tuple[str, int]) -> None:
    """A table's header and its rule: each column's title and width,
    negative for a left-aligned column."""
    header = "".join(f"{title:<{-width}}" if width < 0 else f"{title:>{width}}"
                     for title, width in columns)
    print(header)
    print("-" * len(header))


def print_table(rows: list[dict]) -> None:
    _print_header(("scenario", -17), ("callers", 8), ("calls/s", 9), ("xA", 6), ("p50 ms", 8),
                  ("xA", 6), ("p99 ms", 8), ("xA", 6), ("deduct/s", 9), ("xB", 6), ("errors", 7),
                  ("srv us", 9), ("db us", 9), ("cli us", 8), ("busy%", 6), ("rss MB", 7),
                  ("seq/call", 9))
    for row in rows:
        vs_a = row["vs_a"]
        print(f"{row['scenario']:<17}{row['callers']:>8}{_cell(row['calls_per_s'], 0):>9}"
              f"{_ratio_cell(vs_a['calls_per_s']):>6}{_cell(row['p50_ms'], 2):>8}"
              f"{_ratio_cell(vs_a['p50_ms']):>6}{_cell(row['p99_ms'], 2):>8}"
              f"{_ratio_cell(vs_a['p99_ms']):>6}"
              f"{_cell(row['deductions_per_s'] or math.nan, 0):>9}"
              f"{_ratio_cell(row.get('vs_b', math.nan)):>6}{row['errors']:>7}"
              f"{_cell(row['server_cpu_us_per_call'], 0):>9}"
              f"{_cell(row['database_cpu_us_per_call'], 0):>9}"
              f"{_cell(row['client_cpu_us_per_call'], 0):>8}"
              f"{_cell(row['machine_busy_pct'], 0):>6}{_cell(row['server_peak_rss_mb'], 0):>7}"
              f"{_cell(row['seq_scans_per_call'], 2):>9}")
        if row["errors"]:
            print(f"{'':<17}errors: {row['error_codes']}")


def find(rows: list[dict], scenario: str, callers: int) -> dict | None:
    return next((r for r in rows if r["scenario"] == scenario and r["callers"] == callers), None)


def targets(results: dict) -> list[dict]:
    """The performance issues' targets (5, then 14) against this run's
    figures, each a ratio to a baseline of the same run where it can be.
    Reported, not asserted."""
    rows = results["scenarios"]
    top = max(row["callers"] for row in rows)
    hot, spread = find(rows, "deduct_hot", top), find(rows, "deduct_spread", top)
    noop, bare = find(rows, BASELINE_A, top), find(rows, "noop_bare", top)
    check = find(rows, "check", top)
    one, noop_one = find(rows, "deduct_hot", 1), find(rows, BASELINE_A, 1)
    pair = find(rows, "reserve_commit_hot", top)
    b = results.get("baseline_b")
    big = results.get("big_table")
    batch = [r for r in rows if r["scenario"].startswith("deduct_batch")]
    found = []

    def add(name: str, measured: float | None, limit: float, at_least: bool, unit: str = ""):
        met = None if measured is None or math.isnan(measured) else (
            measured >= limit if at_least else measured <= limit)
        found.append({"target": name, "measured": measured, "limit": limit,
                      "at_least": at_least, "unit": unit, "met": met})

    def over(a: dict | None, b: dict | None, key: str) -> float | None:
        return ratio(a[key], b[key]) if a and b else None

    add(f"noop @{top} / bare grpcio noop (A0)", over(noop, bare, "calls_per_s"), 0.9, True, "x")
    add(f"hot deduct @{top} / noop", over(hot, noop, "calls_per_s"), 0.6, True, "x")
    add(f"hot deduct @{top} p99 / noop p99", over(hot, noop, "p99_ms"), 1.5, False, "x")
    add(f"spread deduct @{top} / hot deduct", over(spread, hot, "calls_per_s"), 1.0, True, "x")
    add(f"check @{top} / noop", over(check, noop, "calls_per_s"), 0.8, True, "x")
    add("hot deduct @1 p50 / noop @1 p50", over(one, noop_one, "p50_ms"), 2.0, False, "x")
    add("batch deductions/s on a hot pool",
        max(r["deductions_per_s"] for r in batch) if batch else None, 50_000, True, "/s")
    add(f"big table ({big['rows_added']:,} rows) p50 / empty p50" if big else "big table p50 / empty p50",
        big["p50_ratio"] if big else None, 1.1, False, "x")
    # A reserve and its commit take one round trip more than a deduction,
    # and no more server work than that.
    add(f"reserve+commit @{top} time / hot deduct time",
        ratio(hot["calls_per_s"], pair["calls_per_s"]) if hot and pair else None, 2.2, False, "x")
    add(f"hot deduct @{top} / baseline B (pgbench)",
        ratio(hot["calls_per_s"], b["tps"]) if hot and b else None, 2.0, True, "x")
    add("server peak RSS", results["server_peak_rss_mb"], 200.0, False, "MB")
    return found


def print_summary(results: dict) -> None:
    print()
    print("Each scenario: its own warm-up, then the measured window. xA: this figure over")
    print("baseline A's (health Check) at the same callers; xB: deductions/s over baseline B's")
    print("(pgbench) tps. srv/db/cli us: CPU microseconds per call of the server, PostgreSQL")
    print("and this client; busy%: all cores, whoever used them; rss MB: server peak;")
    print("seq/call: sequential scans of the hot-path tables per call (should be ~0).")
    scanning = [f"{row['scenario']} @{row['callers']}" for row in results["scenarios"]
                if row["seq_scans_per_call"] is not None and row["seq_scans_per_call"] >= 0.1]
    if scanning:
        print()
        print(f"warning: sequential scans of hot-path tables in {', '.join(scanning)}: a")
        print("  plan cached while a table was tiny, kept as it grew (see benchmarks/README.md).")
    b = results.get("baseline_b")
    if b:
        print()
        print(f"Baseline B, pgbench deduct_credits(), {b['clients']} clients, "
              f"{b['threads']} threads, {b['seconds']:.0f} s: {b['tps']:.0f} tps, "
              f"average {b['latency_average_ms']:.2f} ms, {b['failed_transactions']} failed")
        if b["attribution_rows"] != b["transactions"]:
            print(f"  warning: {b['transactions']} transactions wrote "
                  f"{b['attribution_rows']} attribution rows")
        top = max(row["callers"] for row in results["scenarios"])
        for name in ("deduct_hot", "deduct_spread", "deduct_batch_hot"):
            row = find(results["scenarios"], name, top)
            if row and "vs_b" in row:
                print(f"  {name} @{top}: {row['deductions_per_s']:.0f}/s = "
                      f"{row['vs_b']:.2f}x baseline B")
    big = results.get("big_table")
    if big:
        print()
        print(f"Big table: +{big['rows_added']:,} attribution rows, inserted and vacuumed in "
              f"{big['fill_s']:.0f} s ({big['table_rows_before']:,} -> {big['table_rows_after']:,} rows)")
        for label, before, after in (("deduct @1", big["before"], big["after"]),
                                     ("noop @1 (machine check)", big["noop_before"], big["noop_after"])):
            print(f"  {label:<24} p50 {before['p50_ms']:.2f} -> {after['p50_ms']:.2f} ms "
                  f"= {ratio(after['p50_ms'], before['p50_ms']):.2f}x, p99 {before['p99_ms']:.2f}"
                  f" -> {after['p99_ms']:.2f} ms, cores busy {before['machine_busy_pct']:.0f}%"
                  f" -> {after['machine_busy_pct']:.0f}%")
    print()
    print(f"Server peak RSS over the run: {results['server_peak_rss_mb']:.0f} MB")
    print()
    print("Targets (issues 5 and 14; reported, not asserted):")
    for target in results["targets"]:
        measured = target["measured"]
        shown = "not measured" if measured is None or math.isnan(measured) else f"{measured:,.2f} {target['unit']}"
        verdict = {True: "met", False: "MISSED", None: "-"}[target["met"]]
        sign = ">=" if target["at_least"] else "<="
        print(f"  {target['target']:<44} {shown:>14}  (target {sign} {target['limit']:,} "
              f"{target['unit']})  {verdict}")


def print_variants(variants: list[dict], *, rounds: int) -> None:
    """The server variants' table (benchmarks.run.measure_variant)."""
    if not variants:
        return
    print()
    print("Server variants: a second server with other settings, same run and database; each")
    print(f"scenario measured on the main server and on the variant in turn, {rounds} rounds")
    print("(means shown). x: variant / main. noop, without the database, is the control.")
    _print_header(("variant", -12), ("scenario", -12), ("callers", 8), ("calls/s", 9), ("->", 8),
                  ("x", 6), ("p50 ms", 8), ("->", 7), ("x", 6), ("p99 ms", 8), ("->", 7),
                  ("srv us", 8), ("->", 6), ("db us", 7), ("->", 6), ("x", 6))
    for variant in variants:
        if variant.get("skipped"):
            print(f"{variant['variant']:<12}skipped: {variant['skipped']}")
            continue
        for row in variant["rows"]:
            main_row, other, x = row["main"], row["variant"], row["x"]
            print(f"{variant['variant']:<12}{row['scenario']:<12}{variant['callers']:>8}"
                  f"{_cell(main_row['calls_per_s'], 0):>9}{_cell(other['calls_per_s'], 0):>8}"
                  f"{_ratio_cell(x['calls_per_s']):>6}"
                  f"{_cell(main_row['p50_ms'], 2):>8}{_cell(other['p50_ms'], 2):>7}"
                  f"{_ratio_cell(x['p50_ms']):>6}"
                  f"{_cell(main_row['p99_ms'], 2):>8}{_cell(other['p99_ms'], 2):>7}"
                  f"{_cell(main_row['server_cpu_us_per_call'], 0):>8}"
                  f"{_cell(other['server_cpu_us_per_call'], 0):>6}"
                  f"{_cell(main_row['database_cpu_us_per_call'], 0):>7}"
                  f"{_cell(other['database_cpu_us_per_call'], 0):>6}"
                  f"{_ratio_cell(x['database_cpu_us_per_call']):>6}")
            if main_row["errors"] or other["errors"]:
                print(f"{'':<24}errors: main {main_row['error_codes']}, variant {other['error_codes']}")
        print(f"{'':<12}{variant['description']}")


def write_json(results: dict, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{results['started_at'].replace(':', '').replace('-', '')}.json"
    # NaN is not JSON: write null instead.
    path.write_text(json.dumps(_without_nan(results), indent=2) + "\n")
    return path


def _without_nan(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: _without_nan(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_without_nan(item) for item in value]
    return value
