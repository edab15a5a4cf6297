"""JsonlStore: one file per day and instance, the table's keys, idempotency, retention."""

from __future__ import annotations

import os
from pathlib import Path

import orjson
import pytest

from shadowproxy.base.errors import StorageUnavailable
from shadowproxy.storage import open_store
from shadowproxy.storage.base import PromotionRecord
from shadowproxy.storage.jsonl import JsonlStore
from shadowproxy.storage.record import RECORD_COLUMNS
from tests.recordkit import make_record

DAY = 86400.0
T0 = 1_790_000_000.0  # 2026-09-21 14:13:20 UTC


def lines(path: Path) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


async def test_one_file_per_day_and_instance_with_table_keys(tmp_path: Path) -> None:
    store = JsonlStore(str(tmp_path), instance="host-7")
    await store.open()
    await store.write([make_record(i, ts=T0) for i in range(3)] + [make_record(9, ts=T0 + DAY)])
    files = sorted(os.listdir(tmp_path))
    assert files == ["shadow_log-2026-09-21-host-7.jsonl", "shadow_log-2026-09-22-host-7.jsonl"]
    rows = lines(tmp_path / files[0])
    assert len(rows) == 3
    assert list(rows[0]) == list(RECORD_COLUMNS)
    assert rows[0]["ts"] == "2026-09-21T14:13:20.000000+00:00"
    assert rows[0]["request_headers"] == make_record(0).request_headers
    assert rows[0]["diff"] == make_record(0).diff


async def test_resent_batch_adds_nothing(tmp_path: Path) -> None:
    store = JsonlStore(str(tmp_path), instance="i")
    batch = [make_record(i, ts=T0) for i in range(5)]
    await store.write(batch)
    await store.write(batch)
    await store.write(batch[:2] + batch[:2])
    assert len(lines(tmp_path / "shadow_log-2026-09-21-i.jsonl")) == 5


async def test_torn_last_line_is_closed_off_before_appending(tmp_path: Path) -> None:
    path = tmp_path / "shadow_log-2026-09-21-i.jsonl"
    path.write_bytes(b'{"request_id": "torn')
    store = JsonlStore(str(tmp_path), instance="i")
    await store.write([make_record(1, ts=T0)])
    raw = path.read_bytes().splitlines()
    assert raw[0] == b'{"request_id": "torn'
    assert orjson.loads(raw[1])["request_id"] == "req-00000001"


async def test_retention_deletes_whole_old_days(tmp_path: Path) -> None:
    store = JsonlStore(str(tmp_path), instance="i")
    await store.write([make_record(i, ts=T0) for i in range(4)])
    await store.write([make_record(10 + i, ts=T0 + 2 * DAY) for i in range(2)])
    assert await store.delete_older_than(T0 + DAY, 1000) == 4
    assert os.listdir(tmp_path) == ["shadow_log-2026-09-23-i.jsonl"]


async def test_promotions_file(tmp_path: Path) -> None:
    store = JsonlStore(str(tmp_path), instance="i")
    await store.record_promotion(PromotionRecord(T0, "r", "a", "b", "sha", "i"))
    rows = lines(tmp_path / "shadow_promotions-2026-09-21-i.jsonl")
    assert rows[0]["route"] == "r" and rows[0]["new_primary"] == "b"


async def test_unwritable_directory_is_unavailable(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    store = open_store(f"jsonl:///{tmp_path}/f/sub", instance="i")
    with pytest.raises(StorageUnavailable):
        await store.open()
    with pytest.raises(StorageUnavailable):
        await store.write([make_record(1)])
