"""Report aggregation in SQLite: counts, means and percentiles computed by SQLite.

SQLite has no percentile function; each percentile reads at most two sorted rows
at an offset, so memory stays flat. ``ts`` is ISO-8601 UTC text, which sorts
like time, so the window is a string comparison on the (route, shadow_upstream, ts) index.
"""

from __future__ import annotations

import math
import os
import sqlite3
from datetime import UTC, datetime
from typing import Any

from shadowproxy.base.errors import StorageUnavailable, UsageError
from shadowproxy.report.confusion import fold_confusion
from shadowproxy.report.model import (
    INPUT_CHARS,
    LATENCY_EDGES_MS,
    TOP_DISAGREEMENTS,
    Aggregate,
    Disagreement,
    HourBucket,
    Percentiles,
)

_WINDOW = "route = ? AND shadow_upstream = ? AND ts >= ?"
_BOTH_SCORED = "primary_score IS NOT NULL AND shadow_score IS NOT NULL"

_TOTALS = f"""
SELECT count(*), count(agreement),
       coalesce(sum(agreement = 1), 0),
       coalesce(sum(primary_status IS NULL OR primary_status >= 500), 0),
       coalesce(sum({_BOTH_SCORED}), 0),
       avg(CASE WHEN {_BOTH_SCORED} THEN primary_score END),
       avg(CASE WHEN {_BOTH_SCORED} THEN shadow_score END)
FROM shadow_log WHERE {_WINDOW}
"""


def _bin_expression(column: str) -> str:
    cases = " ".join(f"WHEN {column} < {edge} THEN {i}" for i, edge in enumerate(LATENCY_EDGES_MS))
    return f"CASE {cases} ELSE {len(LATENCY_EDGES_MS)} END"


def iso_utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="microseconds")


def _hour_ts(prefix: str) -> float:
    return datetime.strptime(prefix, "%Y-%m-%dT%H").replace(tzinfo=UTC).timestamp()


class SqliteSource:
    backend = "sqlite"

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    @classmethod
    def connect(cls, path: str) -> SqliteSource:
        if not os.path.exists(path):
            raise UsageError(f"no SQLite database at {path!r}")
        conn = sqlite3.connect(path, timeout=5.0)
        try:
            conn.execute("SELECT 1 FROM shadow_log LIMIT 1")
        except sqlite3.Error as exc:
            conn.close()
            raise StorageUnavailable(f"cannot read SQLite database {path!r}: {exc}") from exc
        return cls(conn)

    async def close(self) -> None:
        self._conn.close()

    def _all(self, query: str, *args: Any) -> list[tuple[Any, ...]]:
        return self._conn.execute(query, args).fetchall()

    async def shadows(self, route: str, since_ts: float) -> list[str]:
        rows = self._all(
            "SELECT DISTINCT shadow_upstream FROM shadow_log WHERE route = ? AND ts >= ? ORDER BY 1",
            route,
            iso_utc(since_ts),
        )
        return [str(row[0]) for row in rows]

    def _percentiles(self, window: tuple[str, str, str], side: str) -> Percentiles:
        where = f"{_WINDOW} AND {side}_status IS NOT NULL AND {side}_latency_ms IS NOT NULL"
        (n,) = self._all(f"SELECT count(*) FROM shadow_log WHERE {where}", *window)[0]
        if n == 0:
            return Percentiles()
        values: list[float] = []
        for fraction in (0.5, 0.9, 0.99):
            position = fraction * (n - 1)
            lower = math.floor(position)
            rows = self._all(
                f"SELECT {side}_latency_ms FROM shadow_log WHERE {where} "
                f"ORDER BY {side}_latency_ms LIMIT 2 OFFSET ?",
                *window,
                lower,
            )
            low = float(rows[0][0])
            high = float(rows[1][0]) if len(rows) > 1 else low
            values.append(low + (high - low) * (position - lower))
        return Percentiles(*values)

    def _histogram(self, window: tuple[str, str, str], side: str) -> tuple[int, ...]:
        counts = [0] * (len(LATENCY_EDGES_MS) + 1)
        latency = f"{side}_latency_ms"
        rows = self._all(
            f"SELECT {_bin_expression(latency)}, count(*) FROM shadow_log WHERE {_WINDOW} "
            f"AND {side}_status IS NOT NULL AND {latency} IS NOT NULL GROUP BY 1",
            *window,
        )
        for bin_index, count in rows:
            counts[bin_index] = count
        return tuple(counts)

    async def aggregate(self, route: str, shadow: str, since_ts: float) -> Aggregate:
        window = (route, shadow, iso_utc(since_ts))
        samples, comparable, agreed, primary_errors, scored, p_mean, s_mean = self._all(
            _TOTALS, *window
        )[0]
        primary = self._all(
            f"SELECT primary_upstream FROM shadow_log WHERE {_WINDOW} ORDER BY ts DESC, id DESC LIMIT 1",
            *window,
        )
        errors = self._all(
            f"SELECT shadow_error, count(*) FROM shadow_log WHERE {_WINDOW} "
            "AND shadow_error IS NOT NULL GROUP BY 1",
            *window,
        )
        hourly = self._all(
            f"SELECT substr(ts, 1, 13), count(*), count(agreement), coalesce(sum(agreement = 1), 0) "
            f"FROM shadow_log WHERE {_WINDOW} GROUP BY 1 ORDER BY 1",
            *window,
        )
        cells = self._all(
            f"SELECT primary_label, shadow_label, count(*) FROM shadow_log WHERE {_WINDOW} "
            "AND agreement IS NOT NULL GROUP BY 1, 2",
            *window,
        )
        disagreements = self._all(
            f"SELECT request_id, ts, substr(request_body, 1, {INPUT_CHARS}), primary_label, "
            f"shadow_label FROM shadow_log WHERE {_WINDOW} AND agreement = 0 "
            f"ORDER BY ts DESC, id DESC LIMIT {TOP_DISAGREEMENTS}",
            *window,
        )
        return Aggregate(
            route=route,
            shadow=shadow,
            primary=primary[0][0] if primary else None,
            samples=samples,
            comparable=comparable,
            agreed=agreed,
            primary_latency=self._percentiles(window, "primary"),
            shadow_latency=self._percentiles(window, "shadow"),
            shadow_errors={str(kind): int(n) for kind, n in errors},
            primary_errors=primary_errors,
            scored_pairs=scored,
            primary_score_mean=p_mean,
            shadow_score_mean=s_mean,
            confusion=fold_confusion(cells),
            top_disagreements=tuple(
                Disagreement(rid, datetime.fromisoformat(ts).timestamp(), body, p, s)
                for rid, ts, body, p, s in disagreements
            ),
            hourly=tuple(HourBucket(_hour_ts(h), n, c, a) for h, n, c, a in hourly),
            primary_histogram=self._histogram(window, "primary"),
            shadow_histogram=self._histogram(window, "shadow"),
        )
