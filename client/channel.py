"""The channel both clients open: every option set explicitly (keepalive,
message size, TLS or mTLS, load balancing, gRPC's own retry policy for
UNAVAILABLE) rather than left to defaults that may change."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import grpc

from orgbilling.client.policy import RetryPolicy

SERVICES = ("orgbilling.v1.CreditService", "orgbilling.v1.OrgBillingService",
            "orgbilling.v1.ReportingService")


@dataclass(frozen=True, kw_only=True)
class Tls:
    """TLS for the channel: the roots that sign the server's certificate
    (None: the system's), and for mTLS the client's own chain and key (PEM)."""

    root_certificates: bytes | None = None
    certificate_chain: bytes | None = None
    private_key: bytes | None = None
    # The name to check the server's certificate against, when the target's
    # host is not in it (an IP address, a test's localhost).
    server_name_override: str | None = None

    def __post_init__(self):
        if (self.certificate_chain is None) != (self.private_key is None):
            raise ValueError("mTLS needs both certificate_chain and private_key")


@dataclass(frozen=True, kw_only=True)
class ClientSettings:
    """Everything a client is opened with. `target` is a gRPC target:
    "billing.internal:50051", "dns:///billing:50051" (every replica behind a
    name, balanced round robin), "ipv4:10.0.0.1:50051,10.0.0.2:50051".
    Exactly one of `tls` and `insecure=True` says how to connect."""

    target: str
    token: str | None = None
    tls: Tls | None = None
    insecure: bool = False
    timeout_s: float = 5.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    keepalive_time_ms: int = 30_000
    keepalive_timeout_ms: int = 10_000
    message_size_max_bytes: int = 4 * 1024 * 1024
    # gRPC's own retries of UNAVAILABLE inside one attempt (service config),
    # before the client's RetryPolicy sees the failure; gRPC caps it at 5.
    transparent_attempts_max: int = 3
    channel_options: tuple[tuple[str, object], ...] = ()

    def __post_init__(self):
        if not self.target:
            raise ValueError("target is required, such as 'billing.internal:50051'")
        if self.insecure == (self.tls is not None):
            raise ValueError("say how to connect: tls=Tls(...) or insecure=True (plaintext)")
        if self.timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        if not 1 <= self.transparent_attempts_max <= 5:
            raise ValueError("transparent_attempts_max must be 1 to 5")


def service_config(settings: ClientSettings) -> str:
    retry = {
        "maxAttempts": settings.transparent_attempts_max,
        "initialBackoff": "0.05s",
        "maxBackoff": "1s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE"],
    }
    return json.dumps({
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [{
            "name": [{"service": service} for service in SERVICES],
            **({"retryPolicy": retry} if settings.transparent_attempts_max > 1 else {}),
        }],
    })


def channel_options(settings: ClientSettings) -> list[tuple[str, object]]:
    options = [
        ("grpc.service_config", service_config(settings)),
        ("grpc.enable_retries", 1),
        ("grpc.keepalive_time_ms", settings.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", settings.keepalive_timeout_ms),
        # The server closes connections that ping without calls (its default).
        ("grpc.keepalive_permit_without_calls", 0),
        ("grpc.max_send_message_length", settings.message_size_max_bytes),
        ("grpc.max_receive_message_length", settings.message_size_max_bytes),
        ("grpc.primary_user_agent", "orgbilling-client"),
    ]
    if settings.tls is not None and settings.tls.server_name_override:
        options.append(("grpc.ssl_target_name_override", settings.tls.server_name_override))
    return options + list(settings.channel_options)


def open_channel(settings: ClientSettings, channels):
    """A channel from `channels`, the grpc module or grpc.aio. The token
    travels as call credentials on TLS; on a plaintext channel, where gRPC
    allows no call credentials, the clients send it as call metadata."""
    options = channel_options(settings)
    if settings.insecure:
        return channels.insecure_channel(settings.target, options=options)
    tls = settings.tls
    credentials = grpc.ssl_channel_credentials(
        root_certificates=tls.root_certificates, private_key=tls.private_key,
        certificate_chain=tls.certificate_chain,
    )
    if settings.token:
        credentials = grpc.composite_channel_credentials(
            credentials, grpc.access_token_call_credentials(settings.token))
    return channels.secure_channel(settings.target, credentials, options=options)


def plaintext_metadata(settings: ClientSettings) -> tuple[tuple[str, str], ...]:
    if settings.insecure and settings.token:
        return (("authorization", f"Bearer {settings.token}"),)
    return ()
