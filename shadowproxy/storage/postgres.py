"""PostgreSQL store: asyncpg pool, batches by COPY into a staging table then one INSERT.

``INSERT … SELECT … ON CONFLICT (request_id, shadow_upstream) DO NOTHING`` makes a
batch safe to send twice (a COMMIT whose acknowledgement was lost, a spool
replay). Connection-level failures leave this module as StorageUnavailable;
a record PostgreSQL refuses for its content is isolated by bisection and
reported in RecordsRejected, the rest of its batch is stored.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson

from shadowproxy.base.errors import StorageUnavailable
from shadowproxy.storage.base import PROMOTION_WINDOW_S, PromotionRecord
from shadowproxy.storage.batch import write_isolating
from shadowproxy.storage.migrate import migrate_postgres
from shadowproxy.storage.record import RECORD_COLUMNS, Record
from shadowproxy.storage.urls import display_url

_COLUMNS = ", ".join(RECORD_COLUMNS)
# Temp tables live per connection; ON COMMIT DELETE ROWS empties it after each batch.
_STAGE = "shadow_log_stage"
_CREATE_STAGE = (
    f"CREATE TEMP TABLE IF NOT EXISTS {_STAGE} ON COMMIT DELETE ROWS "
    f"AS SELECT {_COLUMNS} FROM shadow_log WITH NO DATA"
)
_INSERT = (
    f"INSERT INTO shadow_log ({_COLUMNS}) SELECT {_COLUMNS} FROM {_STAGE} "
    "ON CONFLICT (request_id, shadow_upstream) DO NOTHING"
)
_DELETE_OLD = (
    "DELETE FROM shadow_log WHERE id IN "
    "(SELECT id FROM shadow_log WHERE ts < $1 ORDER BY ts LIMIT $2)"
)
_INSERT_PROMOTION = (
    "INSERT INTO shadow_promotions (ts, route, previous_primary, new_primary, config_sha, instance)"
    " SELECT $1::timestamptz, $2, $3, $4, $5, $6 WHERE NOT EXISTS ("
    " SELECT 1 FROM shadow_promotions WHERE route = $2 AND previous_primary = $3"
    " AND new_primary = $4 AND config_sha = $5"
    " AND ts BETWEEN $1::timestamptz - make_interval(secs => $7::float8)"
    " AND $1::timestamptz + make_interval(secs => $7::float8))"
)
# Replicas recording the same promotion at once take turns, so exactly one row is written.
_PROMOTION_LOCK = "SELECT pg_advisory_xact_lock(hashtext('shadowproxy:promotion:' || $1))"

# Errors caused by a record's content: retrying the same record can never succeed.
_CONTENT_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.DataError,
    asyncpg.IntegrityConstraintViolationError,
    asyncpg.ProgramLimitExceededError,
    ValueError,
    OverflowError,
    TypeError,
    UnicodeError,
)
# Everything about reaching the server (down, restarting, failover, timeouts, lost socket).
_UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
)


def _is_content_error(exc: BaseException) -> bool:
    return isinstance(exc, _CONTENT_ERRORS)


def _json(value: Any) -> str:
    return orjson.dumps(value, default=str).decode()


def _ts(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=UTC)


def _row(r: Record) -> tuple[Any, ...]:
    return (
        r.request_id, _ts(r.ts), r.route, r.method, r.path, r.query,
        _json(r.request_headers), r.request_body,
        r.primary_upstream, r.primary_status, r.primary_latency_ms, r.primary_body,
        r.primary_label, r.primary_score,
        r.shadow_upstream, r.shadow_status, r.shadow_latency_ms, r.shadow_body,
        r.shadow_label, r.shadow_score, r.shadow_error, r.agreement,
        _json(r.diff), r.instance, r.config_sha,
    )  # fmt: skip


class PostgresStore:
    backend = "postgresql"

    def __init__(self, url: str, *, max_connections: int = 4, timeout_s: float = 10.0) -> None:
        self._url = url
        self.location = display_url(url)
        self._max_connections = max_connections
        self._timeout = timeout_s
        self._pool: asyncpg.Pool | None = None
        self._open_lock = asyncio.Lock()

    async def open(self) -> None:
        """Migrate and create the pool. Idempotent; retry after StorageUnavailable."""
        async with self._open_lock:
            if self._pool is not None:
                return
            try:
                conn = await asyncpg.connect(self._url, timeout=self._timeout)
                try:
                    await migrate_postgres(conn)
                finally:
                    await conn.close()
                self._pool = await asyncpg.create_pool(
                    self._url,
                    min_size=1,
                    max_size=self._max_connections,
                    timeout=self._timeout,
                    command_timeout=self._timeout,
                )
            except _UNAVAILABLE_ERRORS as exc:
                raise StorageUnavailable(f"{display_url(self._url)}: {exc!r}") from exc

    async def write(self, records: Sequence[Record]) -> None:
        await write_isolating(self._write_batch, records, _is_content_error)

    async def _write_batch(self, records: Sequence[Record]) -> None:
        rows = [_row(r) for r in records]  # encoding errors are content errors
        pool = await self._ready_pool()
        try:
            async with pool.acquire(timeout=self._timeout) as conn, conn.transaction():
                await conn.execute(_CREATE_STAGE)
                await conn.copy_records_to_table(_STAGE, records=rows, columns=RECORD_COLUMNS)
                await conn.execute(_INSERT)
        except _CONTENT_ERRORS:
            raise
        except _UNAVAILABLE_ERRORS as exc:
            raise self._unavailable(pool, exc) from exc

    async def record_promotion(self, promotion: PromotionRecord) -> bool:
        p = promotion
        pool = await self._ready_pool()
        try:
            async with pool.acquire(timeout=self._timeout) as conn, conn.transaction():
                await conn.execute(_PROMOTION_LOCK, p.route)
                status = await conn.execute(
                    _INSERT_PROMOTION,
                    _ts(p.ts), p.route, p.previous_primary, p.new_primary, p.config_sha, p.instance,
                    float(PROMOTION_WINDOW_S),
                )  # fmt: skip
        except _UNAVAILABLE_ERRORS as exc:
            raise self._unavailable(pool, exc) from exc
        return str(status).endswith(" 1")

    async def delete_older_than(self, cutoff_ts: float, batch_size: int) -> int:
        status = await self._execute(_DELETE_OLD, _ts(cutoff_ts), batch_size)
        return int(status.rsplit(" ", 1)[-1])

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            await asyncio.wait_for(pool.close(), timeout=self._timeout)
        except TimeoutError:
            pool.terminate()

    async def _ready_pool(self) -> asyncpg.Pool:
        if self._pool is None:
            await self.open()
        assert self._pool is not None
        return self._pool

    async def _execute(self, query: str, *args: Any) -> str:
        pool = await self._ready_pool()
        try:
            async with pool.acquire(timeout=self._timeout) as conn:
                return str(await conn.execute(query, *args))
        except _UNAVAILABLE_ERRORS as exc:
            raise self._unavailable(pool, exc) from exc

    def _unavailable(self, pool: asyncpg.Pool, exc: BaseException) -> StorageUnavailable:
        """Drop the pool after a connection-level failure: the next call reconnects afresh.

        Connections that lived through the failure (a cancelled COMMIT, a half-open
        socket) can hang a pool; a new pool costs one connect and a no-op migration.
        """
        if self._pool is pool:
            self._pool = None
            pool.terminate()
        return StorageUnavailable(f"{display_url(self._url)}: {exc!r}")
