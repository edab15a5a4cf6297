"""Report aggregation in PostgreSQL: every number is computed by the server.

Only aggregates cross the wire (a few hundred values per (route, shadow)), so a
report over millions of rows is as fast as the scans and small in memory. The
queries use the (route, shadow_upstream, ts) index.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import asyncpg

from shadowproxy.base.errors import StorageUnavailable
from shadowproxy.report.confusion import TOP_CLASSES, fold_confusion
from shadowproxy.report.model import (
    INPUT_CHARS,
    LATENCY_EDGES_MS,
    OTHER_LABEL,
    TOP_DISAGREEMENTS,
    Aggregate,
    Disagreement,
    HourBucket,
    Percentiles,
)

_WINDOW = "route = $1 AND shadow_upstream = $2 AND ts >= $3"


_TOTALS = f"""
SELECT count(*) FILTER (WHERE primary_status IS NULL OR primary_status >= 500) AS primary_errors,
       percentile_cont(ARRAY[0.5, 0.9, 0.99]) WITHIN GROUP (ORDER BY primary_latency_ms)
           FILTER (WHERE primary_status IS NOT NULL) AS primary_p,
       percentile_cont(ARRAY[0.5, 0.9, 0.99]) WITHIN GROUP (ORDER BY shadow_latency_ms)
           FILTER (WHERE shadow_status IS NOT NULL) AS shadow_p,
       count(*) FILTER (WHERE primary_score IS NOT NULL AND shadow_score IS NOT NULL) AS scored,
       avg(primary_score) FILTER (WHERE primary_score IS NOT NULL AND shadow_score IS NOT NULL)
           AS primary_mean,
       avg(shadow_score) FILTER (WHERE primary_score IS NOT NULL AND shadow_score IS NOT NULL)
           AS shadow_mean
FROM shadow_log WHERE {_WINDOW}
"""

# Counts by (hour, primary latency bin, shadow latency bin, error kind) in one scan: a few
# hundred groups that add up to the samples, the hourly agreement, the histograms, the errors.
_GROUPED = f"""
SELECT extract(epoch FROM date_bin('1 hour', ts, TIMESTAMPTZ '2000-01-01 00:00:00+00'))::float8
           AS hour,
       CASE WHEN primary_status IS NOT NULL THEN width_bucket(primary_latency_ms, $4::float8[])
       END AS primary_bin,
       CASE WHEN shadow_status IS NOT NULL THEN width_bucket(shadow_latency_ms, $4::float8[])
       END AS shadow_bin,
       shadow_error,
       count(*) AS samples, count(agreement) AS comparable,
       count(*) FILTER (WHERE agreement) AS agreed
FROM shadow_log WHERE {_WINDOW} GROUP BY 1, 2, 3, 4
"""

# The primary of the most recent pair (after a promotion the window may hold both).
_PRIMARY = f"SELECT primary_upstream FROM shadow_log WHERE {_WINDOW} ORDER BY ts DESC LIMIT 1"

# Label pairs counted once; the top labels (both sides) kept, the rest folded into (other).
_CONFUSION = f"""
WITH cells AS (
    SELECT primary_label AS p, shadow_label AS s, count(*) AS n FROM shadow_log
    WHERE {_WINDOW} AND agreement IS NOT NULL GROUP BY 1, 2
), top_labels AS (
    SELECT label FROM (SELECT p AS label, n FROM cells UNION ALL SELECT s, n FROM cells) AS sides
    WHERE label IS NOT NULL
    GROUP BY label ORDER BY sum(n) DESC, label COLLATE "C" LIMIT $4
)
SELECT CASE WHEN p IS NULL OR p IN (SELECT label FROM top_labels) THEN p ELSE '{OTHER_LABEL}' END,
       CASE WHEN s IS NULL OR s IN (SELECT label FROM top_labels) THEN s ELSE '{OTHER_LABEL}' END,
       sum(n)::bigint
FROM cells GROUP BY 1, 2
"""

_DISAGREEMENTS = f"""
SELECT request_id, extract(epoch FROM ts)::float8 AS ts, left(request_body, {INPUT_CHARS}) AS input,
       primary_label, shadow_label
FROM shadow_log WHERE {_WINDOW} AND agreement = false
ORDER BY ts DESC, id DESC LIMIT {TOP_DISAGREEMENTS}
"""

# Distinct shadows of a route by skipping through the index, not by scanning its rows.
_SHADOWS = """
WITH RECURSIVE seen(v) AS (
    SELECT min(shadow_upstream) FROM shadow_log WHERE route = $1
    UNION ALL
    SELECT (SELECT min(shadow_upstream) FROM shadow_log WHERE route = $1 AND shadow_upstream > v)
    FROM seen WHERE v IS NOT NULL
)
SELECT v FROM seen
WHERE v IS NOT NULL AND EXISTS (
    SELECT 1 FROM shadow_log WHERE route = $1 AND shadow_upstream = v AND ts >= $2
)
ORDER BY v
"""


def _percentiles(values: list[float] | None) -> Percentiles:
    if not values:
        return Percentiles()
    return Percentiles(p50=values[0], p90=values[1], p99=values[2])


def _since(since_ts: float) -> datetime:
    return datetime.fromtimestamp(since_ts, UTC)


class PostgresSource:
    backend = "postgresql"

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @classmethod
    async def connect(cls, url: str) -> PostgresSource:
        try:
            pool = await asyncpg.create_pool(url, min_size=1, max_size=4, timeout=10)
        except (OSError, asyncpg.PostgresError) as exc:
            raise StorageUnavailable(f"cannot reach PostgreSQL: {exc}") from exc
        return cls(pool)

    async def close(self) -> None:
        await self._pool.close()

    async def shadows(self, route: str, since_ts: float) -> list[str]:
        rows = await self._pool.fetch(_SHADOWS, route, _since(since_ts))
        return [str(row["v"]) for row in rows]

    async def _fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        return list(await self._pool.fetch(query, *args))

    async def aggregate(self, route: str, shadow: str, since_ts: float) -> Aggregate:
        window = (route, shadow, _since(since_ts))
        edges = [float(edge) for edge in LATENCY_EDGES_MS]
        # Independent scans run side by side on the pool's connections.
        totals, grouped, primary, disagreements, cells = await asyncio.gather(
            self._fetch(_TOTALS, *window),
            self._fetch(_GROUPED, *window, edges),
            self._fetch(_PRIMARY, *window),
            self._fetch(_DISAGREEMENTS, *window),
            self._fetch(_CONFUSION, *window, TOP_CLASSES),
        )
        t = totals[0]
        hours: dict[float, list[int]] = {}
        errors: dict[str, int] = {}
        primary_hist = [0] * (len(edges) + 1)
        shadow_hist = [0] * (len(edges) + 1)
        for g in grouped:
            n = g["samples"]
            counts = hours.setdefault(g["hour"], [0, 0, 0])
            counts[0] += n
            counts[1] += g["comparable"]
            counts[2] += g["agreed"]
            if g["shadow_error"] is not None:
                errors[g["shadow_error"]] = errors.get(g["shadow_error"], 0) + n
            # width_bucket is null for a null latency: no response time to count
            if g["primary_bin"] is not None:
                primary_hist[g["primary_bin"]] += n
            if g["shadow_bin"] is not None:
                shadow_hist[g["shadow_bin"]] += n
        hourly = tuple(HourBucket(hour, *counts) for hour, counts in sorted(hours.items()))
        return Aggregate(
            route=route,
            shadow=shadow,
            primary=primary[0][0] if primary else None,
            samples=sum(h.samples for h in hourly),
            comparable=sum(h.comparable for h in hourly),
            agreed=sum(h.agreed for h in hourly),
            primary_latency=_percentiles(t["primary_p"]),
            shadow_latency=_percentiles(t["shadow_p"]),
            shadow_errors=errors,
            primary_errors=t["primary_errors"],
            scored_pairs=t["scored"],
            primary_score_mean=t["primary_mean"],
            shadow_score_mean=t["shadow_mean"],
            confusion=fold_confusion((row[0], row[1], row[2]) for row in cells),
            top_disagreements=tuple(
                Disagreement(
                    request_id=row["request_id"],
                    ts=row["ts"],
                    input=row["input"],
                    primary_label=row["primary_label"],
                    shadow_label=row["shadow_label"],
                )
                for row in disagreements
            ),
            hourly=hourly,
            primary_histogram=tuple(primary_hist),
            shadow_histogram=tuple(shadow_hist),
        )
