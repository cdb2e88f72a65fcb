"""From a call's metadata and TLS peer to a Caller, or a refusal.

Credentials, in order:
1. `authorization: Bearer <credential>`: an API key (obk_...) or a JWT.
   When the header is present it alone decides, certificate or not.
2. Otherwise a client certificate (mutual TLS) whose subject a live
   api_keys record admits.
Anything else is UNAUTHENTICATED.
"""

from orgbilling.server.auth.caller import Caller
from orgbilling.server.auth.certificates import certificate_subject
from orgbilling.server.auth.jwt_verifier import JwtVerifier
from orgbilling.server.auth.key_ring import KeyRing
from orgbilling.server.errors import unauthenticated

AUTHORIZATION_HEADER = "authorization"
_BEARER = "bearer"
# Long enough for any JWT a provider issues, short enough to refuse junk
# before parsing it.
_CREDENTIAL_LENGTH_MAX = 16 * 1024


class Authenticator:
    def __init__(self, key_ring: KeyRing, jwt_verifier: JwtVerifier | None):
        self._key_ring = key_ring
        self._jwt_verifier = jwt_verifier

    def authenticate(self, metadata, auth_context) -> Caller:
        headers = [value for key, value in metadata or () if key == AUTHORIZATION_HEADER]
        if len(headers) > 1:
            raise unauthenticated("malformed", "more than one authorization header")
        if headers:
            return self._bearer(headers[0])
        subject = certificate_subject(auth_context)
        if subject is not None:
            return self._key_ring.authenticate_certificate(subject)
        raise unauthenticated(
            "missing", "no credentials: send the metadata 'authorization: Bearer <API key or JWT>'"
        )

    def _bearer(self, header) -> Caller:
        if not isinstance(header, str):
            raise unauthenticated("malformed", "the authorization header is not text")
        scheme, _, credential = header.strip().partition(" ")
        credential = credential.strip()
        if scheme.lower() != _BEARER or not credential or " " in credential:
            raise unauthenticated("malformed", "malformed authorization header: expected 'Bearer <credential>'")
        if len(credential) > _CREDENTIAL_LENGTH_MAX:
            raise unauthenticated("malformed", "the credential is too long")
        if credential.startswith("obk_"):
            return self._key_ring.authenticate_key(credential)
        if credential.count(".") == 2:
            if self._jwt_verifier is None:
                raise unauthenticated(
                    "unsupported", "this server accepts no JWTs (no JWKS is configured); use an API key"
                )
            return self._jwt_verifier.verify(credential)
        raise unauthenticated("malformed", "the bearer credential is neither an API key (obk_...) nor a JWT")
