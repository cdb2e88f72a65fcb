"""PgBouncer in transaction mode in front of the tests' PostgreSQL, as
production runs it: each transaction of a client may run on another server
connection, which other clients share.

Debian's package (1.18 here) is what `make test` installs (as root); where
pgbouncer cannot be found, missing_reason() says why and the tests skip."""

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import contextlib

import grpc
import psycopg

from orgbilling.v1 import credit_service_pb2 as pb
from tests.server_process import free_port
from tests.support import Client


def executable() -> str | None:
    # Debian installs it in /usr/sbin, which a non-root PATH may lack.
    return shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin:/usr/local/sbin")


def missing_reason() -> str | None:
    if executable() is None:
        return ("pgbouncer is not installed: `make test` installs Debian's package when run as"
                " root; elsewhere, `apt-get install pgbouncer`")
    return None


class PgBouncer:
    """A pgbouncer process on a free 127.0.0.1 port, in transaction mode, with
    at most pool_size server connections per database, in front of the
    PostgreSQL at server_url (whose user it logs in as): every database of
    that server is reachable through it by its name (url()). Run as root, it
    runs as run_as (the user PostgreSQL runs as, who can reach its socket).

    `upstream` is where it connects: the server's own host and port by
    default, or another (the bank test's TCP proxy, so that its stalls and
    drops hit the pooler's server connections). The startup parameter
    `options` is ignored, as 1.18 refuses a connection that sends it
    otherwise (see the README's Operations section). `settings` add to or
    replace those of its [pgbouncer] section (deploy/pgbouncer/pgbouncer.ini's)."""

    def __init__(self, server_url: str, *, pool_size: int, run_as: str | None = None,
                 upstream: tuple[str, int] | None = None, settings: dict[str, str] | None = None):
        program = executable()
        if program is None:
            raise RuntimeError(missing_reason())
        server = psycopg.conninfo.conninfo_to_dict(server_url)
        host, port = upstream or (server.get("host") or "localhost", int(server.get("port") or 5432))
        user = server.get("user") or "postgres"
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="orgbilling-pgbouncer-"))
        login = f" user={user}" + (f" password={server['password']}" if server.get("password") else "")
        (self.root / "userlist.txt").write_text(f'"{user}" ""\n')
        options = {
            "pool_mode": "transaction", "default_pool_size": str(pool_size), "max_client_conn": "1000",
            "ignore_startup_parameters": "options", **(settings or {}),
            # Where it listens, logs and finds its users: the test's own.
            "listen_addr": "127.0.0.1", "listen_port": str(self.port), "unix_socket_dir": "",
            "auth_type": "trust", "auth_file": f"{self.root}/userlist.txt",
            "logfile": f"{self.root}/pgbouncer.log",
        }
        (self.root / "pgbouncer.ini").write_text(
            f"[databases]\n* = host={host} port={port}{login}\n\n[pgbouncer]\n"
            + "".join(f"{name} = {value}\n" for name, value in options.items()))
        command = [program, str(self.root / "pgbouncer.ini")]
        if os.geteuid() == 0:
            # PgBouncer refuses to run as root: it switches to PostgreSQL's own
            # user (its -u, not subprocess's user=, for the reason
            # tests/postgres.py gives for runuser; runuser would take 2 s to stop).
            system_user = run_as or "nobody"
            shutil.chown(self.root, system_user)
            for path in self.root.iterdir():
                shutil.chown(path, system_user)
            command = [program, "-u", system_user, str(self.root / "pgbouncer.ini")]
        self._output = open(self.root / "output.log", "wb")
        self.process = subprocess.Popen(command, stdout=self._output, stderr=subprocess.STDOUT)
        try:
            self._wait_ready(server_url)
        except BaseException:
            self.close()
            raise

    def url(self, database_url: str) -> str:
        """The same database, reached through this PgBouncer."""
        info = psycopg.conninfo.conninfo_to_dict(database_url)
        info.update(host="127.0.0.1", port=str(self.port))
        info.pop("password", None)
        return psycopg.conninfo.make_conninfo(**info)

    def log(self) -> str:
        return "".join(path.read_text(errors="replace") for path in
                       (self.root / "output.log", self.root / "pgbouncer.log") if path.exists())

    def _wait_ready(self, admin_url: str, timeout_s: float = 15.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"pgbouncer exited with {self.process.returncode}: {self.log()}")
            try:
                with psycopg.connect(self.url(admin_url), connect_timeout=2, prepare_threshold=None) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._output.close()
        shutil.rmtree(self.root, ignore_errors=True)


def check_codes(address: str, token: str, calls: int) -> list[grpc.StatusCode]:
    """The codes of `calls` CheckCredits of an unknown org, one after another
    on one channel: NOT_FOUND when a call worked (it reached the database,
    through whichever server connection the pool handed out)."""
    codes = []
    with contextlib.closing(Client(address, token=token)) as client:
        for _ in range(calls):
            try:
                client.credits.CheckCredits(pb.CheckCreditsRequest(
                    org_id="no-such-org", user_id="alice", amount_millicredits=1))
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as error:
                codes.append(error.code())
    return codes
