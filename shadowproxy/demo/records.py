"""A quick look at what the demo proxy recorded, read straight from its SQLite file."""

from __future__ import annotations

import contextlib
import sqlite3
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True, slots=True)
class Summary:
    rows: int
    agreed: int
    disagreed: int
    not_comparable: int
    primary_p50_ms: float | None
    shadow_p50_ms: float | None


def max_record_id(database: Path) -> int:
    """The highest ``shadow_log.id`` so far; 0 before the first record or table."""
    rows = _query(database, "SELECT COALESCE(MAX(id), 0) FROM shadow_log")
    return int(rows[0][0]) if rows else 0


def read_summary(database: Path, after_id: int = 0) -> Summary:
    """Agreement and median latencies of the records with ``id > after_id``."""
    rows = _query(
        database,
        "SELECT agreement, primary_latency_ms, shadow_latency_ms FROM shadow_log WHERE id > ?",
        (after_id,),
    )
    agreements = [row[0] for row in rows]
    return Summary(
        rows=len(rows),
        agreed=sum(1 for a in agreements if a == 1),
        disagreed=sum(1 for a in agreements if a == 0),
        not_comparable=sum(1 for a in agreements if a is None),
        primary_p50_ms=_median([row[1] for row in rows]),
        shadow_p50_ms=_median([row[2] for row in rows]),
    )


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _query(database: Path, sql: str, params: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
    if not database.exists():
        return []
    uri = f"{database.as_uri()}?mode=ro"
    try:
        with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=5)) as conn:
            return list(conn.execute(sql, params))
    except sqlite3.OperationalError:  # no table yet, or the writer holds a lock
        return []
