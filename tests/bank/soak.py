"""`make soak`: a long bank run. Prints the seed, every fault and checkpoint,
and the figures; exits 1 if any violation was found.

    python -m tests.bank.soak --duration-s 600 [--seed S] [--replicas N] [--callers N]
"""

import argparse
import dataclasses
import random
import signal
import sys

from tests.bank.run import RunOptions, run_bank
from tests.bank.workload import WorkloadShape


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.bank.soak", description=__doc__.split("\n")[0])
    parser.add_argument("--duration-s", type=float, default=300.0, help="how long callers run (default 300)")
    parser.add_argument("--seed", type=int, default=None, help="replay a run: the same operations and faults")
    parser.add_argument("--replicas", type=int, default=2, help="server processes (default 2; the last one behind the proxy)")
    parser.add_argument("--callers", type=int, default=WorkloadShape.callers, help="concurrent caller threads")
    arguments = parser.parse_args(argv)
    if arguments.replicas < 2:
        parser.error("--replicas must be at least 2")
    return arguments


def _interrupt(signum, frame):
    # SIGTERM cleans up like Ctrl-C: every process the run started is stopped.
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    seed = arguments.seed if arguments.seed is not None else random.SystemRandom().randrange(10**9)
    signal.signal(signal.SIGTERM, _interrupt)
    options = RunOptions(
        seed=seed, duration_s=arguments.duration_s, replicas=arguments.replicas,
        shape=dataclasses.replace(WorkloadShape(), callers=arguments.callers),
    )
    say = lambda line: print(line, flush=True)  # noqa: E731
    try:
        report = run_bank(options, say=say)
    except KeyboardInterrupt:
        say(f"interrupted; seed {seed}; every process it started is stopped")
        return 130
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
