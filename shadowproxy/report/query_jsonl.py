"""Report aggregation over JSON Lines files, streamed line by line.

Files are ``shadow_log-YYYY-MM-DD-<instance>.jsonl``; files dated before the
window's first day are not opened. One pass collects every shadow of the route.
Memory: two latency arrays of 8-byte floats per (route, shadow) for the exact
percentiles, plus label-pair counts; everything else is counters.
"""

from __future__ import annotations

import heapq
import os
import re
from array import array
from bisect import bisect_right
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from shadowproxy.base.errors import UsageError
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
from shadowproxy.report.stats import percentile_cont

_FILE = re.compile(r"^shadow_log-(\d{4}-\d{2}-\d{2})-.*\.jsonl$")


def record_files(directory: str, since_ts: float) -> list[str]:
    """The record files that may hold records at or after ``since_ts``, oldest first."""
    if not os.path.isdir(directory):
        raise UsageError(f"no JSON Lines directory at {directory!r}")
    first_day = datetime.fromtimestamp(since_ts, UTC).strftime("%Y-%m-%d")
    names = []
    for name in os.listdir(directory):
        match = _FILE.match(name)
        if match and match.group(1) >= first_day:
            names.append(name)
    return [os.path.join(directory, name) for name in sorted(names)]


def iter_records(directory: str, since_ts: float) -> Iterator[dict[str, Any]]:
    """Every record at or after ``since_ts``, ``ts`` as unix seconds; torn lines are skipped."""
    for path in record_files(directory, since_ts):
        with open(path, "rb") as handle:
            for line in handle:
                try:
                    row = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue
                if not isinstance(row, dict):
                    continue
                ts = row_ts(row.get("ts"))
                if ts is not None and ts >= since_ts:
                    row["ts"] = ts
                    yield row


def row_ts(value: Any) -> float | None:
    """Unix seconds from a record's ``ts``: ISO-8601 text (as stored) or a number."""
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value).timestamp()
        except ValueError:
            return None
    return None


def _percentiles(values: array[float]) -> Percentiles:
    ordered = sorted(values)
    return Percentiles(
        percentile_cont(ordered, 0.5), percentile_cont(ordered, 0.9), percentile_cont(ordered, 0.99)
    )


@dataclass
class _Accumulator:
    latest: tuple[float, str] | None = None  # (ts, primary upstream) of the newest pair
    samples: int = 0
    comparable: int = 0
    agreed: int = 0
    primary_errors: int = 0
    primary_latency: array[float] = field(default_factory=lambda: array("d"))
    shadow_latency: array[float] = field(default_factory=lambda: array("d"))
    shadow_errors: Counter[str] = field(default_factory=Counter)
    scored: int = 0
    primary_score_sum: float = 0.0
    shadow_score_sum: float = 0.0
    cells: Counter[tuple[str | None, str | None]] = field(default_factory=Counter)
    # min-heap of (ts, sequence, disagreement): the most recent ones survive
    disagreements: list[tuple[float, int, Disagreement]] = field(default_factory=list)
    hours: dict[float, list[int]] = field(default_factory=dict)

    def add(self, row: dict[str, Any]) -> None:
        self.samples += 1
        agreement = row.get("agreement")
        primary_status = row.get("primary_status")
        if primary_status is None or primary_status >= 500:
            self.primary_errors += 1
        if primary_status is not None and row.get("primary_latency_ms") is not None:
            self.primary_latency.append(float(row["primary_latency_ms"]))
        if row.get("shadow_status") is not None and row.get("shadow_latency_ms") is not None:
            self.shadow_latency.append(float(row["shadow_latency_ms"]))
        if row.get("shadow_error") is not None:
            self.shadow_errors[str(row["shadow_error"])] += 1
        p_score, s_score = row.get("primary_score"), row.get("shadow_score")
        if p_score is not None and s_score is not None:
            self.scored += 1
            self.primary_score_sum += float(p_score)
            self.shadow_score_sum += float(s_score)
        ts = float(row["ts"])
        if self.latest is None or ts >= self.latest[0]:
            self.latest = (ts, str(row.get("primary_upstream")))
        hour = self.hours.setdefault(ts - ts % 3600, [0, 0, 0])
        hour[0] += 1
        if agreement is not None:
            self.comparable += 1
            hour[1] += 1
            self.cells[(row.get("primary_label"), row.get("shadow_label"))] += 1
            if agreement:
                self.agreed += 1
                hour[2] += 1
            else:
                self._disagreement(ts, row)

    def _disagreement(self, ts: float, row: dict[str, Any]) -> None:
        body = row.get("request_body")
        item = Disagreement(
            request_id=str(row.get("request_id")),
            ts=ts,
            input=None if body is None else str(body)[:INPUT_CHARS],
            primary_label=row.get("primary_label"),
            shadow_label=row.get("shadow_label"),
        )
        entry = (ts, self.samples, item)
        if len(self.disagreements) < TOP_DISAGREEMENTS:
            heapq.heappush(self.disagreements, entry)
        else:
            heapq.heappushpop(self.disagreements, entry)

    def result(self, route: str, shadow: str) -> Aggregate:
        def histogram(values: array[float]) -> tuple[int, ...]:
            counts = [0] * (len(LATENCY_EDGES_MS) + 1)
            for value in values:
                counts[bisect_right(LATENCY_EDGES_MS, value)] += 1
            return tuple(counts)

        return Aggregate(
            route=route,
            shadow=shadow,
            primary=None if self.latest is None else self.latest[1],
            samples=self.samples,
            comparable=self.comparable,
            agreed=self.agreed,
            primary_latency=_percentiles(self.primary_latency),
            shadow_latency=_percentiles(self.shadow_latency),
            shadow_errors=dict(self.shadow_errors),
            primary_errors=self.primary_errors,
            scored_pairs=self.scored,
            primary_score_mean=self.primary_score_sum / self.scored if self.scored else None,
            shadow_score_mean=self.shadow_score_sum / self.scored if self.scored else None,
            confusion=fold_confusion((p, s, n) for (p, s), n in self.cells.items()),
            top_disagreements=tuple(
                item for _, _, item in sorted(self.disagreements, key=lambda e: (-e[0], -e[1]))
            ),
            hourly=tuple(HourBucket(h, *counts) for h, counts in sorted(self.hours.items())),
            primary_histogram=histogram(self.primary_latency),
            shadow_histogram=histogram(self.shadow_latency),
        )


class JsonlSource:
    backend = "jsonl"

    def __init__(self, directory: str) -> None:
        self._directory = directory
        self._scanned: dict[tuple[str, float], dict[str, _Accumulator]] = {}
        record_files(directory, 0.0)  # fail early on a missing directory

    def _scan(self, route: str, since_ts: float) -> dict[str, _Accumulator]:
        key = (route, since_ts)
        if key not in self._scanned:
            shadows: dict[str, _Accumulator] = {}
            for row in iter_records(self._directory, since_ts):
                if row.get("route") == route:
                    shadow = str(row.get("shadow_upstream"))
                    shadows.setdefault(shadow, _Accumulator()).add(row)
            self._scanned = {key: shadows}  # keep one route's scan at a time
        return self._scanned[key]

    async def shadows(self, route: str, since_ts: float) -> list[str]:
        return sorted(self._scan(route, since_ts))

    async def aggregate(self, route: str, shadow: str, since_ts: float) -> Aggregate:
        accumulator = self._scan(route, since_ts).get(shadow, _Accumulator())
        return accumulator.result(route, shadow)

    async def close(self) -> None:
        self._scanned.clear()
