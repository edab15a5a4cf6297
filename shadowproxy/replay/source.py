"""Recorded requests for `replay`, paged from the store: one per request id, oldest first.

Each page is a keyset query (``id > last``), so memory holds one page whatever
the table size. Requests that already have a pair under the replay name are
skipped, which makes an interrupted replay resumable.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson

from shadowproxy.base.errors import StorageUnavailable, UsageError
from shadowproxy.report.query_jsonl import iter_records
from shadowproxy.report.query_sqlite import iso_utc
from shadowproxy.storage.urls import parse_store_url

PAGE = 500

_COLUMNS = (
    "s.id, s.request_id, s.method, s.path, s.query, s.request_headers, s.request_body, "
    "s.primary_upstream, s.primary_status, s.primary_latency_ms, s.primary_body"
)


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    request_id: str
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: str | None
    primary_upstream: str
    primary_status: int | None
    primary_latency_ms: float | None
    primary_body: str | None


def _pages_query(p: list[str]) -> str:
    """The page query with placeholders p = [route, since, last_id, name, page]."""
    route, since, last, name, page = p
    return f"""
SELECT {_COLUMNS} FROM shadow_log s
WHERE s.route = {route} AND s.ts >= {since} AND s.id > {last} AND s.shadow_upstream <> {name}
  AND NOT EXISTS (SELECT 1 FROM shadow_log o
                  WHERE o.request_id = s.request_id AND o.id < s.id AND o.shadow_upstream <> {name})
  AND NOT EXISTS (SELECT 1 FROM shadow_log d
                  WHERE d.request_id = s.request_id AND d.shadow_upstream = {name})
ORDER BY s.id LIMIT {page}
"""


def _request(row: Any, headers: Any) -> RecordedRequest:
    if isinstance(headers, str | bytes):
        headers = orjson.loads(headers)
    return RecordedRequest(
        request_id=str(row[1]),
        method=str(row[2]),
        path=str(row[3]),
        query=str(row[4] or ""),
        headers={str(k): str(v) for k, v in (headers or {}).items()},
        body=row[6],
        primary_upstream=str(row[7]),
        primary_status=row[8],
        primary_latency_ms=row[9],
        primary_body=row[10],
    )


async def _postgres(
    dsn: str, route: str, since_ts: float, name: str
) -> AsyncGenerator[RecordedRequest, None]:
    try:
        conn = await asyncpg.connect(dsn, timeout=10)
    except (OSError, asyncpg.PostgresError) as exc:
        raise StorageUnavailable(f"cannot reach PostgreSQL: {exc}") from exc
    query = _pages_query(["$1", "$2", "$3", "$4", "$5"])
    since = datetime.fromtimestamp(since_ts, UTC)
    try:
        last = 0
        while True:
            rows = await conn.fetch(query, route, since, last, name, PAGE)
            for row in rows:
                yield _request(row, row[5])
            if len(rows) < PAGE:
                return
            last = rows[-1][0]
    finally:
        await conn.close()


def _fetch(conn: sqlite3.Connection, query: str, args: tuple[Any, ...]) -> list[Any]:
    try:
        return conn.execute(query, args).fetchall()
    except sqlite3.Error as exc:
        raise StorageUnavailable(f"cannot read SQLite records: {exc}") from exc


async def _sqlite(
    path: str, route: str, since_ts: float, name: str
) -> AsyncGenerator[RecordedRequest, None]:
    conn = sqlite3.connect(path, timeout=5.0, check_same_thread=False)
    query = _pages_query(["?1", "?2", "?3", "?4", "?5"])
    since = iso_utc(since_ts)
    try:
        last = 0
        while True:
            rows = await asyncio.to_thread(_fetch, conn, query, (route, since, last, name, PAGE))
            for row in rows:
                yield _request(row, row[5])
            if len(rows) < PAGE:
                return
            last = rows[-1][0]
    finally:
        conn.close()


async def _jsonl(
    directory: str, route: str, since_ts: float, name: str
) -> AsyncGenerator[RecordedRequest, None]:
    """Two streaming passes; memory holds the request ids seen (no index to ask instead)."""
    seen = {
        str(r.get("request_id"))
        for r in iter_records(directory, since_ts)
        if r.get("shadow_upstream") == name
    }
    for r in iter_records(directory, since_ts):
        request_id = str(r.get("request_id"))
        if r.get("route") != route or r.get("shadow_upstream") == name or request_id in seen:
            continue
        seen.add(request_id)
        values = [None, request_id] + [
            r.get(key)
            for key in (
                "method",
                "path",
                "query",
                "request_headers",
                "request_body",
                "primary_upstream",
                "primary_status",
                "primary_latency_ms",
                "primary_body",
            )
        ]
        yield _request(values, values[5])


def recorded_requests(
    url: str, route: str, since_ts: float, name: str
) -> AsyncGenerator[RecordedRequest, None]:
    where = parse_store_url(url)
    if where.backend == "postgresql":
        return _postgres(where.target, route, since_ts, name)
    if where.backend == "sqlite":
        if not os.path.exists(where.target):
            raise UsageError(f"no SQLite database at {where.target!r}")
        return _sqlite(where.target, route, since_ts, name)
    return _jsonl(where.target, route, since_ts, name)
