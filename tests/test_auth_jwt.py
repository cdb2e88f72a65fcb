"""JWTs against a JWKS served over HTTP on the loopback: keys are fetched off
the request path; a rotated key is picked up by one bounded reload; a flood
of unknown kids fetches nothing more; settings refuse unsafe algorithms.
Claims that limit a caller fail closed: a null, mistyped or missing org_ids
claim and a blank or non-string sub are refused before anything is charged."""

import concurrent.futures
import http.server
import json
import threading

import grpc
import pytest

from orgbilling.v1 import credit_service_pb2 as credit_pb
from orgbilling.v1 import org_billing_service_pb2 as billing_pb
from orgbilling.server.settings import Settings
from tests.identity import IdentityProvider
from tests.support import Client, error_info, new_key


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
def jwt_url_server(start_server, database_url, provider, jwks_server, token):
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


# Claims that limit the caller.

def serve_jwts_from_file(start_server, database_url, provider, tmp_path, token, **overrides):
    """A server trusting `provider`'s keys (from a file), with acme and globex
    funded and alice holding 10,000 millicredits in each."""
    running = start_server(
        database_url, jwks_file=str(provider.write_jwks(tmp_path / "jwks.json")),
        jwt_issuer=provider.issuer, jwt_audience=provider.audience, **overrides,
    )
    admin = Client(f"127.0.0.1:{running.port}", token=token)
    admin.funded_org("acme", 100_000, {"alice": 10_000})
    admin.funded_org("globex", 100_000, {"alice": 10_000})
    admin.close()
    return running


@pytest.fixture
def jwt_file_server(start_server, database_url, provider, tmp_path, token):
    running = serve_jwts_from_file(start_server, database_url, provider, tmp_path, token)
    yield running
    running.stop()


def deduction(org_id="acme", idempotency_key=None):
    return credit_pb.DeductCreditsRequest(
        org_id=org_id, user_id="alice", amount_millicredits=10, service_type="llm", service_name="chat",
        idempotency_key=idempotency_key or new_key(),
    )


def used(server, token, org_id="acme") -> int:
    client = Client(f"127.0.0.1:{server.port}", token=token)
    try:
        return client.billing.GetCreditPool(billing_pb.GetCreditPoolRequest(org_id=org_id), timeout=10
                                            ).pool.used_millicredits
    finally:
        client.close()


def assert_refused_uncharged(server, admin_token, jwt, code, reason, cause=None):
    """`jwt` is refused a deduction on acme with code, reason (and cause), and
    nothing was charged: the pool is untouched, and the same idempotency key
    from a good caller is a first charge, not a replay."""
    request = deduction()
    used_before = used(server, admin_token)
    client = Client(f"127.0.0.1:{server.port}", token=jwt)
    with pytest.raises(grpc.RpcError) as refused:
        client.credits.DeductCredits(request, timeout=10)
    client.close()
    info = error_info(refused.value)
    assert (refused.value.code(), info.reason) == (code, reason), refused.value.details()
    if cause is not None:
        assert info.metadata["cause"] == cause, info
    assert used(server, admin_token) == used_before
    admin = Client(f"127.0.0.1:{server.port}", token=admin_token)
    assert admin.credits.DeductCredits(request, timeout=10).replayed is False
    admin.close()
    return refused.value


@pytest.mark.parametrize("org_ids", [
    None, "acme", "acme globex", 42, {"acme": True}, ["acme", 7], ["acme", None], ["acme", ""],
    ["acme", "not an org id"],
], ids=["null", "a string", "a spaced string", "a number", "an object", "a list with a number",
        "a list with null", "a list with an empty id", "a list with an invalid id"])
def test_an_org_ids_claim_that_is_null_or_not_a_list_of_org_ids_is_refused_and_charges_nothing(
    org_ids, jwt_file_server, provider, token,
):
    """Null once meant every organization; any claim that is not a list of
    organization ids is now malformed, never read as a wider grant."""
    jwt = provider.sign({**provider.claims(["credits.deduct", "credits.read"]), "org_ids": org_ids})
    error = assert_refused_uncharged(jwt_file_server, token, jwt, grpc.StatusCode.UNAUTHENTICATED,
                                     "UNAUTHENTICATED", "malformed")
    assert "org_ids claim is not a list of organization ids" in error.details()


def test_a_token_without_org_ids_is_refused_by_default_and_charges_nothing(jwt_file_server, provider, token):
    """A missing claim would act on every organization: refused unless the
    server allows it."""
    jwt = provider.token(["credits.deduct", "credits.read"], org_ids=None)
    error = assert_refused_uncharged(jwt_file_server, token, jwt, grpc.StatusCode.UNAUTHENTICATED,
                                     "UNAUTHENTICATED", "malformed")
    assert "no org_ids claim" in error.details()


def test_a_token_without_org_ids_acts_on_every_org_only_where_the_setting_allows_it(
    start_server, database_url, provider, tmp_path, token,
):
    """With jwt_orgs_claim_optional, absence means every organization; a null
    claim is still refused (the setting allows absence, not a malformed claim)."""
    server = serve_jwts_from_file(start_server, database_url, provider, tmp_path, token,
                                  jwt_orgs_claim_optional=True)
    try:
        client = Client(f"127.0.0.1:{server.port}",
                        token=provider.token(["credits.deduct", "credits.read"], org_ids=None))
        for org_id in ("acme", "globex"):
            charged = client.credits.DeductCredits(deduction(org_id), timeout=10)
            assert charged.allocation_remaining_millicredits == 9_990
        client.close()
        null_orgs = provider.sign({**provider.claims(["credits.deduct"]), "org_ids": None})
        assert_refused_uncharged(server, token, null_orgs, grpc.StatusCode.UNAUTHENTICATED,
                                 "UNAUTHENTICATED", "malformed")
    finally:
        server.stop()


def test_an_empty_org_ids_list_permits_no_organization(jwt_file_server, provider, token):
    """[] is no organization, not every one: each org-scoped call is refused
    with ORG_NOT_PERMITTED, a call naming no org too, and nothing is charged."""
    jwt = provider.token(["credits.deduct", "credits.read"], org_ids=[])
    error = assert_refused_uncharged(jwt_file_server, token, jwt, grpc.StatusCode.PERMISSION_DENIED,
                                     "ORG_NOT_PERMITTED")
    assert error_info(error).metadata["org_id"] == "acme"
    client = Client(f"127.0.0.1:{jwt_file_server.port}", token=jwt)
    for request in (billing_pb.GetCreditPoolRequest(org_id="globex"), billing_pb.GetCreditPoolRequest()):
        with pytest.raises(grpc.RpcError) as refused:
            client.billing.GetCreditPool(request, timeout=10)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert error_info(refused.value).reason == "ORG_NOT_PERMITTED"
    client.close()


@pytest.mark.parametrize("subject", ["", "   ", 42, ["svc"]],
                         ids=["empty", "blank", "a number", "a list"])
def test_a_token_with_an_empty_or_non_string_sub_is_refused_and_charges_nothing(
    subject, jwt_file_server, provider, token,
):
    """The subject names the caller and keys its rate-limit bucket: blank
    subjects would all share one, so such tokens are malformed."""
    jwt = provider.sign({**provider.claims(["credits.deduct", "credits.read"]), "sub": subject})
    error = assert_refused_uncharged(jwt_file_server, token, jwt, grpc.StatusCode.UNAUTHENTICATED,
                                     "UNAUTHENTICATED", "malformed")
    assert "sub claim" in error.details()


def test_jwt_orgs_claim_optional_is_a_boolean_from_the_environment_or_a_flag():
    """Off by default; true/false/1/0/yes/no from ORGBILLING_JWT_ORGS_CLAIM_OPTIONAL
    or --jwt-orgs-claim-optional (bare: true); anything else is refused."""
    import argparse

    assert Settings().jwt_orgs_claim_optional is False
    for raw, expected in [("true", True), ("Yes", True), ("1", True), ("false", False), ("no", False),
                          ("0", False)]:
        loaded = Settings.load(environ={"ORGBILLING_JWT_ORGS_CLAIM_OPTIONAL": raw})
        assert loaded.jwt_orgs_claim_optional is expected, raw
    with pytest.raises(ValueError, match="jwt_orgs_claim_optional must be true, false"):
        Settings.load(environ={"ORGBILLING_JWT_ORGS_CLAIM_OPTIONAL": "maybe"})

    parser = argparse.ArgumentParser()
    Settings.add_arguments(parser)
    environ = {"ORGBILLING_JWT_ORGS_CLAIM_OPTIONAL": "yes"}
    for flags, expected in [([], True), (["--jwt-orgs-claim-optional"], True),
                            (["--jwt-orgs-claim-optional", "false"], False)]:  # a flag wins
        assert Settings.load(parser.parse_args(flags), environ=environ).jwt_orgs_claim_optional is expected, flags
