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
            pool, settings.api_key_refresh_ms, settings.api_key_snapshot_stale_ms,
            settings.api_key_unknown_refresh_interval_ms, settings.pool_wait_timeout_ms,
        )
        self.jwks = None
        verifier = None
        if settings.jwt_enabled:
            self.jwks = JwksCache(
                settings.jwks_url, settings.jwks_file, frozenset(settings.jwt_algorithm_list),
                settings.jwks_refresh_ms, settings.jwks_unknown_kid_refresh_interval_ms,
                settings.jwks_fetch_timeout_ms, settings.jwks_size_max_bytes,
            )
            verifier = JwtVerifier(
                self.jwks, settings.jwt_issuer, settings.jwt_audience, settings.jwt_leeway_ms,
                settings.jwt_scope_claim, settings.jwt_roles_claim, settings.jwt_orgs_claim,
                settings.jwt_cache_entries_max,
                orgs_claim_optional=settings.jwt_orgs_claim_optional,
            )
        self.authenticator = Authenticator(self.key_ring, verifier)
        self.read_limits = _buckets(settings.rate_limit_reads_per_s, settings.rate_limit_read_burst,
                                    settings.rate_limit_callers_max)
        self.write_limits = _buckets(settings.rate_limit_writes_per_s, settings.rate_limit_write_burst,
                                     settings.rate_limit_callers_max)

    def start(self) -> None:
        self.key_ring.start()
        if self.jwks is not None:
            self.jwks.start()

    def stop(self) -> None:
        self.key_ring.stop()
        if self.jwks is not None:
            self.jwks.stop()


def _buckets(rate_per_s: int, burst: int, callers_max: int) -> TokenBuckets | None:
    return TokenBuckets(rate_per_s, burst, callers_max) if rate_per_s > 0 else None
