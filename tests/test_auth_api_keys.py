"""API keys: made, listed and revoked with the CLI; only a hash stored; a new
key works on its first call; a revoked one stops working within seconds on
every replica; stale or missing key snapshots fail closed."""

import contextlib
import hashlib
import re
import subprocess
import sys
import time

import grpc
import psycopg
import pytest

from orgbilling.v1 import org_billing_service_pb2 as billing_pb
from orgbilling.server.auth import api_keys
from orgbilling.server.auth.key_ring import KeyRing
from orgbilling.server.errors import ServiceError
from tests.server_process import environment_without_settings
from tests.support import REPO, Client, admin_token, api_key, error_info

KEY_FORMAT = re.compile(r"obk_[0-9a-f]{16}_[A-Za-z0-9_-]{43}")


def orgbilling(database_url, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "orgbilling.server", *args], cwd=REPO, capture_output=True, text=True, timeout=60,
        env=environment_without_settings({"ORGBILLING_DATABASE_URL": database_url}),
    )


def test_cli_creates_lists_and_revokes_keys_and_stores_only_a_hash(database_url):
    """`apikey create` prints the key once, as the last line of stdout; the
    database holds its SHA-256, never the secret; `list` never shows it."""
    made = orgbilling(database_url, "apikey", "create", "--name", "chat-api",
                      "--scopes", "credits.read,credits.deduct", "--org", "acme", "--org", "globex")
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip().splitlines()[-1]
    assert KEY_FORMAT.fullmatch(key), made.stdout
    key_id, secret = api_keys.split_key(key)
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT key_id, secret_sha256, scopes, org_ids, api_keys::text FROM api_keys"
                           " WHERE name = 'chat-api'").fetchone()
    assert row[0] == key_id
    assert bytes(row[1]) == hashlib.sha256(secret.encode()).digest()
    assert (sorted(row[2]), sorted(row[3])) == (["credits.deduct", "credits.read"], ["acme", "globex"])
    assert secret not in row[4]

    listed = orgbilling(database_url, "apikey", "list")
    assert listed.returncode == 0 and "chat-api" in listed.stdout and "acme,globex" in listed.stdout
    assert secret not in listed.stdout

    again = orgbilling(database_url, "apikey", "create", "--name", "chat-api", "--scopes", "credits.read")
    assert again.returncode != 0 and "already exists" in again.stderr

    revoked = orgbilling(database_url, "apikey", "revoke", "chat-api")
    assert revoked.returncode == 0, revoked.stderr
    assert "chat-api" not in orgbilling(database_url, "apikey", "list").stdout
    assert "chat-api" in orgbilling(database_url, "apikey", "list", "--all").stdout
    assert orgbilling(database_url, "apikey", "revoke", "chat-api").returncode != 0
    # The name is free again once revoked.
    assert orgbilling(database_url, "apikey", "create", "--name", "chat-api", "--scopes",
                      "credits.read").returncode == 0


def test_cli_refuses_unknown_scopes_and_registers_certificate_callers(database_url):
    bad = orgbilling(database_url, "apikey", "create", "--name", "x", "--scopes", "credits.everything")
    assert bad.returncode == 2 and "unknown scope" in bad.stderr
    cert = orgbilling(database_url, "apikey", "create", "--name", "worker", "--scopes", "credits.read",
                      "--certificate-subject", "O=Acme,CN=billing-worker")
    assert cert.returncode == 0, cert.stderr
    assert not KEY_FORMAT.search(cert.stdout)  # no secret: the certificate is the credential
    listed = orgbilling(database_url, "apikey", "list").stdout
    assert "certificate" in listed and "O=Acme,CN=billing-worker" in listed


def pool_of(client, org_id="acme"):
    return client.billing.GetCreditPool(billing_pb.GetCreditPoolRequest(org_id=org_id), timeout=5)


def test_a_new_key_works_on_its_first_call(server, client, database_url):
    """Made after the server started, before its next reload: the unknown key
    id makes the server reload its snapshot once, at once."""
    client.funded_org("acme", 1_000, {})
    fresh = Client(client.address, token=api_key(database_url, ["credits.read"]))
    assert pool_of(fresh).pool.total_millicredits == 1_000
    fresh.close()


def test_a_revoked_key_stops_working_within_seconds_on_every_replica(start_server, database_url):
    """Two replicas over one database: after `revoke`, both refuse the key
    within api_key_refresh_ms (plus a call's time), with no restart."""
    refresh_ms = 500
    admin_key = admin_token(database_url)
    key = api_key(database_url, ["credits.read"], name="to-revoke")
    replicas = [start_server(database_url, api_key_refresh_ms=refresh_ms) for _ in range(2)]
    try:
        admin = Client(f"127.0.0.1:{replicas[0].port}", token=admin_key)
        admin.funded_org("acme", 1_000, {})
        clients = [Client(f"127.0.0.1:{r.port}", token=key) for r in replicas]
        for client in clients:
            pool_of(client)
        assert api_keys.revoke(database_url, "to-revoke")
        revoked_at = time.monotonic()
        refused_after = []
        for client in clients:
            while True:
                try:
                    pool_of(client)
                except grpc.RpcError as error:
                    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
                    refused_after.append(time.monotonic() - revoked_at)
                    break
                assert time.monotonic() - revoked_at < 10, "the revoked key still works"
                time.sleep(0.05)
        assert max(refused_after) < refresh_ms / 1000 + 1.0, refused_after
        for client in [admin, *clients]:
            client.close()
    finally:
        for replica in replicas:
            replica.stop()


def test_a_wrong_secret_for_a_real_key_id_is_refused(client, database_url, token):
    key_id, _ = api_keys.split_key(token)
    impostor = Client(client.address, token=f"obk_{key_id}_{'x' * 43}")
    with pytest.raises(grpc.RpcError) as refused:
        pool_of(impostor)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_info(refused.value).metadata["cause"] == "invalid"
    impostor.close()


# The key ring alone, over a pool that counts (and can fail) its connections.

class CountingPool:
    def __init__(self, database_url):
        self.database_url = database_url
        self.connections = 0
        self.failing = False

    @contextlib.contextmanager
    def connection(self, timeout):
        self.connections += 1
        if self.failing:
            raise psycopg.OperationalError("the database is gone")
        with psycopg.connect(self.database_url) as conn:
            yield conn


def test_guessed_key_ids_reload_the_snapshot_at_most_once_per_interval(database_url):
    """Unknown key ids cost the database one reload per interval, however many arrive."""
    pool = CountingPool(database_url)
    ring = KeyRing(pool, refresh_ms=60_000, stale_ms=120_000, unknown_refresh_interval_ms=60_000,
                   connection_timeout_ms=2000)
    ring.refresh()
    for n in range(50):
        with pytest.raises(ServiceError) as refused:
            ring.authenticate_key(f"obk_{n:016x}_{'A' * 43}")
        assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert pool.connections == 2  # the first load, then one reload for the first unknown id


def test_keys_fail_closed_before_the_first_load_and_when_reloads_keep_failing(database_url):
    """UNAVAILABLE (retry), never a yes on information the server cannot check."""
    key = admin_token(database_url)
    pool = CountingPool(database_url)
    ring = KeyRing(pool, refresh_ms=50, stale_ms=300, unknown_refresh_interval_ms=1000,
                   connection_timeout_ms=2000)
    with pytest.raises(ServiceError) as not_loaded:
        ring.authenticate_key(key)
    assert not_loaded.value.code == grpc.StatusCode.UNAVAILABLE
    ring.start()
    try:
        assert ring.authenticate_key(key).scopes
        pool.failing = True
        time.sleep(0.6)
        with pytest.raises(ServiceError) as stale:
            ring.authenticate_key(key)
        assert (stale.value.code, stale.value.reason) == (grpc.StatusCode.UNAVAILABLE, "CREDENTIALS_UNVERIFIABLE")
        pool.failing = False
        time.sleep(0.3)
        assert ring.authenticate_key(key).scopes
    finally:
        ring.stop()
