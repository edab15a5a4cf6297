"""Seed shadow_log rows straight into PostgreSQL, SQLite or JSON Lines (test code only)."""

from __future__ import annotations

import os
import sqlite3
from datetime import UTC, datetime
from importlib import resources
from typing import Any

import asyncpg
import orjson

from shadowproxy.storage.record import RECORD_COLUMNS

Row = dict[str, Any]


def row(**values: Any) -> Row:
    base: Row = {
        "request_id": "r",
        "ts": 0.0,
        "route": "sentiment",
        "method": "POST",
        "path": "/predict",
        "query": "",
        "request_headers": {"content-type": "application/json"},
        "request_body": '{"text": "hello"}',
        "primary_upstream": "v1",
        "primary_status": 200,
        "primary_latency_ms": 10.0,
        "primary_body": '{"prediction": "pos"}',
        "primary_label": "pos",
        "primary_score": None,
        "shadow_upstream": "v2",
        "shadow_status": 200,
        "shadow_latency_ms": 10.0,
        "shadow_body": '{"prediction": "pos"}',
        "shadow_label": "pos",
        "shadow_score": None,
        "shadow_error": None,
        "agreement": True,
        "diff": [],
        "instance": "test",
        "config_sha": "sha",
    }
    unknown = set(values) - set(base)
    assert not unknown, unknown
    base.update(values)
    return base


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f+00:00")


def _schema(dialect: str) -> str:
    return (
        resources.files("shadowproxy.storage")
        .joinpath(f"migrations/{dialect}_0001_initial.sql")
        .read_text(encoding="utf-8")
    )


async def seed_postgres(url: str, rows: list[Row]) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(_schema("postgres"))
        records = []
        for r in rows:
            values = dict(r)
            values["ts"] = datetime.fromtimestamp(r["ts"], UTC)
            values["request_headers"] = orjson.dumps(r["request_headers"]).decode()
            values["diff"] = orjson.dumps(r["diff"]).decode()
            records.append(tuple(values[c] for c in RECORD_COLUMNS))
        await conn.copy_records_to_table("shadow_log", records=records, columns=RECORD_COLUMNS)
    finally:
        await conn.close()


def seed_sqlite(path: str, rows: list[Row]) -> None:
    conn = sqlite3.connect(path)
    try:
        conn.executescript(_schema("sqlite"))
        placeholders = ", ".join("?" for _ in RECORD_COLUMNS)
        conn.executemany(
            f"INSERT INTO shadow_log ({', '.join(RECORD_COLUMNS)}) VALUES ({placeholders})",
            [
                tuple(
                    iso(r[c])
                    if c == "ts"
                    else orjson.dumps(r[c]).decode()
                    if c in ("request_headers", "diff")
                    else r[c]
                    for c in RECORD_COLUMNS
                )
                for r in rows
            ],
        )
        conn.commit()
    finally:
        conn.close()


def seed_jsonl(directory: str, rows: list[Row], *, instance: str = "test") -> None:
    """One file per UTC day, ts as ISO text like the JSON Lines store writes it."""
    os.makedirs(directory, exist_ok=True)
    for r in rows:
        stamped = dict(r, ts=iso(r["ts"]))
        day = stamped["ts"][:10]
        path = os.path.join(directory, f"shadow_log-{day}-{instance}.jsonl")
        with open(path, "ab") as handle:
            handle.write(orjson.dumps(stamped) + b"\n")


async def seed(backend: str, rows: list[Row], *, postgres_url: str, tmp: str) -> str:
    """Seed ``rows`` into ``backend``; return the storage URL."""
    if backend == "postgresql":
        await seed_postgres(postgres_url, rows)
        return postgres_url
    if backend == "sqlite":
        path = os.path.join(tmp, "records.db")
        seed_sqlite(path, rows)
        return f"sqlite:///{path}"
    directory = os.path.join(tmp, "records")
    seed_jsonl(directory, rows)
    return f"jsonl:///{directory}"
