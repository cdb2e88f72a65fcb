"""One bank run: a private PostgreSQL, replicas (the last one behind the
proxy), callers, the nemesis and the checker; then a report."""

import collections
import concurrent.futures
import contextlib
import dataclasses
import random
import threading
import time

from orgbilling.v1 import org_billing_service_pb2 as billing_pb
from orgbilling.v1 import types_pb2
from tests.bank.checker import check
from tests.bank.connect import connect
from tests.bank.history import History, Operation, Outcome
from tests.bank.nemesis import Nemesis
from tests.bank.proxy import TcpProxy
from tests.bank.replicas import Replica, snapshot_code
from tests.bank.workload import Caller, Settler, UsageHints, WorkloadShape
from tests.postgres import Postgres
from tests.server_process import wait_serving
from tests.support import admin_token


@dataclasses.dataclass(frozen=True)
class RunOptions:
    seed: int
    duration_s: float
    replicas: int = 2
    shape: WorkloadShape = WorkloadShape()
    # Calm between two faults, drawn from this range.
    fault_gap_s: tuple[float, float] = (1.0, 4.0)
    checkpoint_interval_s: float = 20.0
    # After the run, how long indeterminate operations may take to resolve.
    resolve_timeout_s: float = 120.0


@dataclasses.dataclass
class Report:
    seed: int
    elapsed_s: float
    counters: collections.Counter
    faults: collections.Counter
    checkpoints: int
    violations: list[str]

    @property
    def ok(self) -> bool:
        return not self.violations

    def lines(self) -> list[str]:
        c = self.counters
        lines = [
            f"seed {self.seed} (replay: --seed {self.seed}), {self.elapsed_s:.0f} s",
            f"operations attempted {c['attempted']}: acknowledged {c['acknowledged']},"
            f" refused {c['refused']}, still indeterminate {c['unresolved']}",
            f"indeterminate at least once {c['indeterminate']}: later resolved {c['later resolved']}"
            f" ({c['later acknowledged']} acknowledged, {c['acknowledged as a replay']} of them as"
            f" a replay of an earlier attempt; {c['later refused']} refused);"
            f" first attempts answered as a replay (the server's own retry): {c['replayed on the first attempt']}",
            f"attempts {c['attempts']}; indeterminate attempts by code: "
            + _join(c, "indeterminate attempts "),
            "by kind (attempted/acknowledged/refused): " + ", ".join(
                f"{kind} {c['attempted/' + kind]}/{c['acknowledged/' + kind]}/{c['refused/' + kind]}"
                for kind in sorted(k.split('/', 1)[1] for k in c if k.startswith('attempted/'))),
            "refusals by reason: " + _join(c, "reason "),
            f"refunds: acknowledged {c['acknowledged/refund']} ({c['later acknowledged/refund']} after an"
            f" indeterminate attempt, {c['acknowledged as a replay/refund']} of them as a replay;"
            f" {c['later refused/refund']} refused after one),"
            f" refused as more than is left {c['reason REFUND_EXCEEDS_DEDUCTION']};"
            f" deductions refunded {c['deductions refunded']}, more than once"
            f" {c['deductions refunded more than once']}, in full {c['deductions refunded in full']}",
            f"faults injected {sum(self.faults.values())}: "
            + ", ".join(f"{kind} {count}" for kind, count in sorted(self.faults.items())),
            f"checkpoints {self.checkpoints}; violations {len(self.violations)}",
        ]
        lines += [f"  VIOLATION: {violation}" for violation in self.violations[:50]]
        return lines


def _join(counter, prefix: str) -> str:
    return ", ".join(f"{key[len(prefix):]} {value}" for key, value in sorted(counter.items())
                     if key.startswith(prefix)) or "none"


def account_setup_steps(shape: WorkloadShape, org_id: str) -> list[tuple]:
    """(method, request, user_id, amount) of each call that sets an org up."""
    # BYOK: a plan with no refresh, so that a pool holds only what the
    # workload adds (small, to run dry) and the model's total is its sum.
    steps = [
        ("CreateSubscription", billing_pb.CreateSubscriptionRequest(
            org_id=org_id, plan=types_pb2.PLAN_BYOK, billing_cycle=types_pb2.BILLING_CYCLE_MONTHLY,
            idempotency_key=f"setup-{org_id}"), "", 0),
        ("AddCredits", billing_pb.AddCreditsRequest(
            org_id=org_id, source=types_pb2.CREDIT_SOURCE_GRANT, reason="bank setup",
            amount_millicredits=shape.initial_pool_millicredits,
            idempotency_key=f"setup-{org_id}-grant"), "", shape.initial_pool_millicredits),
    ]
    for user_id in shape.user_ids():
        steps.append(("AllocateCredits", billing_pb.AllocateCreditsRequest(
            org_id=org_id, user_id=user_id, limit_millicredits=shape.initial_limit_millicredits,
            reset_period=types_pb2.RESET_PERIOD_NEVER, idempotency_key=f"setup-{org_id}-{user_id}"),
            user_id, shape.initial_limit_millicredits))
    return steps


class BankRun:
    def __init__(self, options: RunOptions, say=print):
        self.options = options
        self.say = say
        self.history = History()
        self.hints = UsageHints(options.shape)
        self.violations: list[str] = []
        self.checkpoints = 0

    def run(self) -> Report:
        started = time.monotonic()
        self.say(f"bank: seed {self.options.seed}, {self.options.duration_s:.0f} s,"
                 f" {self.options.replicas} replicas, {self.options.shape.callers} callers")
        with contextlib.ExitStack() as cleanup:
            postgres = Postgres(prefix="orgbilling-bank-")
            cleanup.callback(postgres.close)
            code_dir = snapshot_code(postgres.root / "code")
            database_url = postgres.create_database(
                "bank", migrations_dir=code_dir / "orgbilling" / "migrations")
            token = admin_token(database_url)  # before the replicas start: they load keys periodically
            proxy = TcpProxy(postgres.socket_path)
            cleanup.callback(proxy.close)
            replicas = self._start_replicas(postgres, database_url, proxy, code_dir, cleanup)
            cleanup.callback(proxy.resume)  # before replicas stop: a stalled one would not
            connections = [connect(replica.address, token) for replica in replicas]
            for connection in connections:
                cleanup.callback(connection.close)
            settler = Settler(connections, self.history, self.hints, self.options.shape)
            self._set_up_accounts(settler)
            nemesis = Nemesis(self.options.seed, postgres, replicas, proxy, say=self.say)
            unresolved = self._run_workload(settler, nemesis, database_url, cleanup)
            nemesis.heal_all()
            for replica in replicas:
                wait_serving(replica.address, 60)
            self._resolve(settler, unresolved)
            self.violations += check(self.history, database_url, final=True)
            self.violations += self._stop_replicas(replicas)
            self._keep_logs_if_violated(replicas)
        return Report(self.options.seed, time.monotonic() - started, self._counters(),
                      nemesis.injected, self.checkpoints, _unique(self.violations))

    def _start_replicas(self, postgres, database_url, proxy, code_dir, cleanup) -> list[Replica]:
        """All replicas on one database; the last reaches it through the
        proxy, so that stalls and drops hit one replica and not the others."""
        replicas = []
        for number in range(self.options.replicas):
            behind_proxy = number == self.options.replicas - 1
            url = proxy.proxied_url(database_url) if behind_proxy else database_url
            replica = Replica(f"replica-{number}" + (" (via proxy)" if behind_proxy else ""), url, code_dir)
            cleanup.callback(replica.stop)
            replica.start()
            replicas.append(replica)
        return replicas

    def _set_up_accounts(self, settler: Settler) -> None:
        """Subscribes each org, funds its pool and gives each user a limit,
        before any fault; these are operations like the others, checked alike."""
        rng = random.Random(f"{self.options.seed}:setup")
        for org_id in self.options.shape.org_ids():
            for number, (method, request, user_id, amount) in enumerate(
                    account_setup_steps(self.options.shape, org_id)):
                operation = Operation(number, "setup", method, request, org_id, user_id, amount,
                                      request.idempotency_key)
                self.history.begin(operation)
                give_up_at = time.monotonic() + 60
                settler.settle(operation, rng, lambda: time.monotonic() > give_up_at, timeout_s=10)
                if operation.outcome is not Outcome.ACKNOWLEDGED:
                    raise RuntimeError(f"setup failed: {operation}")

    def _run_workload(self, settler, nemesis: Nemesis, database_url, cleanup) -> list[Operation]:
        """Callers run while the nemesis injects faults, with checkpoints in
        between; returns the operations left indeterminate."""
        stop = threading.Event()
        callers = [Caller(index, self.options.seed, self.options.shape, settler, self.history,
                          self.hints, stop) for index in range(self.options.shape.callers)]
        cleanup.callback(stop.set)  # also on an error: threads must not outlive the run
        for caller in callers:
            caller.start()
        end = time.monotonic() + self.options.duration_s
        next_checkpoint = time.monotonic() + self.options.checkpoint_interval_s
        try:
            while True:
                gap = nemesis.pause(*self.options.fault_gap_s)
                if time.monotonic() + gap >= end:
                    time.sleep(max(0.0, end - time.monotonic()))
                    break
                time.sleep(gap)
                nemesis.inject_one()
                if time.monotonic() >= next_checkpoint:
                    self._checkpoint(database_url)
                    next_checkpoint = time.monotonic() + self.options.checkpoint_interval_s
        finally:
            stop.set()
            for caller in callers:
                caller.join(timeout=60)
        errors = [caller.error for caller in callers if caller.error is not None]
        if errors:
            raise RuntimeError(f"{len(errors)} callers failed") from errors[0]
        return [operation for caller in callers for operation in caller.unresolved]

    def _checkpoint(self, database_url: str) -> None:
        found = check(self.history, database_url, final=False)
        self.checkpoints += 1
        self.say(f"  checkpoint {self.checkpoints}: {len(self.history.snapshot())} operations,"
                 f" {len(found)} violations")
        new = [violation for violation in found if violation not in self.violations]
        for violation in new[:10]:  # now, in case the run does not reach its report
            self.say(f"    VIOLATION: {violation}")
        self.violations += new

    def _resolve(self, settler: Settler, unresolved: list[Operation]) -> None:
        """With every fault healed, retries each indeterminate operation,
        with its key, until it resolves."""
        self.say(f"  resolving {len(unresolved)} indeterminate operations")
        give_up_at = time.monotonic() + self.options.resolve_timeout_s
        rng = random.Random(f"{self.options.seed}:resolve")
        with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(lambda op: settler.settle(
                op, random.Random(rng.random()), lambda: time.monotonic() > give_up_at, timeout_s=5),
                unresolved))

    def _keep_logs_if_violated(self, replicas: list[Replica]) -> None:
        if self.violations:
            self.say("server logs: " + " ".join(str(p) for r in replicas for p in r.log_paths))
            return
        for replica in replicas:
            for path in replica.log_paths:
                path.unlink(missing_ok=True)

    def _stop_replicas(self, replicas: list[Replica]) -> list[str]:
        """SIGTERM each replica; a graceful stop exits 0."""
        problems = []
        for replica in replicas:
            code = replica.stop()
            if code != 0:
                problems.append(f"{replica.name} exited with {code} on SIGTERM")
        return problems

    def _counters(self) -> collections.Counter:
        counters = collections.Counter(self.history.counters)
        operations = self.history.snapshot()
        for operation in operations:
            outcome = operation.outcome
            counters[outcome.value if outcome is not Outcome.INDETERMINATE else "unresolved"] += 1
            if outcome is not Outcome.INDETERMINATE:
                counters[f"{outcome.value}/{operation.kind}"] += 1
            if operation.indeterminate_attempts:
                counters["indeterminate"] += 1
                if outcome is not Outcome.INDETERMINATE:
                    counters["later resolved"] += 1
                    counters[f"later {outcome.value}"] += 1
                    counters[f"later resolved/{operation.kind}"] += 1
                    counters[f"later {outcome.value}/{operation.kind}"] += 1
        counters.update(refund_counters(operations))
        return counters


def refund_counters(operations: list[Operation]) -> collections.Counter:
    """How the acknowledged refunds fell on deductions: the more share one,
    the more the sum of its refunds was contended."""
    acknowledged = [operation for operation in operations if operation.outcome is Outcome.ACKNOWLEDGED]
    charged = {operation.effect_id: operation.amount_millicredits for operation in acknowledged
               if operation.method in ("DeductCredits", "CommitReservation")}
    refunds = collections.Counter()
    given_back = collections.Counter()
    for operation in acknowledged:
        if operation.method == "RefundCredits":
            refunds[operation.refunded_deduction_id] += 1
            given_back[operation.refunded_deduction_id] -= operation.amount_millicredits
    return collections.Counter({
        "deductions refunded": len(refunds),
        "deductions refunded more than once": sum(1 for count in refunds.values() if count > 1),
        "deductions refunded in full": sum(1 for deduction_id, amount in given_back.items()
                                           if amount == charged.get(deduction_id)),
    })


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def run_bank(options: RunOptions, say=print) -> Report:
    report = BankRun(options, say).run()
    for line in report.lines():
        say(line)
    return report
