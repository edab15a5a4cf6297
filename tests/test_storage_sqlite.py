"""SqliteStore: columns, values, idempotency, WAL, a lock held by another process."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import sys
from pathlib import Path

import orjson
import pytest

from shadowproxy.base.errors import StorageUnavailable
from shadowproxy.storage import open_store
from shadowproxy.storage.base import PromotionRecord
from shadowproxy.storage.record import RECORD_COLUMNS
from shadowproxy.storage.sqlite import SqliteStore
from tests.recordkit import make_record

HOLD_LOCK = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
sys.stdin.readline()
conn.execute("COMMIT")
"""


def query(path: Path, sql: str) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


async def open_sqlite(path: Path, **kw: float) -> SqliteStore:
    store = SqliteStore(str(path), **kw)
    await store.open()
    return store


async def test_columns_and_wal(tmp_path: Path) -> None:
    store = await open_sqlite(tmp_path / "s.db")
    try:
        columns = [r[1] for r in query(tmp_path / "s.db", "PRAGMA table_info(shadow_log)")]
        assert columns == ["id", *RECORD_COLUMNS]
        assert query(tmp_path / "s.db", "PRAGMA journal_mode") == [("wal",)]
    finally:
        await store.close()


async def test_rows_round_trip_and_idempotent(tmp_path: Path) -> None:
    store = await open_sqlite(tmp_path / "s.db")
    batch = [make_record(i) for i in range(20)]
    batch[1] = make_record(1, agreement=None, shadow_error="timeout", shadow_status=None)
    try:
        await store.write(batch)
        await store.write(batch)
        await store.write(batch[:3] + batch[:3])
    finally:
        await store.close()
    rows = query(
        tmp_path / "s.db", f"SELECT {', '.join(RECORD_COLUMNS)} FROM shadow_log ORDER BY id"
    )
    assert len(rows) == 20
    row = dict(zip(RECORD_COLUMNS, rows[0], strict=True))
    assert row["ts"] == "2026-09-21T14:13:20.000000+00:00"  # 1_790_000_000 UTC, fixed width
    assert orjson.loads(row["request_headers"]) == batch[0].request_headers  # type: ignore[arg-type]
    assert orjson.loads(row["diff"]) == batch[0].diff  # type: ignore[arg-type]
    assert row["agreement"] == 0
    second = dict(zip(RECORD_COLUMNS, rows[1], strict=True))
    assert (second["agreement"], second["shadow_error"]) == (None, "timeout")


async def test_relative_url_is_relative_to_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    store = open_store("sqlite:///sub/rel.db")
    assert isinstance(store, SqliteStore)
    assert store.path == str(tmp_path / "sub" / "rel.db")
    assert isinstance(open_store(f"sqlite:///{tmp_path}/abs.db"), SqliteStore)
    absolute = open_store(f"sqlite:///{tmp_path}/abs.db")
    assert isinstance(absolute, SqliteStore) and absolute.path == str(tmp_path / "abs.db")


async def test_retention_and_promotions(tmp_path: Path) -> None:
    store = await open_sqlite(tmp_path / "s.db")
    try:
        await store.write([make_record(i, ts=1000.0 + i) for i in range(7)])
        await store.write([make_record(50, ts=9000.0)])
        assert await store.delete_older_than(2000.0, 5) == 5
        assert await store.delete_older_than(2000.0, 5) == 2
        assert await store.record_promotion(PromotionRecord(1.0, "r", "a", "b", "sha", "i"))
        # Another replica reloading the same edit a few seconds later: the same event.
        assert not await store.record_promotion(PromotionRecord(4.0, "r", "a", "b", "sha", "j"))
    finally:
        await store.close()
    assert query(tmp_path / "s.db", "SELECT count(*) FROM shadow_log") == [(1,)]
    assert query(tmp_path / "s.db", "SELECT route, new_primary FROM shadow_promotions") == [
        ("r", "b")
    ]


async def _hold_lock(path: Path) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", HOLD_LOCK, str(path),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    assert await asyncio.wait_for(proc.stdout.readline(), 10) == b"locked\n"
    return proc


async def _release(proc: asyncio.subprocess.Process) -> None:
    assert proc.stdin is not None
    proc.stdin.write(b"go\n")
    await proc.stdin.drain()
    assert await asyncio.wait_for(proc.wait(), 10) == 0


async def test_locked_by_another_process_is_retried_off_the_loop(tmp_path: Path) -> None:
    store = await open_sqlite(tmp_path / "s.db", busy_timeout_s=0.05)
    proc = await _hold_lock(tmp_path / "s.db")
    try:
        write = asyncio.ensure_future(store.write([make_record(1)]))
        ticks = 0
        while ticks < 20:  # the event loop keeps running while the writer waits for the lock
            await asyncio.sleep(0.01)
            ticks += 1
        assert not write.done()
        await _release(proc)
        await asyncio.wait_for(write, 10)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await store.close()
    assert query(tmp_path / "s.db", "SELECT count(*) FROM shadow_log") == [(1,)]


async def test_lock_held_too_long_is_unavailable(tmp_path: Path) -> None:
    store = await open_sqlite(tmp_path / "s.db", busy_timeout_s=0.01)
    proc = await _hold_lock(tmp_path / "s.db")
    try:
        with pytest.raises(StorageUnavailable, match="locked"):
            await asyncio.wait_for(store.write([make_record(1)]), 20)
    finally:
        await _release(proc)
        await store.close()


async def test_unwritable_location_is_unavailable(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("not a directory")
    store = SqliteStore(os.path.join(target, "s.db"))
    with pytest.raises(StorageUnavailable):
        await store.open()
