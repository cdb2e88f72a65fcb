"""Who is calling: the result of authentication."""

import contextvars
import dataclasses


@dataclasses.dataclass(frozen=True, kw_only=True)
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


# The current call's admitted caller, set by the auth interceptor, for the
# layers inside it that need to know who calls.
caller_var: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("caller", default=None)
