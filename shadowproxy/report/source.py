"""Where the report reads records from: a tiny protocol and the URL dispatch."""

from __future__ import annotations

from typing import Protocol

from shadowproxy.report.model import Aggregate
from shadowproxy.storage.urls import parse_store_url


class RecordSource(Protocol):
    backend: str

    async def shadows(self, route: str, since_ts: float) -> list[str]:
        """Shadow upstreams with at least one record for the route since ``since_ts``."""

    async def aggregate(self, route: str, shadow: str, since_ts: float) -> Aggregate: ...

    async def close(self) -> None: ...


async def open_source(url: str) -> RecordSource:
    """Open the records behind a storage URL (postgresql://, sqlite:///, jsonl:///)."""
    where = parse_store_url(url)
    if where.backend == "postgresql":
        from shadowproxy.report.query_postgres import PostgresSource

        return await PostgresSource.connect(where.target)
    if where.backend == "sqlite":
        from shadowproxy.report.query_sqlite import SqliteSource

        return SqliteSource.connect(where.target)
    from shadowproxy.report.query_jsonl import JsonlSource

    return JsonlSource(where.target)
