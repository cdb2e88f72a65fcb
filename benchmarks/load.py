"""The load generator: N concurrent callers on one asyncio gRPC channel for a
fixed time, after a warm-up, and what the processes spent meanwhile."""

import asyncio
import collections
import dataclasses
import math
import threading
import time

import grpc
import psutil
import psycopg

from benchmarks.scenarios import OneCall


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[rank - 1]


def cpu_seconds(process: psutil.Process | None, with_children: bool = False) -> float:
    """User plus system CPU time of a process (and its current children)."""
    if process is None:
        return math.nan
    processes = [process, *(process.children() if with_children else [])]
    total = 0.0
    for each in processes:
        try:
            times = each.cpu_times()
        except psutil.Error:  # a child that exited between listing and reading
            continue
        total += times.user + times.system
    return total


@dataclasses.dataclass(frozen=True)
class Sample:
    server_s: float
    database_s: float
    client_s: float
    machine_busy_s: float
    machine_total_s: float
    # Sequential scans so far of each hot-path table.
    seq_scans: dict[str, int]


# The tables a deduction reads by key. A sequential scan of one of them per
# call means a plan went wrong (see seq_scans_per_call).
HOT_PATH_TABLES = ("credit_usage_attribution", "organization_credit_pools",
                   "user_credit_allocations", "idempotency_records")


def seq_scans(conn: psycopg.Connection | None) -> dict[str, int]:
    if conn is None:
        return {}
    # Each autocommit statement takes a fresh statistics snapshot.
    rows = conn.execute(
        "SELECT relname, seq_scan FROM pg_stat_user_tables WHERE relname = ANY(%s)",
        (list(HOT_PATH_TABLES),),
    ).fetchall()
    return dict(rows)


class Probes:
    """Reads the CPU time of the server, of PostgreSQL (when it is ours to
    see) and of this client, and samples the server's RSS in a thread."""

    def __init__(self, server_pid: int, postmaster: psutil.Process | None,
                 database_url: str | None = None, rss_interval_s: float = 0.05):
        self.server = psutil.Process(server_pid)
        self.postmaster = postmaster
        self.database = psycopg.connect(database_url, autocommit=True) if database_url else None
        self.client = psutil.Process()
        self._rss_interval_s = rss_interval_s
        self._lock = threading.Lock()
        self.peak_rss_bytes = 0  # over the whole run
        self.window_peak_rss_bytes = 0  # since reset_window_peak()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample_rss, name="rss", daemon=True)

    def __enter__(self) -> "Probes":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()
        if self.database is not None:
            self.database.close()

    def _sample_rss(self) -> None:
        while not self._stop.wait(self._rss_interval_s):
            try:
                rss = self.server.memory_info().rss
            except psutil.Error:
                return  # the server is gone
            with self._lock:
                self.peak_rss_bytes = max(self.peak_rss_bytes, rss)
                self.window_peak_rss_bytes = max(self.window_peak_rss_bytes, rss)

    def reset_window_peak(self) -> None:
        with self._lock:
            self.window_peak_rss_bytes = 0

    def sample(self) -> Sample:
        machine = psutil.cpu_times()
        idle = machine.idle + getattr(machine, "iowait", 0.0)
        total = sum(machine)
        return Sample(
            server_s=cpu_seconds(self.server),
            database_s=cpu_seconds(self.postmaster, with_children=True),
            client_s=cpu_seconds(self.client),
            machine_busy_s=total - idle,
            machine_total_s=total,
            seq_scans=seq_scans(self.database),
        )


@dataclasses.dataclass
class Measurement:
    callers: int
    seconds: float
    calls: int
    errors: int
    error_codes: dict[str, int]
    calls_per_s: float
    p50_ms: float
    p99_ms: float
    # CPU time per successful call, in microseconds.
    server_cpu_us_per_call: float
    database_cpu_us_per_call: float
    client_cpu_us_per_call: float
    # Share of all cores busy during the window, whoever used them.
    machine_busy_pct: float
    server_peak_rss_mb: float
    # Sequential scans of the hot-path tables per call, each and in all.
    # PostgreSQL publishes these counts about once a second, so they are
    # approximate; well above 0 means a deduction scans a table.
    seq_scans_per_call: float
    seq_scans_per_call_by_table: dict[str, float]


async def measure(call: OneCall, callers: int, warmup_s: float, duration_s: float,
                  probes: Probes, *, timeline: list[tuple[float, float]] | None = None) -> Measurement:
    """Runs `callers` loops of `call` for warmup_s + duration_s. Counts the
    calls that end inside the measured window, so calls longer than the
    warm-up (a batch of 1,000) are counted too. Each of those that succeeds
    is added to timeline, if given, as (when it ended in the window, its
    latency), in seconds."""
    latencies: list[float] = []
    error_codes: collections.Counter[str] = collections.Counter()
    window_start = time.perf_counter() + warmup_s
    window_end = window_start + duration_s

    async def caller():
        while time.perf_counter() < window_end:
            started = time.perf_counter()
            try:
                await call()
                failure = None
            except grpc.aio.AioRpcError as error:
                failure = error.code().name
            ended = time.perf_counter()
            if window_start <= ended < window_end:
                if failure:
                    error_codes[failure] += 1
                else:
                    latencies.append(ended - started)
                    if timeline is not None:
                        timeline.append((ended - window_start, ended - started))

    tasks = [asyncio.create_task(caller()) for _ in range(callers)]
    try:
        await asyncio.sleep(max(0.0, window_start - time.perf_counter()))
        probes.reset_window_peak()
        before = probes.sample()
        await asyncio.sleep(max(0.0, window_end - time.perf_counter()))
        after = probes.sample()
        # Calls still running finish before the next scenario starts, so it
        # finds the server idle.
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
    return _summary(callers, duration_s, latencies, error_codes, before, after,
                    probes.window_peak_rss_bytes)


def _summary(callers, duration_s, latencies, error_codes, before: Sample, after: Sample,
             peak_rss_bytes: int) -> Measurement:
    latencies.sort()
    calls = len(latencies)

    def per_call_us(seconds: float) -> float:
        return seconds / calls * 1e6 if calls else math.nan

    machine_total = after.machine_total_s - before.machine_total_s
    scans = {table: (after.seq_scans[table] - count) / calls if calls else math.nan
             for table, count in before.seq_scans.items() if table in after.seq_scans}
    return Measurement(
        callers=callers,
        seconds=duration_s,
        calls=calls,
        errors=sum(error_codes.values()),
        error_codes=dict(error_codes),
        calls_per_s=calls / duration_s,
        p50_ms=percentile(latencies, 0.50) * 1000,
        p99_ms=percentile(latencies, 0.99) * 1000,
        server_cpu_us_per_call=per_call_us(after.server_s - before.server_s),
        database_cpu_us_per_call=per_call_us(after.database_s - before.database_s),
        client_cpu_us_per_call=per_call_us(after.client_s - before.client_s),
        machine_busy_pct=100 * (after.machine_busy_s - before.machine_busy_s) / machine_total
        if machine_total > 0 else math.nan,
        server_peak_rss_mb=peak_rss_bytes / 2**20,
        seq_scans_per_call=sum(scans.values()) if scans else math.nan,
        seq_scans_per_call_by_table=scans,
    )
