"""The one place the reliability tests open channels and stubs, so that adding
credentials (or any other per-call metadata) is a change of one function."""

import dataclasses

import grpc
from grpc_health.v1 import health_pb2_grpc

from orgbilling.v1 import credit_service_pb2_grpc, org_billing_service_pb2_grpc

# Reconnect quickly after a replica restarts: gRPC's default backoff grows to
# two minutes, which would keep a healthy replica idle for most of a test.
_CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    # Every retry is the harness's own, with the same idempotency key, so
    # that each attempt is visible and recorded.
    ("grpc.enable_retries", 0),
)


@dataclasses.dataclass
class Connection:
    """A channel to one server with a stub of every service, and the metadata
    every call must carry."""

    address: str
    channel: grpc.Channel
    credits: credit_service_pb2_grpc.CreditServiceStub
    billing: org_billing_service_pb2_grpc.OrgBillingServiceStub
    health: health_pb2_grpc.HealthStub
    metadata: tuple[tuple[str, str], ...]

    def close(self) -> None:
        self.channel.close()


def call_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """What every call carries: the bearer key the server checks."""
    return (("authorization", f"Bearer {token}"),) if token else ()


def connect(address: str, token: str | None = None) -> Connection:
    channel = grpc.insecure_channel(address, options=_CHANNEL_OPTIONS)
    return Connection(
        address=address,
        channel=channel,
        credits=credit_service_pb2_grpc.CreditServiceStub(channel),
        billing=org_billing_service_pb2_grpc.OrgBillingServiceStub(channel),
        health=health_pb2_grpc.HealthStub(channel),
        metadata=call_metadata(token),
    )
