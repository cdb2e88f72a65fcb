"""Who is calling: the result of authentication, and the refusals it leads to."""

import contextvars
import dataclasses

import grpc

from orgbilling.server.errors import ServiceError


@dataclasses.dataclass(frozen=True)
class Caller:
    """An authenticated caller and what it may do."""

    # Stable and unique per credential: "apikey:<key id>", "jwt:<issuer>#<subject>",
    # "cert:<subject>". The rate limiter keys its buckets by it.
    principal: str
    # For people and logs: the key's name, the token's subject...
    display_name: str
    scopes: frozenset[str]
    # None: every organization; otherwise only these.
    org_ids: frozenset[str] | None

    def may_act_on(self, org_id: str) -> bool:
        return self.org_ids is None or org_id in self.org_ids


caller_var: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("caller", default=None)


def current_caller() -> Caller | None:
    return caller_var.get()


def unauthenticated(cause: str, message: str) -> ServiceError:
    """No or bad credentials. `cause` is one of missing, malformed, invalid,
    expired, unsupported: what the caller has to fix."""
    return ServiceError(
        grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED", message, metadata={"cause": cause}
    )


def credentials_unverifiable(message: str) -> ServiceError:
    """The server cannot tell whether the credentials are good right now
    (keys not loaded yet, identity provider unreachable): fail closed, retryable."""
    return ServiceError(grpc.StatusCode.UNAVAILABLE, "CREDENTIALS_UNVERIFIABLE", message)


def missing_scope(method: str, scope: str) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.PERMISSION_DENIED, "MISSING_SCOPE",
        f"this credential lacks the scope {scope}, which {method} requires",
        metadata={"required_scope": scope, "method": method},
    )


def org_not_permitted(org_id: str | None) -> ServiceError:
    if org_id is None:
        return ServiceError(
            grpc.StatusCode.PERMISSION_DENIED, "ORG_NOT_PERMITTED",
            "this credential is limited to some organizations, and this call names none",
        )
    return ServiceError(
        grpc.StatusCode.PERMISSION_DENIED, "ORG_NOT_PERMITTED",
        f"this credential may not act on organization {org_id!r}", metadata={"org_id": org_id},
    )


def scope_not_declared(method: str) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.PERMISSION_DENIED, "SCOPE_NOT_DECLARED",
        f"{method} has no required scope declared, so nobody may call it",
        metadata={"method": method},
    )
