"""Server replicas as separate processes, which the nemesis kills with
SIGKILL and starts again on the same port, all from one snapshot of the code."""

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.support import REPO, ServerProcess, wait_serving


def snapshot_code(into: Path) -> Path:
    """Copies the server's code and migrations as they are now: a long run
    restarts replicas for minutes, and must test one version of the code
    even while the working tree changes under it."""
    ignore = shutil.ignore_patterns("__pycache__")
    # The package as the wheel lays it out. Found before the editable
    # install's mapping: the current directory comes first on sys.path
    # under `python -m`.
    shutil.copytree(REPO / "generated" / "orgbilling", into / "orgbilling", ignore=ignore)
    shutil.copytree(REPO / "server", into / "orgbilling" / "server", ignore=ignore)
    shutil.copytree(REPO / "migrations", into / "orgbilling" / "migrations", ignore=ignore)
    return into


def replica_environment(database_url: str) -> dict[str, str]:
    return {
        "ORGBILLING_DATABASE_URL": database_url,
        # Every failed call is logged at INFO: too much for a long soak.
        "ORGBILLING_LOG_LEVEL": "WARNING",
        "ORGBILLING_HEALTH_CHECK_INTERVAL_MS": "200",
        "ORGBILLING_SHUTDOWN_GRACE_MS": "5000",
    }


class _ServerProcessFrom(ServerProcess):
    """ServerProcess, run from a snapshot of the code instead of the tree."""

    def __init__(self, code_dir: Path, environment: dict[str, str], port: int | None):
        super().__init__(environment, port=port)
        self._code_dir = code_dir

    def start(self, ready_timeout_s: float = 30.0) -> "ServerProcess":
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "orgbilling.server", "serve"], env=self.env, cwd=self._code_dir,
            stdout=self._log, stderr=subprocess.STDOUT,
        )
        wait_serving(self.address, ready_timeout_s, process=self.process, log_path=self.log_path)
        return self


class Replica:
    """One `orgbilling serve` process; keeps its port across restarts so that
    clients reconnect to it."""

    def __init__(self, name: str, database_url: str, code_dir: Path):
        self.name = name
        self.environment = replica_environment(database_url)
        self.code_dir = code_dir
        self.process: ServerProcess | None = None
        self.port: int | None = None
        self.log_paths = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, ready_timeout_s: float = 60.0) -> None:
        """Starts the process and waits until it is SERVING; tries again while
        PostgreSQL is restarting (the server migrates, so needs it to start)."""
        deadline = time.monotonic() + ready_timeout_s
        while True:
            process = _ServerProcessFrom(self.code_dir, self.environment, self.port)
            self.port = process.port
            self.log_paths.append(process.log_path)
            try:
                process.start(ready_timeout_s=max(1.0, deadline - time.monotonic()))
                self.process = process
                return
            except BaseException as error:
                # Also on Ctrl-C while it starts: no process outlives the run.
                process.stop(timeout_s=5)
                if not isinstance(error, (RuntimeError, TimeoutError)):
                    raise
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} not serving after {ready_timeout_s} s;"
                                       f" its last log:\n{process.log()[-3000:]}") from error
                time.sleep(0.5)

    def kill(self) -> None:
        """SIGKILL: no draining, no goodbye, connections cut mid-call."""
        if self.process is None:
            return
        self.process.process.send_signal(signal.SIGKILL)
        self.process.stop(timeout_s=10)
        self.process = None

    def is_running(self) -> bool:
        return self.process is not None and self.process.process.poll() is None

    def stop(self) -> int | None:
        """SIGTERM and wait: the graceful way out, for the end of a run."""
        if self.process is None:
            return None
        code = self.process.stop(timeout_s=30)
        self.process = None
        return code
