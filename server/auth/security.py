"""Everything the server needs to know who calls and to limit them, built
from settings: the API key snapshot, the JWKS and JWT verifier, and the
rate limits' buckets. The interceptors that use them are placed in the
chain by server.app."""

import logging

from orgbilling.server.auth.authenticator import Authenticator
from orgbilling.server.auth.jwks import JwksCache
from orgbilling.server.auth.jwt_verifier import JwtVerifier
from orgbilling.server.auth.key_ring import KeyRing
from orgbilling.server.interceptors.ratelimit import TokenBuckets
from orgbilling.server.settings import Settings

log = logging.getLogger(__name__)


class Security:
    def __init__(self, settings: Settings, pool):
        self.key_ring = KeyRing(
            pool,
            refresh_ms=settings.api_key_refresh_ms,
            stale_ms=settings.api_key_snapshot_stale_ms,
            unknown_refresh_interval_ms=settings.api_key_unknown_refresh_interval_ms,
            connection_timeout_ms=settings.pool_wait_timeout_ms,
        )
        self.jwks = None
        verifier = None
        if settings.jwt_enabled:
            self.jwks = JwksCache(
                url=settings.jwks_url,
                file=settings.jwks_file,
                allowed_algorithms=frozenset(settings.jwt_algorithm_list),
                refresh_ms=settings.jwks_refresh_ms,
                unknown_kid_refresh_interval_ms=settings.jwks_unknown_kid_refresh_interval_ms,
                fetch_timeout_ms=settings.jwks_fetch_timeout_ms,
                size_max_bytes=settings.jwks_size_max_bytes,
            )
            verifier = JwtVerifier(
                self.jwks,
                issuer=settings.jwt_issuer,
                audience=settings.jwt_audience,
                leeway_ms=settings.jwt_leeway_ms,
                scope_claim=settings.jwt_scope_claim,
                roles_claim=settings.jwt_roles_claim,
                orgs_claim=settings.jwt_orgs_claim,
                cache_entries_max=settings.jwt_cache_entries_max,
                orgs_claim_optional=settings.jwt_orgs_claim_optional,
            )
        self.authenticator = Authenticator(self.key_ring, verifier)
        self.read_limits = _buckets(rate_per_s=settings.rate_limit_reads_per_s,
                                    burst=settings.rate_limit_read_burst,
                                    callers_max=settings.rate_limit_callers_max)
        self.write_limits = _buckets(rate_per_s=settings.rate_limit_writes_per_s,
                                     burst=settings.rate_limit_write_burst,
                                     callers_max=settings.rate_limit_callers_max)

    def start(self) -> None:
        self.key_ring.start()
        if self.jwks is not None:
            self.jwks.start()

    def stop(self) -> None:
        self.key_ring.stop()
        if self.jwks is not None:
            self.jwks.stop()


def _buckets(*, rate_per_s: int, burst: int, callers_max: int) -> TokenBuckets | None:
    """A rate of 0 turns the limit off."""
    if rate_per_s <= 0:
        return None
    return TokenBuckets(rate_per_s=rate_per_s, burst=burst, keys_max=callers_max)
