"""Each server's in-memory snapshot of the live API keys and certificate
callers, reloaded by a background thread every api_key_refresh_ms.

The request path reads the snapshot without a lock and without any database
I/O: the snapshot is an immutable object replaced whole. A revoked key
vanishes from every replica's snapshot at its next reload. If reloads keep
failing for api_key_snapshot_stale_ms, keys are refused with UNAVAILABLE
rather than trusted on old information (fail closed).

One exception to "no I/O on the request path": a key id missing from the
snapshot (most likely a key created since the last reload) triggers one
reload at once, at most once per api_key_unknown_refresh_interval_ms for the
whole server, shared by every call that asks meanwhile and bounded by the
pool's wait timeout. So a new key works on its first call, and guessing
key ids costs the database one small query per interval at most.
"""

import dataclasses
import hmac
import logging
import threading
import time
from typing import NamedTuple

from orgbilling.server.auth.api_keys import KeyRecord, hash_secret, load_live_records, split_key
from orgbilling.server.auth.caller import Caller
from orgbilling.server.auth.shared_reload import SharedReload
from orgbilling.server.errors import credentials_unverifiable, unauthenticated

log = logging.getLogger(__name__)


class _Key(NamedTuple):
    secret_sha256: bytes
    # Made once a load rather than once a call.
    caller: Caller


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Snapshot:
    by_key_id: dict[str, _Key]
    by_subject: dict[str, Caller]
    loaded_at: float  # time.monotonic()


def caller_of(record: KeyRecord) -> Caller:
    if record.certificate_subject is not None:
        principal = f"cert:{record.certificate_subject}"
    else:
        principal = f"apikey:{record.key_id}"
    return Caller(principal=principal, display_name=record.name, scopes=record.scopes,
                  org_ids=record.org_ids)


class KeyRing:
    def __init__(self, pool, *, refresh_ms: int, stale_ms: int, unknown_refresh_interval_ms: int,
                 connection_timeout_ms: int):
        self._pool = pool
        self._refresh_s = refresh_ms / 1000
        self._stale_s = stale_ms / 1000
        self._connection_timeout_s = connection_timeout_ms / 1000
        self._snapshot: _Snapshot | None = None
        self._reload_for_unknown_key = SharedReload(
            self.refresh,
            interval_s=unknown_refresh_interval_ms / 1000,
            wait_s=self._connection_timeout_s,
            on_failure=lambda error: log.warning(
                "reloading API keys for an unknown key id failed: %s", error),
        )
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="api-key-refresh", daemon=True)

    def start(self) -> None:
        """Loads once now (so keys made before the start work at once), then
        keeps reloading in the background."""
        try:
            self.refresh()
        except Exception as error:  # noqa: BLE001: the thread keeps trying
            log.warning("cannot load API keys yet: %s", error)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()

    def refresh(self) -> None:
        """Reloads the snapshot from the database now."""
        with self._pool.connection(timeout=self._connection_timeout_s) as conn:
            records = load_live_records(conn)
        self._snapshot = _Snapshot(
            by_key_id={r.key_id: _Key(r.secret_sha256, caller_of(r)) for r in records
                       if r.secret_sha256 is not None},
            by_subject={r.certificate_subject: caller_of(r) for r in records
                        if r.certificate_subject is not None},
            loaded_at=time.monotonic(),
        )

    def _run(self) -> None:
        failing = False
        while not self._stopping.wait(self._refresh_s):
            try:
                self.refresh()
                if failing:
                    log.info("API keys reloaded again")
                failing = False
            except Exception as error:  # noqa: BLE001: keep trying; stale snapshots fail closed
                if not failing:
                    log.warning("cannot reload API keys: %s", error)
                failing = True

    def _fresh_snapshot(self) -> _Snapshot:
        snapshot = self._snapshot
        if snapshot is None:
            raise credentials_unverifiable("API keys are not loaded yet; retry shortly")
        if time.monotonic() - snapshot.loaded_at > self._stale_s:
            raise credentials_unverifiable("API keys cannot be reloaded from the database; retry shortly")
        return snapshot

    def authenticate_key(self, key: str) -> Caller:
        parts = split_key(key)
        if parts is None:
            raise unauthenticated("malformed", "malformed API key: expected obk_<key id>_<secret>")
        key_id, secret = parts
        stored = self._fresh_snapshot().by_key_id.get(key_id)
        if stored is None:
            self._reload_for_unknown_key.run()
            stored = self._fresh_snapshot().by_key_id.get(key_id)
        # Constant-time comparison of the hashes: the time taken tells nothing
        # about how much of the secret was right.
        if stored is None or not hmac.compare_digest(stored.secret_sha256, hash_secret(secret)):
            # Unknown, revoked and wrong secret look the same to the caller.
            raise unauthenticated("invalid", "invalid API key")
        return stored.caller

    def authenticate_certificate(self, subject: str) -> Caller:
        caller = self._fresh_snapshot().by_subject.get(subject)
        if caller is None:
            raise unauthenticated(
                "invalid", f"no live credential admits the client certificate subject {subject!r}"
            )
        return caller
