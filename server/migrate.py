"""Applies migrations/NNNN_name.sql in order, each once, under an advisory lock.

Several replicas may start at once: the lock makes one apply and the others
find nothing left to do. An applied file that was edited afterwards is an
error, not silently skipped.
"""

import hashlib
import importlib.resources
import logging
import re
from pathlib import Path

import psycopg

log = logging.getLogger(__name__)

# Package data of the one installed package, so that a wheel is complete.
MIGRATIONS_DIR = Path(str(importlib.resources.files("orgbilling.migrations")))
# Any constant works; it only has to be the same in every replica.
MIGRATION_LOCK_KEY = 0x6F726762696C6C  # "orgbill"
_FILE_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


class MigrationError(Exception):
    pass


def migration_files(directory: Path = MIGRATIONS_DIR) -> list[tuple[int, str, str]]:
    """(version, name, sql) of every migration file, in order."""
    found = []
    for path in sorted(directory.glob("*.sql")):
        match = _FILE_NAME.match(path.name)
        if not match:
            raise MigrationError(f"migration file name not NNNN_name.sql: {path.name}")
        found.append((int(match.group(1)), path.name, path.read_text()))
    if not found:
        # Nothing to apply would leave an empty schema that looks migrated.
        raise MigrationError(f"no migration files in {directory}: the installation is incomplete")
    versions = [version for version, _, _ in found]
    if len(set(versions)) != len(versions):
        raise MigrationError("two migration files share a version number")
    return found


def migrate(url: str, directory: Path = MIGRATIONS_DIR) -> list[str]:
    """Applies what is not applied yet; returns the names applied now."""
    files = migration_files(directory)
    applied_now = []
    with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))
        try:
            conn.execute(
                """CREATE TABLE IF NOT EXISTS schema_migrations (
                       version     integer PRIMARY KEY,
                       name        text NOT NULL,
                       sha256      text NOT NULL,
                       applied_at  timestamptz NOT NULL DEFAULT now())"""
            )
            applied = {
                version: (name, digest)
                for version, name, digest in conn.execute(
                    "SELECT version, name, sha256 FROM schema_migrations"
                )
            }
            for version, name, sql in files:
                digest = hashlib.sha256(sql.encode()).hexdigest()
                if version in applied:
                    if applied[version][1] != digest:
                        raise MigrationError(f"{name} was changed after it was applied")
                    continue
                with conn.transaction():
                    conn.execute(sql)
                    conn.execute(
                        "INSERT INTO schema_migrations (version, name, sha256) VALUES (%s, %s, %s)",
                        (version, name, digest),
                    )
                log.info("applied migration %s", name)
                applied_now.append(name)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_KEY,))
    return applied_now
