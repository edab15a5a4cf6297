"""Versioned schema migrations and the ``shadowproxy db migrate|status`` command.

Migrations are the files ``shadowproxy/migrations/<dialect>_<NNNN>_<name>.sql``;
table ``shadowproxy_schema(version, applied_at)`` lists those applied. On
PostgreSQL they run under a session advisory lock so replicas starting at once
serialise (the first applies, the others find nothing to do); on SQLite a
``BEGIN IMMEDIATE`` transaction does the same across processes, after
``connect_sqlite`` has switched the file to WAL (retried until a deadline: see
``_enable_wal``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from shadowproxy.base.errors import StorageUnavailable
from shadowproxy.storage.urls import display_url, parse_store_url

# Arbitrary but fixed: every shadowproxy process locks the same key.
ADVISORY_LOCK_KEY = 0x5348_4144_4F57  # "SHADOW"
CONNECT_TIMEOUT_S = 10.0
# How long a SQLite connection waits for another process's lock (busy_timeout),
# and the deadline for switching a file to WAL, which busy_timeout cannot cover.
SQLITE_BUSY_TIMEOUT_S = 5.0
# Shipped as package data next to this package (pyproject: migrations/*.sql).
MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def migrations(dialect: str) -> list[Migration]:
    """The dialect's migrations ("postgres" | "sqlite"), in version order."""
    found = []
    pattern = re.compile(rf"{dialect}_(\d{{4}})_(\w+)\.sql")
    for entry in MIGRATIONS_DIR.iterdir():
        match = pattern.fullmatch(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text("utf-8")))
    return sorted(found, key=lambda m: m.version)


def latest_version(dialect: str) -> int:
    return max((m.version for m in migrations(dialect)), default=0)


_PG_SCHEMA_TABLE = """CREATE TABLE IF NOT EXISTS shadowproxy_schema (
    version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"""
_SQLITE_SCHEMA_TABLE = """CREATE TABLE IF NOT EXISTS shadowproxy_schema (
    version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP)"""


async def migrate_postgres(conn: asyncpg.Connection) -> tuple[int, int]:
    """Apply pending migrations; return (schema version, migrations applied now)."""
    await conn.execute("SELECT pg_advisory_lock($1)", ADVISORY_LOCK_KEY)
    try:
        await conn.execute(_PG_SCHEMA_TABLE)
        current = await conn.fetchval("SELECT coalesce(max(version), 0) FROM shadowproxy_schema")
        applied = 0
        for migration in migrations("postgres"):
            if migration.version <= current:
                continue
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO shadowproxy_schema (version) VALUES ($1)", migration.version
                )
            current, applied = migration.version, applied + 1
        return int(current), applied
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", ADVISORY_LOCK_KEY)


def migrate_sqlite(conn: sqlite3.Connection) -> tuple[int, int]:
    """Apply pending migrations in one IMMEDIATE transaction; (version, applied now).

    ``BEGIN IMMEDIATE`` takes the write lock before the version is read (waiting
    for it under busy_timeout), so of several processes migrating at once the
    first applies everything and the others find nothing left to do.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(_SQLITE_SCHEMA_TABLE)
        current = conn.execute("SELECT coalesce(max(version), 0) FROM shadowproxy_schema")
        version = int(current.fetchone()[0])
        applied = 0
        for migration in migrations("sqlite"):
            if migration.version <= version:
                continue
            for statement in _sqlite_statements(migration.sql):
                conn.execute(statement)
            conn.execute(
                "INSERT INTO shadowproxy_schema (version) VALUES (?)", (migration.version,)
            )
            version, applied = migration.version, applied + 1
        conn.execute("COMMIT")
        return version, applied
    except BaseException:
        rollback_sqlite(conn)
        raise


def rollback_sqlite(conn: sqlite3.Connection) -> None:
    """ROLLBACK if a transaction is still open (SQLite may already have rolled it back).

    Called while an exception propagates: a failing ROLLBACK must not replace it.
    """
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


def _sqlite_statements(script: str) -> list[str]:
    """Split a script into statements (executescript would COMMIT our transaction)."""
    statements, buffer = [], ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            statements.append(buffer.strip())
            buffer = ""
    return statements


def connect_sqlite(
    path: str, *, busy_timeout_s: float = SQLITE_BUSY_TIMEOUT_S
) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit), WAL, busy timeout.

    Safe when several processes open the same new file at once: each waits up
    to ``busy_timeout_s`` for the others' locks, then raises sqlite3.Error.
    """
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    deadline = time.monotonic() + busy_timeout_s
    # timeout= is SQLite's busy_timeout: lock waits in later statements are bounded too.
    conn = sqlite3.connect(
        path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
    )
    try:
        _enable_wal(conn, deadline)
        conn.execute("PRAGMA synchronous = NORMAL")
    except BaseException:
        conn.close()
        raise
    return conn


def _enable_wal(conn: sqlite3.Connection, deadline: float) -> None:
    """``PRAGMA journal_mode = WAL``, retried with backoff while the file is busy.

    busy_timeout does not cover this pragma. Switching a rollback-journal file
    (every new file) to WAL rewrites the header's version bytes
    (sqlite3BtreeSetVersion): a read transaction first, to look at them, then
    an upgrade to a write transaction. SQLite runs the busy handler only while
    a connection holds no transaction, so the upgrade never waits: when another
    connection holds the write lock (another process in the middle of the same
    switch) it fails at once with SQLITE_BUSY, "database is locked" — waiting
    while holding the read lock could deadlock. So when processes open a new
    file together, all but the first could fail. A retry starts from no lock;
    once the first switch is committed the file is WAL and the pragma is a
    no-op. Every wait is bounded by ``deadline``; then the last error is raised.
    """
    delay = 0.002
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL").fetchall()
            return
        except sqlite3.OperationalError as exc:
            remaining = deadline - time.monotonic()
            if not is_sqlite_busy(exc) or remaining <= 0:
                raise
        # Jitter so that processes which collided do not retry in lockstep.
        time.sleep(min(remaining, delay * random.uniform(0.5, 1.5)))
        delay = min(delay * 2, 0.1)


def is_sqlite_busy(exc: sqlite3.Error) -> bool:
    """Whether exc is SQLITE_BUSY/SQLITE_LOCKED (any extended code): another lock holder."""
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int):
        return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    return "locked" in str(exc).lower()


async def migrate(url: str) -> int:
    """Create or upgrade the schema behind ``url``; return its version.

    Raises UsageError for a bad URL and StorageUnavailable when the database
    cannot be reached.
    """
    target = parse_store_url(url)
    if target.backend == "postgresql":
        conn = await _pg_connect(url)
        try:
            version, _ = await migrate_postgres(conn)
            return version
        finally:
            await conn.close()
    if target.backend == "sqlite":
        return await asyncio.to_thread(_migrate_sqlite_file, target.target)
    os.makedirs(target.target, exist_ok=True)
    return 0  # JSON Lines files have no schema


def _migrate_sqlite_file(path: str) -> int:
    try:
        conn = connect_sqlite(path)
    except sqlite3.Error as exc:
        raise StorageUnavailable(f"cannot open SQLite database {path}: {exc}") from exc
    try:
        return migrate_sqlite(conn)[0]
    finally:
        conn.close()


async def schema_status(url: str) -> dict[str, Any]:
    """{"backend", "version", "latest", "pending": [versions not applied yet]}."""
    target = parse_store_url(url)
    if target.backend == "jsonl":
        return {"backend": "jsonl", "version": 0, "latest": 0, "pending": []}
    dialect = "postgres" if target.backend == "postgresql" else "sqlite"
    if target.backend == "postgresql":
        conn = await _pg_connect(url)
        try:
            exists = await conn.fetchval("SELECT to_regclass('shadowproxy_schema') IS NOT NULL")
            version = (
                await conn.fetchval("SELECT coalesce(max(version), 0) FROM shadowproxy_schema")
                if exists
                else 0
            )
        finally:
            await conn.close()
    else:
        version = await asyncio.to_thread(_sqlite_version, target.target)
    pending = [m.version for m in migrations(dialect) if m.version > version]
    return {
        "backend": target.backend,
        "version": int(version),
        "latest": latest_version(dialect),
        "pending": pending,
    }


def _sqlite_version(path: str) -> int:
    if not os.path.exists(path):
        return 0
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)
    try:
        row = conn.execute(
            "SELECT name FROM sqlite_master WHERE type='table' AND name='shadowproxy_schema'"
        ).fetchone()
        if row is None:
            return 0
        return int(
            conn.execute("SELECT coalesce(max(version), 0) FROM shadowproxy_schema").fetchone()[0]
        )
    finally:
        conn.close()


async def _pg_connect(url: str) -> asyncpg.Connection:
    try:
        return await asyncpg.connect(url, timeout=CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise StorageUnavailable(f"cannot connect to {display_url(url)}: {exc}") from exc
