"""Record <-> plain values, shared by the spool and the file/SQLite stores.

``ts`` travels as unix seconds inside the spool (exact round trip) and as
fixed-width ISO-8601 UTC text in SQLite and JSON Lines, so that text order is
time order (retention deletes compare strings).
"""

from __future__ import annotations

from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

import orjson

from shadowproxy.storage.record import RECORD_COLUMNS, Record


def iso_ts(ts: float) -> str:
    """``2026-11-30T01:22:04.123456+00:00``: always with microseconds, always UTC."""
    return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%f+00:00")


def record_to_dict(record: Record) -> dict[str, Any]:
    return asdict(record)


def record_from_dict(data: dict[str, Any]) -> Record:
    """Inverse of ``record_to_dict``; KeyError/TypeError on a malformed dict."""
    return Record(**{name: data[name] for name in RECORD_COLUMNS})


def record_to_json_line(record: Record) -> bytes:
    return orjson.dumps(asdict(record)) + b"\n"


def record_to_table_dict(record: Record) -> dict[str, Any]:
    """The JSON Lines row: the table's keys, ts as ISO text."""
    row = asdict(record)
    row["ts"] = iso_ts(record.ts)
    return row
