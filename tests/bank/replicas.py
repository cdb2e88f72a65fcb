"""Server replicas as separate processes, which the nemesis kills with
SIGKILL and starts again on the same port."""

import signal
import time

from tests.support import ServerProcess


def replica_environment(database_url: str) -> dict[str, str]:
    return {
        "ORGBILLING_DATABASE_URL": database_url,
        # Every failed call is logged at INFO: too much for a long soak.
        "ORGBILLING_LOG_LEVEL": "WARNING",
        "ORGBILLING_HEALTH_CHECK_INTERVAL_MS": "200",
        "ORGBILLING_SHUTDOWN_GRACE_MS": "5000",
    }


class Replica:
    """One `orgbilling serve` process; keeps its port across restarts so that
    clients reconnect to it."""

    def __init__(self, name: str, database_url: str):
        self.name = name
        self.environment = replica_environment(database_url)
        self.process: ServerProcess | None = None
        self.port: int | None = None
        self.log_paths = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, ready_timeout_s: float = 60.0) -> None:
        """Starts the process and waits until it is SERVING; retries while
        PostgreSQL is restarting (the server migrates, so needs it to start)."""
        deadline = time.monotonic() + ready_timeout_s
        while True:
            process = ServerProcess(self.environment, port=self.port)
            self.port = process.port
            self.log_paths.append(process.log_path)
            try:
                process.start(ready_timeout_s=max(1.0, deadline - time.monotonic()))
                self.process = process
                return
            except (RuntimeError, TimeoutError):
                process.stop(timeout_s=5)
                if time.monotonic() > deadline:
                    raise
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
