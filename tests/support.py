"""What the tests share: a real PostgreSQL, fresh databases cut from a
migrated template, real servers on free ports, and error decoding."""

import collections
import contextlib
import itertools
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import grpc
import psycopg
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from orgbilling.v1 import credit_service_pb2_grpc, org_billing_service_pb2_grpc
from orgbilling.v1 import types_pb2
from orgbilling.v1 import org_billing_service_pb2 as billing_pb
from orgbilling.server.auth.api_keys import create_api_key
from orgbilling.server.auth.scopes import ALL_SCOPES
from orgbilling.server.migrate import migrate

REPO = Path(__file__).resolve().parent.parent
TEMPLATE_DATABASE = "orgbilling_template"
_database_numbers = itertools.count(1)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def with_database(url: str, database: str) -> str:
    """The same server URL pointing at another database."""
    info = psycopg.conninfo.conninfo_to_dict(url)
    info["dbname"] = database
    return psycopg.conninfo.make_conninfo(**info)


class PostgresForTests:
    """One PostgreSQL for the whole run: ORGBILLING_DATABASE_URL if set (its
    user must be allowed to create databases), else an embedded server in a
    temporary directory that is deleted at the end."""

    def __init__(self):
        self._embedded = None
        self._tmp = None
        url = os.environ.get("ORGBILLING_TEST_DATABASE_URL") or os.environ.get("ORGBILLING_DATABASE_URL")
        if not url:
            from orgbilling.server.database import embedded_database_url

            self._tmp = Path(tempfile.mkdtemp(prefix="orgbilling-test-"))
            url = embedded_database_url(self._tmp)
            self.data_dir = self._tmp / "postgres"
        self.admin_url = url
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {TEMPLATE_DATABASE}")
            conn.execute(f"CREATE DATABASE {TEMPLATE_DATABASE}")
        migrate(with_database(self.admin_url, TEMPLATE_DATABASE))

    def new_database(self) -> str:
        """A fresh, migrated database; returns its URL."""
        name = f"test_{os.getpid()}_{next(_database_numbers)}"
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE_DATABASE}")
        return with_database(self.admin_url, name)

    def close(self):
        if self._tmp is not None:
            from orgbilling.server.database import stop_embedded_database

            stop_embedded_database(self._tmp)
            shutil.rmtree(self._tmp, ignore_errors=True)


class BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                  grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds `authorization: Bearer <token>` to every call of a channel."""

    def __init__(self, token: str):
        self._header = ("authorization", f"Bearer {token}")

    def _with_token(self, details):
        return _CallDetails(
            details.method, details.timeout, [*(details.metadata or ()), self._header],
            details.credentials, details.wait_for_ready, details.compression,
        )

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._with_token(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._with_token(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._with_token(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._with_token(client_call_details), request_iterator)


class _CallDetails(
    collections.namedtuple(
        "_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")
    ),
    grpc.ClientCallDetails,
):
    pass


class Client:
    """Stubs of every service over one channel to a server. With a token,
    every call carries it as `authorization: Bearer <token>`; with
    channel_credentials, the channel is TLS."""

    def __init__(self, address: str, metadata=(), token: str | None = None,
                 channel_credentials: grpc.ChannelCredentials | None = None, options=()):
        self.address = address
        self.token = token
        if channel_credentials is None:
            self._raw_channel = grpc.insecure_channel(address, options=list(options))
        else:
            self._raw_channel = grpc.secure_channel(address, channel_credentials, options=list(options))
        self.channel = (
            grpc.intercept_channel(self._raw_channel, BearerToken(token)) if token else self._raw_channel
        )
        self.metadata = tuple(metadata)
        self.credits = credit_service_pb2_grpc.CreditServiceStub(self.channel)
        self.billing = org_billing_service_pb2_grpc.OrgBillingServiceStub(self.channel)

    def close(self):
        self._raw_channel.close()

    # Setting up an organization in one line, for tests about something else.

    def subscribe(self, org_id: str, plan=types_pb2.PLAN_PLATFORM):
        return self.billing.CreateSubscription(
            billing_pb.CreateSubscriptionRequest(
                org_id=org_id, plan=plan, billing_cycle=types_pb2.BILLING_CYCLE_MONTHLY,
                idempotency_key=new_key(),
            ),
            metadata=self.metadata,
        )

    def grant(self, org_id: str, amount_millicredits: int):
        return self.billing.AddCredits(
            billing_pb.AddCreditsRequest(
                org_id=org_id, source=types_pb2.CREDIT_SOURCE_GRANT,
                amount_millicredits=amount_millicredits, idempotency_key=new_key(),
            ),
            metadata=self.metadata,
        )

    def allocate(self, org_id: str, user_id: str, limit_millicredits: int,
                 reset_period=types_pb2.RESET_PERIOD_NEVER):
        return self.billing.AllocateCredits(
            billing_pb.AllocateCreditsRequest(
                org_id=org_id, user_id=user_id, limit_millicredits=limit_millicredits,
                reset_period=reset_period, idempotency_key=new_key(),
            ),
            metadata=self.metadata,
        )

    def funded_org(self, org_id: str, pool_millicredits: int, users: dict[str, int]):
        self.subscribe(org_id)
        if pool_millicredits:
            self.grant(org_id, pool_millicredits)
        for user_id, limit in users.items():
            self.allocate(org_id, user_id, limit)


def new_key() -> str:
    return uuid.uuid4().hex


def admin_token(database_url: str, name: str | None = None) -> str:
    """A new API key with every scope on every organization, in the database
    at database_url (a running server accepts it on its first call)."""
    return create_api_key(database_url, name or f"test-admin-{uuid.uuid4().hex[:12]}", sorted(ALL_SCOPES))


def api_key(database_url: str, scopes, org_ids=None, name: str | None = None) -> str:
    """A new API key with these scopes (and, if given, only these organizations)."""
    return create_api_key(database_url, name or f"test-{uuid.uuid4().hex[:12]}", scopes, org_ids)


def error_info(error: grpc.RpcError) -> error_details_pb2.ErrorInfo:
    """The one ErrorInfo every failure carries (asserting it is exactly one)."""
    status = rpc_status.from_call(error)
    assert status is not None, f"no google.rpc.Status on {error.code()}: {error.details()}"
    infos = [d for d in status.details if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR)]
    assert len(infos) == 1, status
    info = error_details_pb2.ErrorInfo()
    infos[0].Unpack(info)
    return info


def field_violations(error: grpc.RpcError) -> set[str]:
    status = rpc_status.from_call(error)
    fields = set()
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields |= {v.field for v in bad.field_violations}
    return fields


@contextlib.contextmanager
def raises_rpc(code: grpc.StatusCode, reason: str | None = None):
    """Asserts the block fails with this code (and reason); yields the error."""
    holder = {}
    try:
        yield holder
    except grpc.RpcError as error:
        assert error.code() == code, f"expected {code}, got {error.code()}: {error.details()}"
        info = error_info(error)
        if reason is not None:
            assert info.reason == reason, info
        holder["error"] = error
        holder["info"] = info
        return
    raise AssertionError(f"expected {code} {reason or ''}, but the call succeeded")


class ServerProcess:
    """`orgbilling serve` as a separate process, for lifecycle tests.

    `token` is an all-scopes key for it: the one given, else (on first use)
    the local admin key the server saved in its data directory with the
    embedded default, or a new key in the configured database."""

    def __init__(self, env_overrides: dict[str, str], port: int | None = None,
                 token: str | None = None):
        self._token = token
        self.port = port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "ORGBILLING_LISTEN_ADDRESS": self.address,
            "ORGBILLING_HEALTH_CHECK_INTERVAL_MS": "200",
            **env_overrides,
        }
        self.log_path = Path(tempfile.mkstemp(prefix="orgbilling-server-", suffix=".log")[1])
        self.process = None

    def start(self, ready_timeout_s: float = 30.0) -> "ServerProcess":
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "orgbilling.server", "serve"], env=self.env, cwd=REPO,
            stdout=self._log, stderr=subprocess.STDOUT,
        )
        wait_serving(self.address, ready_timeout_s, process=self.process, log_path=self.log_path)
        return self

    @property
    def token(self) -> str:
        if self._token is None:
            database_url = self.env.get("ORGBILLING_DATABASE_URL", "")
            if database_url:
                self._token = admin_token(database_url)
            else:
                from orgbilling.server.auth.local_admin import ADMIN_KEY_FILE_NAME

                data_dir = REPO / self.env.get("ORGBILLING_DATA_DIR", ".orgbilling")
                self._token = (data_dir / ADMIN_KEY_FILE_NAME).read_text().strip()
        return self._token

    def client(self, **options) -> "Client":
        """A Client of this server that sends its token."""
        return Client(self.address, token=self.token, **options)

    def stop(self, timeout_s: float = 30.0) -> int:
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
