"""The listening port: plaintext, TLS (--tls-cert/--tls-key), or mutual TLS
(--tls-client-ca: every caller must present a certificate that CA signed;
its subject then names the caller, see server.auth.certificates)."""

from pathlib import Path

import grpc

from orgbilling.server.settings import Settings


def server_credentials(settings: Settings) -> grpc.ServerCredentials:
    chain = Path(settings.tls_cert).read_bytes()
    key = Path(settings.tls_key).read_bytes()
    client_ca = Path(settings.tls_client_ca).read_bytes() if settings.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(key, chain)],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def add_port(server: grpc.Server, settings: Settings) -> int:
    """Binds settings.listen_address; returns the port, 0 on failure."""
    if settings.tls_enabled:
        return server.add_secure_port(settings.listen_address, server_credentials(settings))
    return server.add_insecure_port(settings.listen_address)
