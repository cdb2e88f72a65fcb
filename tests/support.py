"""What the tests share: clients of a server, API keys, and the decoding of
a failed call's google.rpc.Status details."""

import collections
import contextlib
import datetime
import itertools
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

REPO = Path(__file__).resolve().parent.parent


def readme_table(header: str) -> list[list[str]]:
    """The rows of the README's table whose header row is `header` (as
    written, "| a | b |"), each a list of its stripped cells."""
    text = (REPO / "README.md").read_text().split(f"{header}\n", 1)[1]
    rows = itertools.takewhile(lambda line: line.startswith("|"), text.splitlines()[1:])
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows]


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

    def subscribe(self, org_id: str, plan=types_pb2.PLAN_BYOK):
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


def set_ledger_clock(database_url: str, at: "datetime.datetime | None") -> None:
    """Freezes the ledger's clock (ledger_now(), 0006_ledger_clock.sql) at
    the instant at, for every connection of every replica from their next
    statement; None lets it run with the real time again."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        if at is None:
            conn.execute("DELETE FROM ledger_clock")
        else:
            conn.execute("INSERT INTO ledger_clock (frozen_at) VALUES (%s)"
                         " ON CONFLICT (only_row) DO UPDATE SET frozen_at = excluded.frozen_at", (at,))


def add_orgs_in_sql(conn: psycopg.Connection, count: int, *, user_id: str, millicredits: int) -> None:
    """Orgs 'o1' to 'o<count>', written straight in SQL (no subscription):
    each a pool of `millicredits` and one allocation of as much to user_id,
    reset never. For measuring the ledger's SQL over many orgs."""
    conn.execute("INSERT INTO organizations SELECT 'o' || g FROM generate_series(1, %s) AS g", (count,))
    conn.execute("INSERT INTO organization_credit_pools (org_id, total_millicredits)"
                 " SELECT 'o' || g, %s FROM generate_series(1, %s) AS g", (millicredits, count))
    conn.execute("INSERT INTO user_credit_allocations (org_id, user_id, limit_millicredits, reset_period)"
                 " SELECT 'o' || g, %s, %s, 'NEVER' FROM generate_series(1, %s) AS g",
                 (user_id, millicredits, count))


def fund_org(client, org_id: str, pool_millicredits: int, users: dict[str, int]) -> None:
    """Client.funded_org through an orgbilling.client CreditClient."""
    client.create_subscription(org_id=org_id, plan="PLAN_BYOK", billing_cycle="BILLING_CYCLE_MONTHLY")
    client.add_credits(org_id=org_id, source="CREDIT_SOURCE_GRANT",
                       amount_millicredits=pool_millicredits)
    for user_id, limit in users.items():
        client.allocate_credits(org_id=org_id, user_id=user_id, limit_millicredits=limit,
                                reset_period="RESET_PERIOD_NEVER")


def new_key() -> str:
    return uuid.uuid4().hex


def with_fields(message, fields: dict):
    """The message, with these fields set: a valid request made invalid."""
    for name, value in fields.items():
        setattr(message, name, value)
    return message


def admin_token(database_url: str, name: str | None = None) -> str:
    """A new API key with every scope on every organization, in the database
    at database_url (a running server accepts it on its first call)."""
    return create_api_key(database_url, name or f"test-admin-{uuid.uuid4().hex[:12]}", sorted(ALL_SCOPES))


def api_key(database_url: str, scopes, org_ids=None, name: str | None = None) -> str:
    """A new API key with these scopes (and, if given, only these organizations)."""
    return create_api_key(database_url, name or f"test-{uuid.uuid4().hex[:12]}", scopes, org_ids)


def status_details(error: grpc.RpcError, message_class) -> list:
    """The details of this type in a failure's google.rpc.Status, unpacked;
    none when it carries no Status."""
    status = rpc_status.from_call(error)
    if status is None:
        return []
    found = []
    for detail in status.details:
        if detail.Is(message_class.DESCRIPTOR):
            message = message_class()
            detail.Unpack(message)
            found.append(message)
    return found


def error_info(error: grpc.RpcError) -> error_details_pb2.ErrorInfo:
    """The one ErrorInfo every failure carries (asserting it is exactly one)."""
    status = rpc_status.from_call(error)
    assert status is not None, f"no google.rpc.Status on {error.code()}: {error.details()}"
    infos = status_details(error, error_details_pb2.ErrorInfo)
    assert len(infos) == 1, status
    return infos[0]


def error_reason(error: grpc.RpcError) -> str | None:
    """The ErrorInfo reason of a failure, or None if it carries none (the
    bank's callers record such failures rather than assert on them)."""
    infos = status_details(error, error_details_pb2.ErrorInfo)
    return infos[0].reason if infos else None


def field_violations(error: grpc.RpcError) -> set[str]:
    return {violation.field for bad in status_details(error, error_details_pb2.BadRequest)
            for violation in bad.field_violations}


def retry_delay_s(error: grpc.RpcError) -> float:
    """The one RetryInfo's delay, in seconds (asserting it is exactly one)."""
    infos = status_details(error, error_details_pb2.RetryInfo)
    assert len(infos) == 1, rpc_status.from_call(error)
    return infos[0].retry_delay.ToNanoseconds() / 1e9


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
