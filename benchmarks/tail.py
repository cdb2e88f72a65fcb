"""When a scenario's slowest calls end: spread over the run, or gathered in
a few moments (a stall of the server, the database or the machine).

    python -m benchmarks.tail                                  # noop, then deduct_hot, 64 callers, 15 s each
    python -m benchmarks.tail --scenarios noop,deduct_hot,noop,deduct_hot --callers 64

One server and database, as `make bench` starts them; the scenarios in the
order given, each measured as `make bench` measures it. For each: its p50
and p99, then how the calls slower than its p99 fall into windows of
--window-ms, and the windows that hold the most of them (with the calls
that ended in them and the slowest one). A window of few calls and many
slow ones is a stall; slow calls in every window are the scenario's own
spread. See benchmarks/README.md.
"""

import argparse
import asyncio
import collections

import grpc

from benchmarks.environment import (
    bench_token, benchmark_database, benchmark_server, postmaster_process, stop_on_sigterm,
)
from benchmarks.load import Probes, measure, percentile
from benchmarks.scenarios import HOT_ORG, SCENARIOS, SPREAD_ORGS, Stubs, create_orgs, use_token

WINDOWS_SHOWN = 8


def parse_arguments(argv):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", default="noop,deduct_hot",
                        help="comma-separated names, measured in this order (noop,deduct_hot)")
    parser.add_argument("--callers", type=int, default=64)
    parser.add_argument("--duration-s", type=float, default=15.0)
    parser.add_argument("--warmup-s", type=float, default=2.0)
    parser.add_argument("--window-ms", type=float, default=200.0)
    arguments = parser.parse_args(argv)
    known = {s.name: s for s in SCENARIOS}
    unknown = [name for name in arguments.scenarios.split(",") if name not in known]
    if unknown:
        parser.error(f"unknown scenarios {unknown}; choose among {sorted(known)}")
    arguments.scenarios = [known[name] for name in arguments.scenarios.split(",")]
    return arguments


async def timed_calls(address: str, scenario, arguments, probes) -> list[tuple[float, float]]:
    timeline: list[tuple[float, float]] = []
    async with grpc.aio.insecure_channel(address) as channel:
        await measure(scenario.make_call(Stubs.over(channel)), arguments.callers,
                      arguments.warmup_s, arguments.duration_s, probes, timeline=timeline)
    return timeline


def report(name: str, timeline: list[tuple[float, float]], window_s: float) -> None:
    latencies = sorted(latency for _, latency in timeline)
    p99 = percentile(latencies, 0.99)
    print(f"{name}: {len(latencies)} calls, p50 {percentile(latencies, 0.5) * 1e3:.1f} ms,"
          f" p99 {p99 * 1e3:.1f} ms")
    calls, slow, slowest = collections.Counter(), collections.Counter(), collections.defaultdict(float)
    for ended_s, latency in timeline:
        window = int(ended_s / window_s)
        calls[window] += 1
        slow[window] += latency > p99
        slowest[window] = max(slowest[window], latency)
    print(f"  {sum(slow.values())} calls slower than p99, in {sum(1 for n in slow.values() if n)}"
          f" of {len(calls)} windows of {window_s * 1e3:.0f} ms; the windows with most:")
    print("  window starts (s)   calls   slow   slowest (ms)")
    for window, count in slow.most_common(WINDOWS_SHOWN):
        print(f"  {window * window_s:17.1f} {calls[window]:7d} {count:6d} {slowest[window] * 1e3:12.1f}")


def main(argv=None) -> None:
    arguments = parse_arguments(argv)
    stop_on_sigterm()
    with benchmark_database() as (database_url, data_dir):
        with benchmark_server(database_url) as server:
            use_token(bench_token(database_url))
            create_orgs(server.address, [HOT_ORG, *SPREAD_ORGS], database_url=database_url)
            with Probes(server.process.pid, postmaster_process(data_dir), database_url) as probes:
                for scenario in arguments.scenarios:
                    timeline = asyncio.run(timed_calls(server.address, scenario, arguments, probes))
                    report(scenario.name, timeline, arguments.window_ms / 1000)


if __name__ == "__main__":
    main()
