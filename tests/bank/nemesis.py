"""The nemesis: one fault at a time, on a seeded schedule, each healed before
the next. Every kind comes once, in a seeded order, before any comes twice,
so even a short run sees them all."""

import collections
import logging
import random
import time

from tests.bank.proxy import TcpProxy
from tests.bank.replicas import Replica
from tests.postgres import Postgres

log = logging.getLogger(__name__)

FAULT_KINDS = (
    "kill_replica",
    "restart_postgres_fast",
    "restart_postgres_immediate",
    "terminate_backends",
    "stall_proxy",
    "drop_proxy",
)


class Nemesis:
    def __init__(self, seed: int, postgres: Postgres, replicas: list[Replica],
                 proxy: TcpProxy, say=print):
        self._rng = random.Random(f"{seed}:nemesis")
        self._postgres = postgres
        self._replicas = replicas
        self._proxy = proxy
        self._say = say
        self._queue: list[str] = []
        self.injected: collections.Counter[str] = collections.Counter()

    def next_kind(self) -> str:
        if not self._queue:
            self._queue = list(FAULT_KINDS)
            self._rng.shuffle(self._queue)
        return self._queue.pop()

    def pause(self, low_s: float, high_s: float) -> float:
        return self._rng.uniform(low_s, high_s)

    def inject_one(self) -> str:
        """Injects the next fault, waits a seeded while, heals it; returns its kind."""
        kind = self.next_kind()
        started = time.monotonic()
        detail = getattr(self, f"_{kind}")()
        self.injected[kind] += 1
        self._say(f"  fault {sum(self.injected.values())}: {kind} {detail}"
                  f" ({time.monotonic() - started:.1f} s)")
        return kind

    def heal_all(self) -> None:
        """Undoes whatever a fault left behind: for the end of a run, also
        after an error."""
        self._proxy.resume()
        if not self._postgres.is_running():
            self._postgres.start()
        for replica in self._replicas:
            if not replica.is_running():
                replica.start()

    # The faults. Each returns a short description for the log.

    def _kill_replica(self) -> str:
        replica = self._rng.choice(self._replicas)
        replica.kill()
        time.sleep(self.pause(0.2, 2.0))
        replica.start()
        return replica.name

    def _restart_postgres(self, mode: str) -> str:
        down_s = self.pause(0.2, 3.0)
        self._postgres.restart(mode, down_s)
        return f"down {down_s:.1f} s"

    def _restart_postgres_fast(self) -> str:
        return self._restart_postgres("fast")

    def _restart_postgres_immediate(self) -> str:
        return self._restart_postgres("immediate")

    def _terminate_backends(self) -> str:
        return f"{self._postgres.terminate_server_backends()} backends"

    def _stall_proxy(self) -> str:
        stall_s = self.pause(0.5, 4.0)
        self._proxy.stall()
        time.sleep(stall_s)
        # Half the time the stalled connections are then cut, as a network
        # partition that ends in resets would.
        dropped = self._proxy.drop() if self._rng.random() < 0.5 else None
        self._proxy.resume()
        return f"{stall_s:.1f} s" + (f", then dropped {dropped} connections" if dropped is not None else "")

    def _drop_proxy(self) -> str:
        return f"{self._proxy.drop()} connections"
