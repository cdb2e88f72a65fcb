"""Applies migrations/, two kinds of SQL file, under one advisory lock.

Versioned files, NNNN_name.sql (tables, indexes, constraints, data moves), are
applied in order, each once; one that was edited after it was applied is an
error, not silently skipped. Then repeatable files, functions/NN_name.sql (the
ledger's functions and views, each file the one current definition of its
functions), are applied in name order, all in one transaction, when their
checksum differs from the one recorded: editing a function is editing its file.

Several replicas may start at once: the lock makes one apply and the others
find nothing left to do. It is a transaction-level lock, taken again by each
step's transaction, which then reads what is applied before applying: a
session-level one would not survive PgBouncer in transaction mode (the unlock
may run on another server connection, and the lock stay held for good on the
first, hanging the next replica's start).
"""

import contextlib
import hashlib
import importlib.resources
import logging
import re
from pathlib import Path

import psycopg

log = logging.getLogger(__name__)

# Package data of the one installed package, so that a wheel is complete.
MIGRATIONS_DIR = Path(str(importlib.resources.files("orgbilling.migrations")))
REPEATABLE_SUBDIR = "functions"
# Any constant works; it only has to be the same in every replica.
MIGRATION_LOCK_KEY = 0x6F726762696C6C  # "orgbill"
_VERSIONED_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
_REPEATABLE_NAME = re.compile(r"^\d{2}_[a-z0-9_]+\.sql$")


class MigrationError(Exception):
    pass


def migration_files(directory: Path | None = None) -> list[tuple[int, str, str]]:
    """(version, name, sql) of every versioned file, in order."""
    directory = directory or MIGRATIONS_DIR
    found = []
    for path in sorted(directory.glob("*.sql")):
        match = _VERSIONED_NAME.match(path.name)
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


def repeatable_files(directory: Path | None = None) -> list[tuple[str, str]]:
    """(name, sql) of every repeatable file, in order; names are
    relative to the migrations directory, such as functions/30_deductions.sql."""
    directory = directory or MIGRATIONS_DIR
    found = []
    for path in sorted((directory / REPEATABLE_SUBDIR).glob("*.sql")):
        if not _REPEATABLE_NAME.match(path.name):
            raise MigrationError(f"repeatable file name not NN_name.sql: {path.name}")
        found.append((f"{REPEATABLE_SUBDIR}/{path.name}", path.read_text()))
    return found


def migrate(url: str, directory: Path | None = None) -> list[str]:
    """Applies what is not applied yet; returns the names applied now."""
    versioned = migration_files(directory)
    repeatable = repeatable_files(directory)
    # Never prepared (prepare_threshold None): through PgBouncer in
    # transaction mode a prepared statement would stay on a server connection
    # other clients share.
    with psycopg.connect(url, autocommit=True, connect_timeout=10, prepare_threshold=None) as conn:
        with _locked(conn):
            conn.execute(
                """CREATE TABLE IF NOT EXISTS schema_migrations (
                       version     integer PRIMARY KEY,
                       name        text NOT NULL,
                       sha256      text NOT NULL,
                       applied_at  timestamptz NOT NULL DEFAULT now())"""
            )
            conn.execute(
                """CREATE TABLE IF NOT EXISTS schema_repeatable_files (
                       name        text PRIMARY KEY,
                       sha256      text NOT NULL,
                       applied_at  timestamptz NOT NULL DEFAULT now())"""
            )
        applied_now = _apply_versioned(conn, versioned)
        applied_now += _apply_repeatable(conn, repeatable)
    return applied_now


def unapplied(url: str, directory: Path | None = None) -> list[str]:
    """What this code needs that the database lacks (applies nothing, takes
    no lock): for a server that does not migrate on start. Empty when the
    database is up to date, or was migrated by a newer release.

    A newer release's migration Job may already have run while this one's
    replicas (re)start: the database then holds versioned files this code
    does not know, and repeatable files of another checksum, which every
    migration must keep working for the release before it (expand, then
    contract). Otherwise a repeatable file of another checksum cannot be told
    apart from one not yet applied, so it counts as missing: run this
    release's `orgbilling migrate`."""
    versioned = migration_files(directory)
    repeatable = repeatable_files(directory)
    with psycopg.connect(url, autocommit=True, connect_timeout=10, prepare_threshold=None) as conn:
        if conn.execute("SELECT to_regclass('schema_migrations') IS NULL"
                        " OR to_regclass('schema_repeatable_files') IS NULL").fetchone()[0]:
            return [name for _, name, _ in versioned] + [name for name, _ in repeatable]
        applied = {version: (name, digest) for version, name, digest in
                   conn.execute("SELECT version, name, sha256 FROM schema_migrations")}
        recorded = dict(conn.execute("SELECT name, sha256 FROM schema_repeatable_files").fetchall())
    missing = []
    for version, name, sql in versioned:
        if applied.get(version) is None:
            missing.append(name)
        elif applied[version] != (name, _sha256(sql)):
            missing.append(f"{name} (the database applied version {version} with another name or contents)")
    newer_release = bool(set(applied) - {version for version, _, _ in versioned})
    for name, sql in repeatable:
        if name not in recorded or (recorded[name] != _sha256(sql) and not newer_release):
            missing.append(name)
    return missing


@contextlib.contextmanager
def _locked(conn: psycopg.Connection):
    """A transaction holding the migration lock, which ends with it."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_KEY,))
        yield


def _sha256(sql: str) -> str:
    return hashlib.sha256(sql.encode()).hexdigest()


def _apply_versioned(conn: psycopg.Connection, files: list[tuple[int, str, str]]) -> list[str]:
    applied_now = []
    for version, name, sql in files:
        digest = _sha256(sql)
        # Each file in a transaction of its own, under the lock, which reads
        # whether it is applied (by another replica meanwhile, maybe).
        with _locked(conn):
            applied = conn.execute("SELECT name, sha256 FROM schema_migrations WHERE version = %s",
                                   (version,)).fetchone()
            if applied is None:
                conn.execute(sql)
                conn.execute(
                    "INSERT INTO schema_migrations (version, name, sha256) VALUES (%s, %s, %s)",
                    (version, name, digest),
                )
        if applied is None:
            log.info("applied migration %s", name)
            applied_now.append(name)
            continue
        applied_name, applied_digest = applied
        if applied_name != name:
            raise MigrationError(
                f"the database applied {applied_name} as version {version}, not {name}: it was "
                "built from another history of migrations (before the squash into "
                "0001_baseline.sql?); build it anew")
        if applied_digest != digest:
            raise MigrationError(f"{name} was changed after it was applied")
    return applied_now


def _apply_repeatable(conn: psycopg.Connection, files: list[tuple[str, str]]) -> list[str]:
    # One transaction: the functions change together, so no call ever sees
    # half of an edit that spans several files.
    with _locked(conn):
        recorded = dict(conn.execute("SELECT name, sha256 FROM schema_repeatable_files").fetchall())
        # A versioned file may have dropped what a function or view depends
        # on (a column type change must drop the views that read it): after
        # one, every repeatable file is applied again. Read from the tables,
        # not from this run, since another replica may have applied it. Each
        # step's transaction starts after the previous one committed, so
        # applied_at orders them (>=: a tie applies again, which is harmless).
        everything = conn.execute(
            """SELECT (SELECT max(applied_at) FROM schema_migrations)
                      >= coalesce((SELECT min(applied_at) FROM schema_repeatable_files), '-infinity')"""
        ).fetchone()[0]
        due = [(name, sql, _sha256(sql)) for name, sql in files]
        due = [(name, sql, digest) for name, sql, digest in due if everything or recorded.get(name) != digest]
        for name, sql, digest in due:
            try:
                conn.execute(sql)
            except psycopg.Error as error:
                raise MigrationError(f"{name} failed, so no repeatable file was applied: "
                                     f"{error}") from error
            conn.execute(
                """INSERT INTO schema_repeatable_files (name, sha256) VALUES (%s, %s)
                   ON CONFLICT (name) DO UPDATE SET sha256 = excluded.sha256, applied_at = now()""",
                (name, digest),
            )
    for name, _, _ in due:
        log.info("applied repeatable file %s", name)
    return [name for name, _, _ in due]
