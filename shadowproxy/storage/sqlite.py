"""SQLite store, the embedded default: WAL mode, batched writes in a worker thread.

One connection, used by one thread at a time (a lock serialises the to_thread
calls). ``INSERT OR IGNORE`` on the (request_id, shadow_upstream) unique index
makes re-sent batches harmless. When another process holds the write lock,
the busy timeout waits and then the batch is retried with backoff — in the
worker thread, never on the event loop — before StorageUnavailable.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import orjson

from shadowproxy.base.errors import StorageUnavailable
from shadowproxy.storage.base import PROMOTION_WINDOW_S, PromotionRecord
from shadowproxy.storage.batch import write_isolating
from shadowproxy.storage.codec import iso_ts
from shadowproxy.storage.migrate import connect_sqlite, migrate_sqlite, rollback_sqlite
from shadowproxy.storage.record import RECORD_COLUMNS, Record

T = TypeVar("T")

_INSERT = (
    f"INSERT OR IGNORE INTO shadow_log ({', '.join(RECORD_COLUMNS)}) "
    f"VALUES ({', '.join('?' for _ in RECORD_COLUMNS)})"
)
_DELETE_OLD = (
    "DELETE FROM shadow_log WHERE id IN "
    "(SELECT id FROM shadow_log WHERE ts < ? ORDER BY ts LIMIT ?)"
)
_INSERT_PROMOTION = (
    "INSERT INTO shadow_promotions (ts, route, previous_primary, new_primary, config_sha, instance)"
    " SELECT ?, ?, ?, ?, ?, ? WHERE NOT EXISTS ("
    " SELECT 1 FROM shadow_promotions WHERE route = ? AND previous_primary = ?"
    " AND new_primary = ? AND config_sha = ? AND ts BETWEEN ? AND ?)"
)
LOCKED_RETRIES = 5


def _json(value: Any) -> str:
    return orjson.dumps(value, default=str).decode()


def _row(r: Record) -> tuple[Any, ...]:
    return (
        r.request_id, iso_ts(r.ts), r.route, r.method, r.path, r.query,
        _json(r.request_headers), r.request_body,
        r.primary_upstream, r.primary_status, r.primary_latency_ms, r.primary_body,
        r.primary_label, r.primary_score,
        r.shadow_upstream, r.shadow_status, r.shadow_latency_ms, r.shadow_body,
        r.shadow_label, r.shadow_score, r.shadow_error,
        None if r.agreement is None else int(r.agreement),
        _json(r.diff), r.instance, r.config_sha,
    )  # fmt: skip


def _is_locked(exc: sqlite3.Error) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc).lower()


def _is_content_error(exc: BaseException) -> bool:
    return isinstance(
        exc,
        sqlite3.IntegrityError | sqlite3.DataError | OverflowError | ValueError | TypeError,
    )


class SqliteStore:
    backend = "sqlite"

    def __init__(self, path: str, *, busy_timeout_s: float = 5.0) -> None:
        self.path = path
        self.location = os.path.abspath(path)
        self._busy_timeout_s = busy_timeout_s
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    async def open(self) -> None:
        await asyncio.to_thread(self._open_sync)

    def _open_sync(self) -> None:
        with self._lock:
            if self._conn is not None:
                return
            try:
                # Waits for other processes (WAL switch, then migrations) up to busy_timeout_s.
                conn = connect_sqlite(self.path, busy_timeout_s=self._busy_timeout_s)
                try:
                    self._retry_locked(lambda: migrate_sqlite(conn))
                except BaseException:
                    conn.close()
                    raise
            except (sqlite3.Error, OSError) as exc:
                raise StorageUnavailable(f"SQLite {self.path}: {exc}") from exc
            self._conn = conn

    async def write(self, records: Sequence[Record]) -> None:
        await write_isolating(self._write_batch, records, _is_content_error)

    async def _write_batch(self, records: Sequence[Record]) -> None:
        rows = [_row(r) for r in records]
        await self._run(lambda conn: self._insert(conn, rows))

    @staticmethod
    def _insert(conn: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(_INSERT, rows)
            conn.execute("COMMIT")
        except BaseException:
            rollback_sqlite(conn)
            raise

    async def record_promotion(self, promotion: PromotionRecord) -> bool:
        p = promotion
        row = (iso_ts(p.ts), p.route, p.previous_primary, p.new_primary, p.config_sha, p.instance)
        same = (p.route, p.previous_primary, p.new_primary, p.config_sha)
        window = (iso_ts(p.ts - PROMOTION_WINDOW_S), iso_ts(p.ts + PROMOTION_WINDOW_S))

        def insert(conn: sqlite3.Connection) -> bool:
            # One statement: SQLite's write lock makes the check and the insert atomic.
            return conn.execute(_INSERT_PROMOTION, row + same + window).rowcount == 1

        return await self._run(insert)

    async def delete_older_than(self, cutoff_ts: float, batch_size: int) -> int:
        cutoff = iso_ts(cutoff_ts)
        return await self._run(
            lambda conn: conn.execute(_DELETE_OLD, (cutoff, batch_size)).rowcount
        )

    async def close(self) -> None:
        await asyncio.to_thread(self._close_sync)

    def _close_sync(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.close()

    async def _run(self, job: Callable[[sqlite3.Connection], T]) -> T:
        return await asyncio.to_thread(self._run_sync, job)

    def _run_sync(self, job: Callable[[sqlite3.Connection], T]) -> T:
        if self._conn is None:
            self._open_sync()
        with self._lock:
            conn = self._conn
            if conn is None:
                raise StorageUnavailable(f"SQLite {self.path}: closed")
            try:
                return self._retry_locked(lambda: job(conn))
            except sqlite3.Error as exc:
                if _is_content_error(exc):
                    raise
                raise StorageUnavailable(f"SQLite {self.path}: {exc}") from exc
            except OSError as exc:
                raise StorageUnavailable(f"SQLite {self.path}: {exc}") from exc

    @staticmethod
    def _retry_locked(job: Callable[[], T]) -> T:
        """Run job; while the database is locked by another process, back off and retry."""
        delay = 0.05
        for attempt in range(LOCKED_RETRIES + 1):
            try:
                return job()
            except sqlite3.OperationalError as exc:
                if not _is_locked(exc) or attempt == LOCKED_RETRIES:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
        raise AssertionError("unreachable")
