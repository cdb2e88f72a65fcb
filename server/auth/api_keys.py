"""API keys and certificate callers, as stored in the api_keys table.

A key reads `obk_<key id>_<secret>`: the key id is public and finds the
record; the secret is 256 random bits, of which only a SHA-256 is stored
(a fast hash is enough for a high-entropy secret: there is nothing to
guess). A record may instead name a client-certificate subject: it then
gives that certificate's holder its scopes and organizations (mutual TLS).

This module is the only place that speaks SQL about credentials; the CLI,
the local admin key and the tests use these functions.
"""

import dataclasses
import datetime
import hashlib
import re
import secrets

import psycopg

from orgbilling.server.auth.scopes import parse_scopes

KEY_PREFIX = "obk_"
_KEY_ID_BYTES = 8
_SECRET_BYTES = 32
_KEY_ID = re.compile(r"[0-9a-f]{16}")
# token_urlsafe(32) gives 43 characters of the URL-safe base64 alphabet.
_SECRET = re.compile(r"[A-Za-z0-9_-]{43}")
_NAME = re.compile(r"[A-Za-z0-9._:@-]{1,128}")
_ORG_ID = re.compile(r"[A-Za-z0-9._:@-]{1,128}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class KeyRecord:
    """A live credential record, as the server keeps it in memory."""

    key_id: str
    name: str
    # SHA-256 of the secret; None for a certificate caller.
    secret_sha256: bytes | None
    # RFC 4514 subject of the client certificate; None for an API key.
    certificate_subject: str | None
    scopes: frozenset[str]
    # None: every organization.
    org_ids: frozenset[str] | None


@dataclasses.dataclass(frozen=True, kw_only=True)
class KeyListing:
    """A record as `apikey list` shows it (never the secret or its hash)."""

    name: str
    key_id: str
    kind: str  # "api_key" or "certificate"
    certificate_subject: str | None
    scopes: tuple[str, ...]
    org_ids: tuple[str, ...] | None
    created_at: datetime.datetime
    revoked_at: datetime.datetime | None


def hash_secret(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def split_key(key: str) -> tuple[str, str] | None:
    """(key id, secret) of a well-formed key, else None."""
    if not key.startswith(KEY_PREFIX):
        return None
    key_id, separator, secret = key[len(KEY_PREFIX):].partition("_")
    if not separator or not _KEY_ID.fullmatch(key_id) or not _SECRET.fullmatch(secret):
        return None
    return key_id, secret


def _check_grant(name: str, scopes, org_ids) -> tuple[list[str], list[str] | None]:
    if not _NAME.fullmatch(name):
        raise ValueError(f"name must be 1 to 128 characters of [A-Za-z0-9._:@-], got {name!r}")
    scope_set = parse_scopes(",".join(scopes)) if not isinstance(scopes, str) else parse_scopes(scopes)
    if not scope_set:
        raise ValueError("give at least one scope")
    if org_ids is None:
        return sorted(scope_set), None
    orgs = sorted(set(org_ids))
    for org_id in orgs:
        if not _ORG_ID.fullmatch(org_id):
            raise ValueError(f"not an organization id: {org_id!r}")
    if not orgs:
        raise ValueError("an empty organization list would allow nothing; omit it for every organization")
    return sorted(scope_set), orgs


def create_api_key(database_url: str, name: str, scopes, org_ids=None) -> str:
    """Creates a key and returns it, `obk_<id>_<secret>`: the only time the
    secret exists outside the caller's hands. `scopes` is an iterable of
    scope names (or 'a,b'); `org_ids` None allows every organization.
    Raises ValueError for a bad argument or a name already in use."""
    scope_list, org_list = _check_grant(name, scopes, org_ids)
    key_id = secrets.token_hex(_KEY_ID_BYTES)
    secret = secrets.token_urlsafe(_SECRET_BYTES)
    with psycopg.connect(database_url, autocommit=True) as conn:
        _insert(conn, key_id=key_id, name=name, secret_sha256=hash_secret(secret), subject=None,
                scopes=scope_list, org_ids=org_list)
    return f"{KEY_PREFIX}{key_id}_{secret}"


def create_certificate_caller(database_url: str, name: str, certificate_subject: str, scopes,
                              org_ids=None) -> None:
    """Lets the holder of a client certificate with this subject (RFC 4514,
    as `openssl x509 -noout -subject -nameopt RFC2253` prints it) call with
    these scopes and organizations."""
    scope_list, org_list = _check_grant(name, scopes, org_ids)
    if not certificate_subject.strip():
        raise ValueError("the certificate subject must not be empty")
    with psycopg.connect(database_url, autocommit=True) as conn:
        _insert(conn, key_id=secrets.token_hex(_KEY_ID_BYTES), name=name, secret_sha256=None,
                subject=certificate_subject.strip(), scopes=scope_list, org_ids=org_list)


def _insert(conn, *, key_id: str, name: str, secret_sha256: bytes | None, subject: str | None,
            scopes: list[str], org_ids: list[str] | None) -> None:
    try:
        conn.execute(
            """INSERT INTO api_keys (key_id, name, secret_sha256, certificate_subject, scopes, org_ids)
               VALUES (%s, %s, %s, %s, %s, %s)""",
            (key_id, name, secret_sha256, subject, scopes, org_ids),
        )
    except psycopg.errors.UniqueViolation as error:
        what = "certificate subject" if "subject" in (error.diag.constraint_name or "") else "name"
        raise ValueError(f"a live credential with this {what} already exists") from None


def revoke(database_url: str, name: str) -> bool:
    """Revokes the live credential called `name`; False if there is none.
    Every replica stops accepting it within api_key_refresh_ms."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        row = conn.execute(
            "UPDATE api_keys SET revoked_at = now() WHERE name = %s AND revoked_at IS NULL RETURNING key_id",
            (name,),
        ).fetchone()
    return row is not None


def list_keys(database_url: str, include_revoked: bool = False) -> list[KeyListing]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            """SELECT name, key_id, certificate_subject, scopes, org_ids, created_at, revoked_at
                 FROM api_keys
                WHERE %s OR revoked_at IS NULL
                ORDER BY name, created_at""",
            (include_revoked,),
        ).fetchall()
    return [
        KeyListing(
            name=name, key_id=key_id, kind="certificate" if subject else "api_key",
            certificate_subject=subject, scopes=tuple(scopes),
            org_ids=None if org_ids is None else tuple(org_ids),
            created_at=created_at, revoked_at=revoked_at,
        )
        for name, key_id, subject, scopes, org_ids, created_at, revoked_at in rows
    ]


def load_live_records(conn) -> list[KeyRecord]:
    """Every live record, for the in-memory snapshot of a server."""
    rows = conn.execute(
        """SELECT key_id, name, secret_sha256, certificate_subject, scopes, org_ids
             FROM api_keys WHERE revoked_at IS NULL"""
    ).fetchall()
    return [
        KeyRecord(
            key_id=key_id, name=name,
            secret_sha256=None if digest is None else bytes(digest),
            certificate_subject=subject, scopes=frozenset(scopes),
            org_ids=None if org_ids is None else frozenset(org_ids),
        )
        for key_id, name, digest, subject, scopes, org_ids in rows
    ]


def is_live_key(database_url: str, key: str) -> bool:
    """Whether `key` is a live key of this database (for reusing the local admin key)."""
    parts = split_key(key)
    if parts is None:
        return False
    key_id, secret = parts
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT secret_sha256 FROM api_keys WHERE key_id = %s AND revoked_at IS NULL", (key_id,)
        ).fetchone()
    return row is not None and row[0] is not None and secrets.compare_digest(
        bytes(row[0]), hash_secret(secret)
    )
