"""JWTs against a JWKS served over HTTP on the loopback: keys are fetched off
the request path; a rotated key is picked up by one bounded reload; a flood
of unknown kids fetches nothing more; settings refuse unsafe algorithms."""

import concurrent.futures
import http.server
import json
import threading

import grpc
import pytest

from orgbilling.v1 import org_billing_service_pb2 as billing_pb
from server.settings import Settings
from tests.conftest import start_server
from tests.identity import IdentityProvider
from tests.support import Client, error_info


class JwksServer:
    """Serves an identity provider's current JWKS on 127.0.0.1, counting fetches."""

    def __init__(self, provider: IdentityProvider):
        self.provider = provider
        self.fetches = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.fetches += 1
                body = json.dumps(outer.provider.jwks()).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/realms/orgbilling/certs"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def provider():
    return IdentityProvider()


@pytest.fixture
def jwks_server(provider):
    served = JwksServer(provider)
    yield served
    served.close()


@pytest.fixture
def jwt_url_server(database_url, provider, jwks_server, token):
    running = start_server(
        database_url, jwks_url=jwks_server.url, jwt_issuer=provider.issuer,
        jwt_audience=provider.audience, jwks_unknown_kid_refresh_interval_ms=60_000,
    )
    admin = Client(f"127.0.0.1:{running.port}", token=token)
    admin.funded_org("acme", 5_000, {})
    admin.close()
    yield running
    running.stop()


def pool_total(address, token):
    client = Client(address, token=token)
    try:
        return client.billing.GetCreditPool(billing_pb.GetCreditPoolRequest(org_id="acme"), timeout=10
                                            ).pool.total_millicredits
    finally:
        client.close()


def test_a_rotated_key_is_fetched_once_and_unknown_kids_fetch_nothing_more(jwt_url_server, jwks_server,
                                                                           provider):
    address = f"127.0.0.1:{jwt_url_server.port}"
    assert jwks_server.fetches == 1  # at start, before any call
    assert pool_total(address, provider.token(["credits.read"])) == 5_000
    assert jwks_server.fetches == 1  # nothing fetched on the request path

    # The provider rotates: a new key signs from now on. The first token with
    # its kid makes the server reload the JWKS once.
    provider.kid = provider.add_key()
    assert pool_total(address, provider.token(["credits.read"])) == 5_000
    assert jwks_server.fetches == 2

    # A storm of tokens from keys the provider never published: all refused,
    # and the interval since the last reload has not passed, so no fetch.
    strangers = [IdentityProvider() for _ in range(4)]

    def call(n):
        try:
            pool_total(address, strangers[n % 4].token(["credits.read"]))
        except grpc.RpcError as error:
            return error.code(), error_info(error).metadata["cause"]
        return "accepted"

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(call, range(40)))
    assert set(outcomes) == {(grpc.StatusCode.UNAUTHENTICATED, "invalid")}
    assert jwks_server.fetches == 2


def test_a_server_without_a_jwks_refuses_jwts_as_unsupported(client, provider):
    refused_client = Client(client.address, token=provider.token(["credits.read"]))
    with pytest.raises(grpc.RpcError) as refused:
        refused_client.billing.GetCreditPool(billing_pb.GetCreditPoolRequest(org_id="acme"))
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_info(refused.value).metadata["cause"] == "unsupported"
    refused_client.close()


@pytest.mark.parametrize("algorithms", ["HS256", "none", "RS256,HS512", ""])
def test_settings_refuse_symmetric_or_no_algorithms(algorithms):
    with pytest.raises(ValueError, match="jwt_algorithms"):
        Settings(jwks_file="jwks.json", jwt_issuer="i", jwt_audience="a", jwt_algorithms=algorithms).validate()


def test_settings_require_issuer_and_audience_with_a_jwks():
    with pytest.raises(ValueError, match="jwt_issuer and jwt_audience"):
        Settings(jwks_url="https://idp.test/certs", jwt_issuer="i").validate()
    with pytest.raises(ValueError, match="not both"):
        Settings(jwks_url="https://idp.test/certs", jwks_file="x", jwt_issuer="i", jwt_audience="a").validate()
