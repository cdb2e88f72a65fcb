"""`orgbilling serve` as a separate process on a free port: the one runner
of the lifecycle, fault and attack tests, the bank's replicas, the wheel
test and the benchmarks."""

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import grpc

from tests.support import REPO, Client, admin_token


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def environment_without_settings(variables: Mapping[str, str] = {}) -> dict[str, str]:
    """This process's environment minus every ORGBILLING_* variable, plus
    `variables`: what a child process of the tests gets, so that settings
    from the developer's shell (ORGBILLING_DATABASE_URL above all) never
    reach it by accident."""
    environment = {name: value for name, value in os.environ.items() if not name.startswith("ORGBILLING_")}
    return environment | dict(variables)


def setting_variables(settings: Mapping[str, object]) -> dict[str, str]:
    """{"pool_size_max": 4} -> {"ORGBILLING_POOL_SIZE_MAX": "4"}."""
    return {f"ORGBILLING_{name.upper()}": str(value) for name, value in settings.items()}


class ServerProcess:
    """`orgbilling serve` as a separate process, over database_url ("" for
    the embedded default, in data_dir), with `settings` as ORGBILLING_*
    variables. Its environment is this one's without any ORGBILLING_*
    variable, unless inherit_settings (the benchmarks: every setting of
    their environment reaches the server, below the ones given here).

    By default it runs this checkout's code; `cwd` runs it from elsewhere
    (a snapshot of the code, whose package comes first on sys.path under
    `python -m`), `command` runs another executable (an installed wheel's).

    `token` is an all-scopes key for it: the one given, else (on first use)
    the local admin key the server saved in its data directory with the
    embedded default, or a new key in its database. As a context manager,
    it is started on entry and stopped on exit."""

    def __init__(self, database_url: str, *, data_dir: Path | None = None, port: int | None = None,
                 token: str | None = None, cwd: Path = REPO, command: Sequence[str] | None = None,
                 inherit_settings: bool = False, **settings):
        self._token = token
        self.database_url = database_url
        self.cwd = Path(cwd)
        self.data_dir = self.cwd / (data_dir or ".orgbilling")
        self.command = list(command or [sys.executable, "-m", "orgbilling.server", "serve"])
        self.port = port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        variables = {
            "ORGBILLING_LISTEN_ADDRESS": self.address,
            "ORGBILLING_HEALTH_CHECK_INTERVAL_MS": "200",
            "ORGBILLING_DATABASE_URL": database_url,
            **({"ORGBILLING_DATA_DIR": str(data_dir)} if data_dir is not None else {}),
            **setting_variables(settings),
        }
        self.env = ({**os.environ, **variables} if inherit_settings
                    else environment_without_settings(variables))
        descriptor, log_path = tempfile.mkstemp(prefix="orgbilling-server-", suffix=".log")
        os.close(descriptor)
        self.log_path = Path(log_path)
        self.process: subprocess.Popen | None = None

    def start(self, ready_timeout_s: float = 30.0) -> "ServerProcess":
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            self.command, env=self.env, cwd=self.cwd, stdout=self._log, stderr=subprocess.STDOUT,
        )
        wait_serving(self.address, ready_timeout_s, process=self.process, log_path=self.log_path)
        return self

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def token(self) -> str:
        if self._token is None:
            if self.database_url:
                self._token = admin_token(self.database_url)
            else:
                from orgbilling.server.auth.local_admin import ADMIN_KEY_FILE_NAME

                self._token = (self.data_dir / ADMIN_KEY_FILE_NAME).read_text().strip()
        return self._token

    def client(self, **options) -> Client:
        """A Client of this server that sends its token."""
        return Client(self.address, token=self.token, **options)

    @property
    def pid(self) -> int:
        return self.process.pid

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self, timeout_s: float = 10.0) -> int:
        """SIGKILL: no draining, no goodbye, connections cut mid-call."""
        if self.is_running():
            self.process.send_signal(signal.SIGKILL)
        return self.stop(timeout_s)

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM, and SIGKILL after timeout_s; returns the exit code."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.terminate()
        try:
            code = self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        self._log.close()
        return code

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def cpu_seconds(self) -> float:
        """User + system CPU the process has used so far."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_serving(address: str, timeout_s: float, process=None, log_path=None) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode}:\n{Path(log_path).read_text()}")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise TimeoutError(f"server at {address} not SERVING after {timeout_s}s")
