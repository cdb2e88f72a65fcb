"""Nobody reaches an RPC without proving who they are and being allowed that
exact call. Every RPC of every service, found by server reflection (so a new
RPC is covered without editing this test), is called with each kind of bad
credential; each gets the right code and reason, and nothing is written.
Streaming RPCs (ExportUsage) are read to their end; the RPCs that name no
organization are refused to a caller limited to some, except those that show
such a caller only its own (FILTERED_BY_CALLER_ORGS: GetUserBilling)."""

import dataclasses
import time

import grpc
import psycopg
import pytest
from google.protobuf import descriptor_pool, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from orgbilling.server.auth.api_keys import revoke
from orgbilling.server.auth.scopes import (
    ALL_SCOPES, FILTERED_BY_CALLER_ORGS, INFRASTRUCTURE_SERVICES, METHOD_SCOPES,
)
from orgbilling.server.auth.orgs import org_ids_in
from tests.identity import IdentityProvider
from tests.support import Client, admin_token, api_key, error_info

OWN_ORG, OTHER_ORG = "acme", "globex"


@dataclasses.dataclass(frozen=True)
class Rpc:
    path: str
    request_class: type
    response_class: type
    server_streaming: bool = False

    def call(self, channel, request, metadata=()):
        """The response, or for a server stream the list of its messages
        (read to the end, so that a refusal raises here)."""
        if self.server_streaming:
            stream = channel.unary_stream(
                self.path, request_serializer=self.request_class.SerializeToString,
                response_deserializer=self.response_class.FromString,
            )
            return list(stream(request, metadata=metadata, timeout=10))
        stub = channel.unary_unary(
            self.path, request_serializer=self.request_class.SerializeToString,
            response_deserializer=self.response_class.FromString,
        )
        return stub(request, metadata=metadata, timeout=10)

    @property
    def names_an_org(self) -> bool:
        """Whether its request has an org_id field (at any depth)."""
        return bool(org_ids_in(naming_org(self.request_class, OWN_ORG)))


def rpcs_by_reflection(channel) -> list[Rpc]:
    database = ProtoReflectionDescriptorDatabase(channel)
    pool = descriptor_pool.DescriptorPool(database)
    found = []
    for service_name in database.get_services():
        if service_name in INFRASTRUCTURE_SERVICES:
            continue
        service = pool.FindServiceByName(service_name)
        for method in service.methods:
            assert not method.client_streaming, f"{method.full_name}: add client streams to Rpc.call"
            found.append(Rpc(
                f"/{service.full_name}/{method.name}",
                message_factory.GetMessageClass(method.input_type),
                message_factory.GetMessageClass(method.output_type),
                server_streaming=method.server_streaming,
            ))
    return found


def naming_org(request_class, org_id: str, depth: int = 3):
    """A request whose every org_id field (nested ones too: a batch's
    deductions) names org_id; everything else left empty."""
    message = request_class()
    _fill(message, org_id, depth)
    return message


def _fill(message, org_id: str, depth: int) -> None:
    for field in message.DESCRIPTOR.fields:
        repeated = field.is_repeated
        if field.name == "org_id" and field.type == field.TYPE_STRING:
            if repeated:
                getattr(message, field.name).append(org_id)
            else:
                setattr(message, field.name, org_id)
        elif field.type == field.TYPE_MESSAGE and depth > 0 and not field.message_type.GetOptions().map_entry:
            child = getattr(message, field.name).add() if repeated else getattr(message, field.name)
            _fill(child, org_id, depth - 1)


def row_counts(database_url: str) -> dict[str, int]:
    """Rows of every table of the ledger (all but credentials and migrations)."""
    with psycopg.connect(database_url) as conn:
        tables = [name for (name,) in conn.execute(
            """SELECT table_name FROM information_schema.tables
                WHERE table_schema = 'public' AND table_type = 'BASE TABLE'
                  AND table_name NOT IN ('api_keys', 'schema_migrations')""")]
        return {t: conn.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0] for t in tables}


@pytest.fixture
def identity_provider():
    return IdentityProvider()


@pytest.fixture
def jwt_server(start_server, database_url, identity_provider, tmp_path):
    """A server that accepts API keys and the test identity provider's JWTs."""
    running = start_server(
        database_url,
        jwks_file=str(identity_provider.write_jwks(tmp_path / "jwks.json")),
        jwt_issuer=identity_provider.issuer, jwt_audience=identity_provider.audience,
        # Keys made during a test work on their first call, however many.
        api_key_refresh_ms=200, api_key_unknown_refresh_interval_ms=0,
    )
    yield running
    running.stop()


@pytest.fixture
def channel(jwt_server):
    with grpc.insecure_channel(f"127.0.0.1:{jwt_server.port}") as channel:
        yield channel


def bearer(credential: str) -> tuple:
    return (("authorization", f"Bearer {credential}"),)


def revoked_key(database_url, server) -> str:
    key = api_key(database_url, sorted(ALL_SCOPES), name="soon-revoked")
    assert revoke(database_url, "soon-revoked")
    server.security.key_ring.refresh()
    return key


# (case, credentials maker, the org the request names, code, reason, cause)
CASES = [
    ("no credentials", lambda ctx: (), None,
     grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED", "missing"),
    ("malformed header", lambda ctx: (("authorization", "Basic dXNlcjpwYXNz"),), None,
     grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED", "malformed"),
    ("unknown key", lambda ctx: bearer("obk_0123456789abcdef_" + "A" * 43), None,
     grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED", "invalid"),
    ("right key id, wrong secret", lambda ctx: bearer(ctx["admin"][:-4] + "AAAA"), None,
     grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED", "invalid"),
    ("revoked key", lambda ctx: bearer(ctx["revoked"]), None,
     grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED", "invalid"),
    ("expired JWT", lambda ctx: bearer(ctx["idp"].token(ALL_SCOPES, expires_in_s=-120)), None,
     grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED", "expired"),
    ("JWT from another issuer", lambda ctx: bearer(ctx["idp"].token(ALL_SCOPES, iss="https://evil.test")), None,
     grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED", "invalid"),
    ("JWT for another audience", lambda ctx: bearer(ctx["idp"].token(ALL_SCOPES, aud="other-service")), None,
     grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED", "invalid"),
    ("JWT with alg none", lambda ctx: bearer(ctx["idp"].unsigned_token(ALL_SCOPES)), None,
     grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED", "invalid"),
    ("HS256 JWT signed with the public key", lambda ctx: bearer(ctx["idp"].hs256_with_public_key(ALL_SCOPES)),
     None, grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED", "invalid"),
    ("JWT signed by an unknown key", lambda ctx: bearer(IdentityProvider().token(ALL_SCOPES)), None,
     grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED", "invalid"),
    ("key lacking the scope", lambda ctx: bearer(ctx["lacking"](ctx["rpc"])), OWN_ORG,
     grpc.StatusCode.PERMISSION_DENIED, "MISSING_SCOPE", None),
    ("JWT lacking the scope", lambda ctx: bearer(ctx["idp"].token(
        ALL_SCOPES - {METHOD_SCOPES[ctx["rpc"].path]})), OWN_ORG,
     grpc.StatusCode.PERMISSION_DENIED, "MISSING_SCOPE", None),
    ("key on another org", lambda ctx: bearer(ctx["acme_only"]), OTHER_ORG,
     grpc.StatusCode.PERMISSION_DENIED, "ORG_NOT_PERMITTED", None),
    ("JWT on another org", lambda ctx: bearer(ctx["idp"].token(ALL_SCOPES, org_ids=[OWN_ORG])), OTHER_ORG,
     grpc.StatusCode.PERMISSION_DENIED, "ORG_NOT_PERMITTED", None),
]


@pytest.mark.parametrize("case, credentials, org, code, reason, cause", CASES, ids=[c[0] for c in CASES])
def test_every_rpc_refuses_bad_credentials_and_writes_nothing(
    case, credentials, org, code, reason, cause, jwt_server, channel, database_url, identity_provider,
):
    admin = admin_token(database_url)
    client = Client(f"127.0.0.1:{jwt_server.port}", token=admin)
    client.funded_org(OWN_ORG, 100_000, {"alice": 10_000})
    client.funded_org(OTHER_ORG, 100_000, {"alice": 10_000})
    client.close()
    # A key for each scope, with every scope but that one.
    lacking_keys = {scope: api_key(database_url, sorted(ALL_SCOPES - {scope})) for scope in ALL_SCOPES}
    context = {
        "idp": identity_provider, "admin": admin,
        "lacking": lambda rpc: lacking_keys[METHOD_SCOPES[rpc.path]],
        "revoked": revoked_key(database_url, jwt_server),
        "acme_only": api_key(database_url, sorted(ALL_SCOPES), org_ids=[OWN_ORG]),
    }
    # The keys just made are in the server's snapshot now, not at its next reload.
    jwt_server.security.key_ring.refresh()
    rpcs = rpcs_by_reflection(channel)
    assert {rpc.path for rpc in rpcs} == set(METHOD_SCOPES)
    before = row_counts(database_url)
    for rpc in rpcs:
        context["rpc"] = rpc
        if org == OTHER_ORG and rpc.path in FILTERED_BY_CALLER_ORGS:
            # Names no org and shows an org-limited caller only its own:
            # not refused (test_reports.py checks what it shows).
            continue
        # Without an org the request is also invalid: authentication comes first.
        request = naming_org(rpc.request_class, org) if org else rpc.request_class()
        with pytest.raises(grpc.RpcError) as refused:
            rpc.call(channel, request, credentials(context))
        error = refused.value
        assert error.code() == code, f"{rpc.path}: {case}: {error.code()} {error.details()}"
        info = error_info(error)
        assert info.reason == reason, f"{rpc.path}: {case}: {info}"
        if cause is not None:
            assert info.metadata["cause"] == cause, f"{rpc.path}: {case}: {info}"
    assert row_counts(database_url) == before


def test_the_same_calls_with_good_credentials_get_past_auth(jwt_server, channel, database_url,
                                                            identity_provider):
    """The control for the matrix: an all-scopes key for every org, and an
    all-scopes key and an all-scopes JWT limited to acme, on acme, all reach
    the servicer, whose answer (validation, not found...) is anything but
    UNAUTHENTICATED or PERMISSION_DENIED. The exception: an RPC that names no
    org and spans them all (GetSystemBilling, ListOrgSummaries) is refused to
    the acme-only callers, ORG_NOT_PERMITTED; GetUserBilling, filtered to the
    caller's orgs, is not. (A JWT always lists its orgs here: the server
    requires the claim.)"""
    credentials = [  # (metadata, limited to acme)
        (bearer(admin_token(database_url)), False),
        (bearer(api_key(database_url, sorted(ALL_SCOPES), org_ids=[OWN_ORG])), True),
        (bearer(identity_provider.token(ALL_SCOPES, org_ids=[OWN_ORG])), True),
    ]
    jwt_server.security.key_ring.refresh()
    rpcs = rpcs_by_reflection(channel)
    spanning = {rpc.path for rpc in rpcs if not rpc.names_an_org} - FILTERED_BY_CALLER_ORGS
    assert spanning >= {"/orgbilling.v1.ReportingService/GetSystemBilling",
                        "/orgbilling.v1.ReportingService/ListOrgSummaries"}
    for rpc in rpcs:
        for number, (metadata, limited) in enumerate(credentials):
            refused_for_orgs = rpc.path in spanning and limited
            try:
                rpc.call(channel, naming_org(rpc.request_class, OWN_ORG), metadata)
                assert not refused_for_orgs, f"{rpc.path} answered a caller limited to {OWN_ORG}"
            except grpc.RpcError as error:
                if refused_for_orgs:
                    assert error.code() == grpc.StatusCode.PERMISSION_DENIED, (rpc.path, error.details())
                    assert error_info(error).reason == "ORG_NOT_PERMITTED", rpc.path
                else:
                    assert error.code() not in (grpc.StatusCode.UNAUTHENTICATED,
                                                grpc.StatusCode.PERMISSION_DENIED), (
                        rpc.path, f"credential {number}", error.details())


def test_a_valid_deduction_by_a_caller_without_the_scope_charges_nothing(jwt_server, database_url):
    """A request that would succeed is refused for the missing scope alone,
    and no credit moves."""
    from orgbilling.v1 import credit_service_pb2 as pb

    admin = Client(f"127.0.0.1:{jwt_server.port}", token=admin_token(database_url))
    admin.funded_org(OWN_ORG, 100_000, {"alice": 10_000})
    reader = Client(f"127.0.0.1:{jwt_server.port}", token=api_key(database_url, ["credits.read"]))
    request = pb.DeductCreditsRequest(org_id=OWN_ORG, user_id="alice", amount_millicredits=10,
                                      service_type="llm", service_name="chat", idempotency_key="k1")
    before = row_counts(database_url)
    with pytest.raises(grpc.RpcError) as refused:
        reader.credits.DeductCredits(request)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_info(refused.value).metadata["required_scope"] == "credits.deduct"
    assert row_counts(database_url) == before
    # The same request from a caller with the scope is charged.
    assert admin.credits.DeductCredits(request).allocation_remaining_millicredits == 9_990
    reader.close()
    admin.close()


def test_roles_claim_grants_scopes(jwt_server, database_url, identity_provider):
    """Keycloak puts roles in realm_access.roles; a role named like a scope grants it."""
    from orgbilling.v1 import org_billing_service_pb2 as billing_pb

    token = identity_provider.token((), realm_access={"roles": ["credits.read", "offline_access"]})
    client = Client(f"127.0.0.1:{jwt_server.port}", token=token)
    admin = Client(f"127.0.0.1:{jwt_server.port}", token=admin_token(database_url))
    admin.funded_org(OWN_ORG, 1_000, {})
    assert client.billing.GetCreditPool(billing_pb.GetCreditPoolRequest(org_id=OWN_ORG)).pool.total_millicredits == 1_000
    with pytest.raises(grpc.RpcError) as refused:
        client.grant(OWN_ORG, 5)
    assert error_info(refused.value).reason == "MISSING_SCOPE"
    client.close()
    admin.close()


def test_an_org_limited_key_may_not_batch_across_orgs(jwt_server, database_url):
    """DeductCreditsBatch names an org per deduction: one foreign org refuses the call."""
    from orgbilling.v1 import credit_service_pb2 as pb

    client = Client(f"127.0.0.1:{jwt_server.port}",
                    token=api_key(database_url, ["credits.deduct"], org_ids=[OWN_ORG]))
    batch = pb.DeductCreditsBatchRequest(deductions=[
        pb.DeductCreditsRequest(org_id=OWN_ORG, user_id="a", amount_millicredits=1, service_type="llm",
                                service_name="x", idempotency_key="b1"),
        pb.DeductCreditsRequest(org_id=OTHER_ORG, user_id="a", amount_millicredits=1, service_type="llm",
                                service_name="x", idempotency_key="b2"),
    ])
    with pytest.raises(grpc.RpcError) as refused:
        client.credits.DeductCreditsBatch(batch)
    info = error_info(refused.value)
    assert (info.reason, info.metadata["org_id"]) == ("ORG_NOT_PERMITTED", OTHER_ORG)
    client.close()


def test_health_and_reflection_are_open_by_default_and_closable(start_server, database_url):
    """Probes and grpcurl need them; a setting closes them to anonymous callers."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    server = start_server(database_url, unauthenticated_services="")
    try:
        address = f"127.0.0.1:{server.port}"
        with grpc.insecure_channel(address) as channel:
            with pytest.raises(grpc.RpcError) as refused:
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError):
                ProtoReflectionDescriptorDatabase(channel).get_services()
        client = Client(address, token=admin_token(database_url))
        deadline = time.monotonic() + 5
        while health_pb2_grpc.HealthStub(client.channel).Check(health_pb2.HealthCheckRequest()).status != 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        client.close()
    finally:
        server.stop()

    open_server = start_server(database_url)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{open_server.port}") as channel:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert "orgbilling.v1.CreditService" in ProtoReflectionDescriptorDatabase(channel).get_services()
    finally:
        open_server.stop()
