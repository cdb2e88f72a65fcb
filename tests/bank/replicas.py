"""Server replicas as separate processes, which the nemesis kills with
SIGKILL and starts again on the same port, all from one snapshot of the code."""

import shutil
import time
from pathlib import Path

from tests.server_process import ServerProcess
from tests.support import REPO


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


# Every failed call is logged at INFO: too much for a long soak.
REPLICA_SETTINGS = {"log_level": "WARNING", "shutdown_grace_ms": 5000}


class Replica:
    """One `orgbilling serve` process; keeps its port across restarts so that
    clients reconnect to it."""

    def __init__(self, name: str, database_url: str, code_dir: Path):
        self.name = name
        self.database_url = database_url
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
            process = ServerProcess(self.database_url, port=self.port, cwd=self.code_dir, **REPLICA_SETTINGS)
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
        self.process.kill(timeout_s=10)
        self.process = None

    def is_running(self) -> bool:
        return self.process is not None and self.process.is_running()

    def stop(self) -> int | None:
        """SIGTERM and wait: the graceful way out, for the end of a run."""
        if self.process is None:
            return None
        code = self.process.stop(timeout_s=30)
        self.process = None
        return code
