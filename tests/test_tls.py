"""TLS and mutual TLS, with a CA the test makes: the right certificates
connect, the wrong ones do not; under mutual TLS the client certificate's
subject names the caller, whose scopes and organizations come from its
api_keys record."""

import grpc
import pytest

from orgbilling.v1 import org_billing_service_pb2 as billing_pb
from orgbilling.server.auth import api_keys
from tests.identity import CertificateAuthority
from tests.support import Client, error_info

# The server certificate names localhost and 127.0.0.1; gRPC checks the name.
NAME_OVERRIDE = (("grpc.ssl_target_name_override", "localhost"),)


@pytest.fixture(scope="module")
def ca():
    return CertificateAuthority()


@pytest.fixture
def server_files(ca, tmp_path):
    certificate, key = ca.issue("localhost", server=True)
    paths = {"tls_cert": tmp_path / "server.pem", "tls_key": tmp_path / "server-key.pem",
             "tls_client_ca": tmp_path / "ca.pem"}
    paths["tls_cert"].write_bytes(certificate)
    paths["tls_key"].write_bytes(key)
    paths["tls_client_ca"].write_bytes(ca.pem)
    return {name: str(path) for name, path in paths.items()}


def pool_of(client, org_id="acme"):
    return client.billing.GetCreditPool(billing_pb.GetCreditPoolRequest(org_id=org_id), timeout=5)


def fails_to_connect(client):
    with pytest.raises(grpc.RpcError) as failed:
        pool_of(client)
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, failed.value.details()


def test_tls_connects_with_the_right_ca_only(start_server, database_url, token, ca, server_files):
    server = start_server(database_url, tls_cert=server_files["tls_cert"], tls_key=server_files["tls_key"])
    address = f"127.0.0.1:{server.port}"
    try:
        trusted = Client(address, token=token, options=NAME_OVERRIDE,
                         channel_credentials=grpc.ssl_channel_credentials(root_certificates=ca.pem))
        trusted.funded_org("acme", 1_000, {})
        assert pool_of(trusted).pool.total_millicredits == 1_000
        trusted.close()

        stranger_ca = CertificateAuthority("someone else")
        fooled = Client(address, token=token, options=NAME_OVERRIDE,
                        channel_credentials=grpc.ssl_channel_credentials(root_certificates=stranger_ca.pem))
        fails_to_connect(fooled)
        fooled.close()

        plaintext = Client(address, token=token)
        fails_to_connect(plaintext)
        plaintext.close()
    finally:
        server.stop()


def test_mutual_tls_names_the_caller_by_its_certificate(start_server, database_url, token, ca, server_files):
    """A registered subject calls with its record's scopes and orgs and no
    bearer token; an unregistered one is UNAUTHENTICATED; a certificate from
    another CA, or none, cannot even connect."""
    # RFC 4514 puts the last attribute first, as `openssl x509 -subject -nameopt RFC2253` prints it.
    api_keys.create_certificate_caller(database_url, "billing-worker", "O=Acme,CN=billing-worker",
                                       ["credits.read"], ["acme"])
    server = start_server(database_url, **server_files)
    address = f"127.0.0.1:{server.port}"

    def mtls_client(certificate_authority, common_name, with_token=None):
        chain, key = certificate_authority.issue(common_name, organization="Acme")
        credentials = grpc.ssl_channel_credentials(root_certificates=ca.pem, private_key=key,
                                                   certificate_chain=chain)
        return Client(address, token=with_token, channel_credentials=credentials, options=NAME_OVERRIDE)

    try:
        admin = mtls_client(ca, "admin-console", with_token=token)  # a bearer token decides when sent
        admin.funded_org("acme", 1_000, {})
        admin.funded_org("globex", 2_000, {})

        worker = mtls_client(ca, "billing-worker")
        assert pool_of(worker).pool.total_millicredits == 1_000
        with pytest.raises(grpc.RpcError) as other_org:
            pool_of(worker, "globex")
        assert error_info(other_org.value).reason == "ORG_NOT_PERMITTED"
        with pytest.raises(grpc.RpcError) as no_scope:
            worker.grant("acme", 5)
        assert error_info(no_scope.value).reason == "MISSING_SCOPE"

        unknown = mtls_client(ca, "someone")
        with pytest.raises(grpc.RpcError) as unregistered:
            pool_of(unknown)
        assert unregistered.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "O=Acme,CN=someone" in unregistered.value.details()

        fails_to_connect(mtls_client(CertificateAuthority("rogue"), "billing-worker"))
        no_certificate = Client(address, token=token, options=NAME_OVERRIDE,
                                channel_credentials=grpc.ssl_channel_credentials(root_certificates=ca.pem))
        fails_to_connect(no_certificate)

        assert api_keys.revoke(database_url, "billing-worker")
        server.security.key_ring.refresh()
        with pytest.raises(grpc.RpcError) as revoked:
            pool_of(worker)
        assert revoked.value.code() == grpc.StatusCode.UNAUTHENTICATED
        for client in (admin, worker, unknown, no_certificate):
            client.close()
    finally:
        server.stop()
