"""The benchmarks' tools still run against the code as it is: `make bench`,
the profile, the tail and the reports' bench each in a run of a few
seconds, every micro bench shrunk to a few calls, every module imported.

No figure is checked (a timed test measures the machine's noise); what
fails here is a tool that no longer runs. Both kinds happened and showed
only when someone next needed the tool: a micro bench calling a ledger
function a migration had dropped, and one whose fake call lagged the
interceptor it fed (benchmarks/README.md)."""

import importlib
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import benchmarks
import benchmarks.micro
from benchmarks.scenarios import BARE_SCENARIO, SCENARIOS
from tests.server_process import environment_without_settings

REPO = Path(__file__).resolve().parents[1]

# Each micro bench's module constants, shrunk to a second or two.
SHRUNK = {
    "accept_loop": {"ACCEPTS": 200, "ROUNDS": 1, "OPEN_REQUESTS": [1, 7]},
    "access_log_cost": {},  # sized by its flag, below
    "array_dump": {"SIZES": [1, 12]},
    "batch_server_cost": {"ITEMS": 10, "BATCHES": 1},
    "deduct_batch_ceiling": {"DURATION_S": 0.3, "CALLERS": [1, 2], "ROUNDS": 1},
    "deduct_batch_spread": {"ORGS": 16, "BATCHES": 4, "ROUNDS": 1},
    "deduct_batch_statements": {"DEDUCTIONS": 1000},
    "group_commit_cost": {"CALLERS": [1, 4], "ROUND_S": 0.2, "ROUNDS": 1},
    "hand_off": {"ROUND_TRIPS": 200, "ROUNDS": 1},
    "hold_batch_statements": {"HOLDS": 32},
    "lone_deduction": {"CALLS": 20, "ROUNDS": 1},
    "metrics_cost": {"CALLS": 200},
}
FLAGS = {"access_log_cost": ["--lines", "200"]}

# Run in a process of its own (a micro bench configures logging, runs its
# own event loop, starts threads), on the session's PostgreSQL rather than
# an embedded server of its own, and with compare()'s rounds cut to one.
RUN_SHRUNK = """
import asyncio, functools, importlib, inspect, json, sys
import uvloop
import benchmarks.micro.ledger as ledger
import tests.postgres
name, constants, flags, url = json.loads(sys.argv[1])
module = importlib.import_module(f"benchmarks.micro.{name}")
for constant, value in constants.items():
    assert hasattr(module, constant), constant
    setattr(module, constant, tuple(value) if isinstance(value, list) else value)
shared = functools.partial(tests.postgres.Postgres, url)
ledger.Postgres = shared
if hasattr(module, "Postgres"):
    module.Postgres = shared
if hasattr(module, "compare"):
    module.compare = functools.partial(ledger.compare, rounds=1)
sys.argv = [name, *flags]
ran = module.main()
if inspect.iscoroutine(ran):
    uvloop.run(ran)
"""


def _modules(package) -> list[str]:
    return sorted(info.name for info in pkgutil.iter_modules(package.__path__))


def test_every_micro_bench_has_a_shrunk_run_here():
    assert sorted(set(_modules(benchmarks.micro)) - {"ledger"}) == sorted(SHRUNK)


def test_every_micro_bench_is_listed_in_the_benchmarks_readme():
    readme = (REPO / "benchmarks" / "README.md").read_text()
    assert [name for name in SHRUNK if f"python -m benchmarks.micro.{name} " not in readme] == []


@pytest.mark.parametrize("module", _modules(benchmarks))
def test_every_module_of_the_harness_imports(module):
    importlib.import_module(f"benchmarks.{module}")


def _python(*args: str, timeout_s: float = 240) -> str:
    """`python <args>` from the repository; its output, once it exited 0.
    No ORGBILLING_* variable of this shell reaches it: with
    ORGBILLING_DATABASE_URL, a bench would work on that database."""
    finished = subprocess.run([sys.executable, *args], cwd=REPO, env=environment_without_settings(),
                              capture_output=True, text=True, timeout=timeout_s)
    assert finished.returncode == 0, (finished.stdout[-2000:], finished.stderr[-3000:])
    return finished.stdout


@pytest.mark.parametrize("name", sorted(SHRUNK))
def test_the_micro_bench_runs_to_its_end(name, postgres):
    """It prints its figures and exits 0: its SQL, fakes and helpers match
    the code they measure."""
    out = _python("-c", RUN_SHRUNK, json.dumps([name, SHRUNK[name], FLAGS.get(name, []), postgres.admin_url]),
                  timeout_s=120)
    assert out.strip(), f"{name} printed nothing"


def _results(results_dir: Path, pattern: str) -> dict:
    (path,) = results_dir.glob(pattern)
    return json.loads(path.read_text())


@pytest.mark.slow
def test_make_bench_measures_every_scenario_baseline_and_target_in_a_short_run(tmp_path):
    """benchmarks.run, as `make bench` runs it but short: its own embedded
    PostgreSQL and server, pgbench, the big table, one server variant."""
    _python("-m", "benchmarks.run", "--callers", "1", "--duration-s", "0.3", "--warmup-s", "0.1",
            "--big-table-rows", "1000", "--variants", "unprepared", "--results-dir", str(tmp_path))
    run = _results(tmp_path, "*.json")
    measured = {row["scenario"]: row for row in run["scenarios"]}
    assert sorted(measured) == sorted(s.name for s in [BARE_SCENARIO, *SCENARIOS])
    assert [name for name, row in measured.items() if row["calls"] == 0 or row["errors"]] == []
    assert run["baseline_b"]["tps"] > 0 and run["baseline_b"]["failed_transactions"] == 0
    assert run["big_table"]["rows_added"] == 1000 and run["big_table"]["p50_ratio"] > 0
    assert [row["variant"] for row in run["variants"]] == ["unprepared"]
    assert len(run["targets"]) == 11
    assert all(target["measured"] is not None for target in run["targets"])


@pytest.mark.slow
def test_the_profile_samples_the_server_and_times_the_ledger_under_load():
    out = _python("-m", "benchmarks.profile", "--scenario", "deduct_hot", "--callers", "4",
                  "--duration-s", "1", "--warmup-s", "0.2", "--top", "3")
    assert "deduct_hot @4:" in out
    assert "server, top functions by own time" in out
    assert "deduct_credits" in out  # the ledger functions' times, from PostgreSQL


@pytest.mark.slow
def test_the_tail_tool_places_the_slowest_calls_in_time():
    out = _python("-m", "benchmarks.tail", "--scenarios", "noop,deduct_hot", "--callers", "4",
                  "--duration-s", "1", "--warmup-s", "0.2")
    assert "noop" in out and "deduct_hot" in out and "p99" in out


@pytest.mark.slow
def test_the_reports_bench_seeds_and_times_every_report(postgres, tmp_path):
    """The seed at a thousandth of its scale on a database of the session's
    PostgreSQL, then every ReportingService case and the export."""
    url = postgres.create_database("reports_bench_tool", migrated=False)
    _python("-m", "benchmarks.reports", "--scale", "0.001", "--database-url", url, "--callers", "1",
            "--duration-s", "0.2", "--warmup-s", "0", "--export-rows", "2000",
            "--results-dir", str(tmp_path))
    run = _results(tmp_path, "reports-*.json")
    assert run["cases"] and [case["rpc"] for case in run["cases"] if case["calls"] == 0 or case["errors"]] == []
    assert run["export"]["error"] is None and run["export"]["rows"] > 0
