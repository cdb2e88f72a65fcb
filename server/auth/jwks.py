"""The identity provider's signing keys (a JWKS), fetched off the request path.

A background thread reloads the set every jwks_refresh_ms from
ORGBILLING_JWKS_URL or ORGBILLING_JWKS_FILE. A token whose `kid` is not in
the set (the provider rotated its keys) triggers at most one reload per
jwks_unknown_kid_refresh_interval_ms, bounded by jwks_fetch_timeout_ms;
concurrent calls with unknown kids share that one reload instead of each
fetching. Symmetric (`oct`) keys are never loaded: a token signed with a
shared secret is never accepted.
"""

import dataclasses
import json
import logging
import threading
import urllib.request
from pathlib import Path

import jwt
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from orgbilling.server.auth.shared_reload import SharedReload

log = logging.getLogger(__name__)

# The algorithms each kind of public key can verify.
_FAMILY = {
    "RSA": frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}),
    "EC": frozenset({"ES256", "ES384", "ES512"}),
    "OKP": frozenset({"EdDSA"}),
}
ASYMMETRIC_ALGORITHMS = frozenset().union(*_FAMILY.values())


@dataclasses.dataclass(frozen=True, kw_only=True)
class SigningKey:
    kid: str
    public_key: object  # a cryptography public key
    # The algorithms this key may verify: its JWK `alg` if it names one,
    # else the configured ones that fit its key type.
    algorithms: tuple[str, ...]


def parse_jwks(document: bytes, allowed_algorithms: frozenset[str]) -> dict[str, SigningKey]:
    """The usable signing keys of a JWKS document, by kid; unusable keys
    (no kid, symmetric, encryption-only, unknown type, an algorithm not
    allowed) are skipped."""
    data = json.loads(document)
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise ValueError("not a JWKS document: no 'keys' list")
    found = {}
    for jwk in data["keys"]:
        if not isinstance(jwk, dict) or not isinstance(jwk.get("kid"), str):
            continue
        family = _FAMILY.get(jwk.get("kty"))
        if family is None or jwk.get("use", "sig") != "sig":
            continue
        named = jwk.get("alg")
        algorithms = (frozenset({named}) if named else family) & allowed_algorithms
        if not algorithms:
            continue
        public = {k: v for k, v in jwk.items() if k not in ("d", "p", "q", "dp", "dq", "qi")}
        try:
            key = jwt.PyJWK(public, algorithm=sorted(algorithms)[0]).key
        except jwt.PyJWTError as error:
            log.warning("skipping JWKS key %s: %s", jwk["kid"], error)
            continue
        found[jwk["kid"]] = SigningKey(kid=jwk["kid"], public_key=key,
                                       algorithms=tuple(sorted(algorithms)))
    return found


def _fingerprint(keys: dict[str, SigningKey]) -> set:
    return {
        (kid, key.algorithms, key.public_key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo))
        for kid, key in keys.items()
    }


class JwksCache:
    def __init__(self, *, url: str, file: str, allowed_algorithms: frozenset[str], refresh_ms: int,
                 unknown_kid_refresh_interval_ms: int, fetch_timeout_ms: int, size_max_bytes: int):
        self._url = url
        self._file = file
        self._allowed = allowed_algorithms
        self._refresh_s = refresh_ms / 1000
        self._timeout_s = fetch_timeout_ms / 1000
        self._size_max = size_max_bytes
        # Replaced whole, read without a lock.
        self._keys: dict[str, SigningKey] | None = None
        # Changes whenever the set of keys does: what was verified with an
        # older generation must be verified again.
        self.generation = 0
        self._lock = threading.Lock()  # guards generation and fetch_count, never held across I/O
        self.fetch_count = 0  # for tests and logs
        self._reload_for_unknown_kid = SharedReload(
            self.reload,
            interval_s=unknown_kid_refresh_interval_ms / 1000,
            wait_s=self._timeout_s,
            on_failure=lambda error: log.warning(
                "reloading the JWKS for an unknown kid failed: %s", error),
        )
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="jwks-refresh", daemon=True)

    @property
    def source(self) -> str:
        return self._url or self._file

    def start(self) -> None:
        try:
            self.reload()
        except Exception as error:  # noqa: BLE001: the thread keeps trying
            log.warning("cannot load the JWKS from %s yet: %s", self.source, error)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()

    @property
    def loaded(self) -> bool:
        return self._keys is not None

    def key(self, kid: str) -> SigningKey | None:
        keys = self._keys
        return None if keys is None else keys.get(kid)

    def reload(self) -> None:
        with self._lock:
            self.fetch_count += 1
        keys = parse_jwks(self._fetch(), self._allowed)
        if not keys:
            raise ValueError(f"the JWKS at {self.source} has no usable signing key")
        previous = self._keys
        if previous is None or _fingerprint(previous) != _fingerprint(keys):
            self._keys = keys
            with self._lock:
                self.generation += 1

    def _fetch(self) -> bytes:
        if self._file:
            with open(Path(self._file), "rb") as handle:
                document = handle.read(self._size_max + 1)
        else:
            request = urllib.request.Request(self._url, headers={"Accept": "application/json"})
            with urllib.request.urlopen(request, timeout=self._timeout_s) as response:  # noqa: S310
                document = response.read(self._size_max + 1)
        if len(document) > self._size_max:
            raise ValueError(f"the JWKS at {self.source} is larger than {self._size_max} bytes")
        return document

    def reload_for_unknown_kid(self) -> None:
        """At most one bounded reload per interval, shared by every caller
        that asks meanwhile (server.auth.shared_reload)."""
        self._reload_for_unknown_kid.run()

    def _run(self) -> None:
        while not self._stopping.wait(self._refresh_s if self.loaded else min(self._refresh_s, 5.0)):
            try:
                self.reload()
            except Exception as error:  # noqa: BLE001: keep the keys we have
                log.warning("cannot reload the JWKS from %s: %s", self.source, error)
