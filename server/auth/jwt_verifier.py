"""Verifies JWTs from an OpenID Connect provider (Keycloak client-credentials
tokens, for instance) and says who the caller is.

Every PyJWT option is passed explicitly. The accepted algorithms come from
settings (jwt_algorithms, asymmetric only) and from the signing key, never
from the token: a token saying `alg: none`, or HS256 "signed" with the
public key, is refused. Issuer, audience, expiry and subject are required.

Claims that limit the caller fail closed: a blank subject, or an organization
claim that is null or not a list of organization ids, refuses the token; a
token without the organization claim is refused too unless the server allows
that (jwt_orgs_claim_optional), since it would act on every organization.

Checking an RS256 signature costs about 300 µs, more than the rest of a
call, and a service sends the same token for minutes: so a verified token
is remembered (up to jwt_cache_entries_max tokens) until it expires or the
signing keys change, and its next calls cost a dictionary lookup.
"""

import time

import jwt

from orgbilling.server.auth.caller import Caller
from orgbilling.server.auth.jwks import JwksCache
from orgbilling.server.auth.scopes import ALL_SCOPES
from orgbilling.server.errors import credentials_unverifiable, unauthenticated
from orgbilling.server.validation import IDENTIFIER

_DECODE_OPTIONS = {
    "verify_signature": True,
    "verify_exp": True,
    "verify_nbf": True,
    "verify_iat": True,
    "verify_aud": True,
    "verify_iss": True,
    "verify_sub": True,
    "verify_jti": True,
    "strict_aud": False,  # aud may be a list that contains ours (Keycloak's usual form)
    "require": ["exp", "iss", "aud", "sub"],
    "enforce_minimum_key_length": True,  # no RSA keys under 2048 bits
}

# A claim the token does not carry, told apart from one it carries as null.
_ABSENT = object()


class JwtVerifier:
    def __init__(self, keys: JwksCache, *, issuer: str, audience: str, leeway_ms: int,
                 scope_claim: str, roles_claim: str, orgs_claim: str, cache_entries_max: int,
                 orgs_claim_optional: bool = False):
        self._keys = keys
        self._cache_entries_max = cache_entries_max
        # token -> (caller, its exp, the JWKS generation that verified it);
        # replaced whole when full, so reads need no lock.
        self._verified: dict[str, tuple[Caller, float, int]] = {}
        self._issuer = issuer
        self._audience = audience
        self._leeway_s = leeway_ms / 1000
        self._scope_claim = scope_claim
        self._roles_claim = roles_claim
        self._orgs_claim = orgs_claim
        self._orgs_claim_optional = orgs_claim_optional

    def verify(self, token: str) -> Caller:
        remembered = self._verified.get(token)
        if remembered is not None:
            caller, expires_at, generation = remembered
            if time.time() < expires_at and generation == self._keys.generation:
                return caller
        generation = self._keys.generation
        caller, expires_at = self._verify(token)
        if self._cache_entries_max:
            if len(self._verified) >= self._cache_entries_max:
                self._verified = {}
            self._verified[token] = (caller, expires_at, generation)
        return caller

    def _verify(self, token: str) -> tuple[Caller, float]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as error:
            raise unauthenticated("malformed", f"malformed token: {error}") from None
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise unauthenticated("invalid", "the token names no signing key (kid)")
        key = self._keys.key(kid)
        if key is None:
            self._keys.reload_for_unknown_kid()
            key = self._keys.key(kid)
        if key is None:
            if not self._keys.loaded:
                raise credentials_unverifiable("the identity provider's keys are not loaded yet")
            raise unauthenticated("invalid", f"the token's signing key {kid!r} is unknown")
        try:
            claims = jwt.decode(
                token,
                key=key.public_key,
                algorithms=list(key.algorithms),
                options=_DECODE_OPTIONS,
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway_s,
            )
        except jwt.ExpiredSignatureError:
            raise unauthenticated("expired", "the token has expired") from None
        except jwt.exceptions.InvalidSubjectError:
            raise unauthenticated("malformed", "the token's sub claim is not a string") from None
        except jwt.PyJWTError as error:
            raise unauthenticated("invalid", f"invalid token: {error}") from None
        return self._caller(claims), float(claims["exp"])

    def _caller(self, claims: dict) -> Caller:
        granted = set(_words(claims.get(self._scope_claim)))
        granted |= set(_words(_claim_at(claims, self._roles_claim)))
        subject = claims["sub"]
        # The subject names the caller and keys its rate-limit bucket: blank
        # subjects would all be one caller.
        if not isinstance(subject, str) or not subject.strip():
            raise unauthenticated("malformed", "the token's sub claim is empty")
        name = claims.get("azp") or claims.get("client_id") or subject
        return Caller(
            principal=f"jwt:{claims['iss']}#{subject}",
            display_name=str(name),
            scopes=frozenset(granted) & ALL_SCOPES,
            org_ids=self._org_ids(claims),
        )

    def _org_ids(self, claims: dict) -> frozenset[str] | None:
        """The organizations the token may act on; None for every one, which
        only a server that allows tokens without the claim grants."""
        orgs = _claim_at(claims, self._orgs_claim, absent=_ABSENT)
        if orgs is _ABSENT:
            if self._orgs_claim_optional:
                return None
            raise unauthenticated(
                "malformed",
                f"the token has no {self._orgs_claim} claim: it must list the organizations it may act on",
            )
        # An empty list is no organization; null or any other shape is refused,
        # never read as "every organization".
        if not isinstance(orgs, list) or not all(isinstance(org, str) and IDENTIFIER.fullmatch(org)
                                                 for org in orgs):
            raise unauthenticated(
                "malformed", f"the token's {self._orgs_claim} claim is not a list of organization ids"
            )
        return frozenset(orgs)


def _claim_at(claims: dict, path: str, absent=None):
    """The claim at a dotted path, such as realm_access.roles; `absent` if absent."""
    if not path:
        return absent
    value = claims
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return absent
        value = value[part]
    return value


def _words(value) -> list[str]:
    """A space-separated string or a list of strings as a list; anything else as nothing."""
    if isinstance(value, str):
        return value.split()
    if isinstance(value, list):
        return [item for item in value if isinstance(item, str)]
    return []
