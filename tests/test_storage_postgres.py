"""PostgresStore against a real PostgreSQL: columns, values, idempotency, poison isolation."""

from __future__ import annotations

import asyncio
import random
import string
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
import orjson
import pytest

from shadowproxy.base.errors import StorageUnavailable, UsageError
from shadowproxy.config.settings import StorageSettings
from shadowproxy.pairs.record_build import build_record
from shadowproxy.storage import open_store
from shadowproxy.storage.base import PromotionRecord
from shadowproxy.storage.batch import RecordsRejected
from shadowproxy.storage.postgres import PostgresStore
from shadowproxy.storage.record import RECORD_COLUMNS
from tests.recordkit import make_comparison, make_exchange, make_record

pytestmark = pytest.mark.postgres


@pytest.fixture
async def store(postgres_url: str) -> AsyncIterator[PostgresStore]:
    s = PostgresStore(postgres_url, timeout_s=5)
    await s.open()
    yield s
    await s.close()


async def fetch(url: str, query: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url, timeout=5)
    try:
        return list(await conn.fetch(query))
    finally:
        await conn.close()


async def test_columns_are_the_documented_ones(store: PostgresStore, postgres_url: str) -> None:
    rows = await fetch(
        postgres_url,
        "SELECT table_name, column_name FROM information_schema.columns "
        "WHERE table_name IN ('shadow_log', 'shadow_promotions') ORDER BY table_name, ordinal_position",
    )
    log_cols = [r["column_name"] for r in rows if r["table_name"] == "shadow_log"]
    promo_cols = [r["column_name"] for r in rows if r["table_name"] == "shadow_promotions"]
    assert log_cols == ["id", *RECORD_COLUMNS]
    assert promo_cols == [
        "id", "ts", "route", "previous_primary", "new_primary", "config_sha", "instance"
    ]  # fmt: skip


async def test_rows_round_trip(store: PostgresStore, postgres_url: str) -> None:
    records = [make_record(i) for i in range(10)]
    await store.write(records)
    rows = await fetch(postgres_url, "SELECT * FROM shadow_log ORDER BY request_id")
    assert len(rows) == 10
    row, rec = rows[3], records[3]
    assert row["request_id"] == rec.request_id
    assert row["ts"] == datetime.fromtimestamp(rec.ts, tz=UTC)
    assert orjson.loads(row["request_headers"]) == rec.request_headers
    assert orjson.loads(row["diff"]) == rec.diff
    for column in RECORD_COLUMNS:
        if column not in ("ts", "request_headers", "diff"):
            assert row[column] == getattr(rec, column), column


async def test_write_is_idempotent(store: PostgresStore, postgres_url: str) -> None:
    batch = [make_record(i) for i in range(50)]
    await store.write(batch)
    await store.write(batch)  # e.g. a COMMIT whose acknowledgement was lost, then re-sent
    await store.write(batch[:5] + batch[:5])  # duplicates inside one batch
    await store.write([make_record(1, shadow="model-v3")])  # same request, another shadow
    rows = await fetch(postgres_url, "SELECT count(*) AS n FROM shadow_log")
    assert rows[0]["n"] == 51


async def test_poison_record_is_isolated(store: PostgresStore, postgres_url: str) -> None:
    noise = "".join(random.choices(string.ascii_letters + string.digits, k=20_000))
    batch = [make_record(i) for i in range(40)]
    batch[7] = make_record(7, primary_status=2**40)  # does not fit an integer column
    batch[23] = make_record(23, request_id=noise)  # too large for the unique btree index
    with pytest.raises(RecordsRejected) as caught:
        await store.write(batch)
    assert caught.value.stored == 38
    assert sorted(r.request_id[:12] for r, _ in caught.value.rejected) == sorted(
        ["req-00000007", noise[:12]]
    )
    rows = await fetch(postgres_url, "SELECT count(*) AS n FROM shadow_log")
    assert rows[0]["n"] == 38


async def test_nul_and_invalid_utf8_are_stored_escaped(
    store: PostgresStore, postgres_url: str
) -> None:
    exchange = make_exchange(request_body=b"\x00\xff{", headers=(("X-A", "\x00"),))
    record = build_record(exchange, make_comparison(primary_label="\x00"), StorageSettings(), "i")
    await store.write([record])
    rows = await fetch(postgres_url, "SELECT request_body, primary_label FROM shadow_log")
    assert (rows[0]["request_body"], rows[0]["primary_label"]) == ("\\x00\\xff{", "\\x00")


async def test_delete_older_than_in_batches(store: PostgresStore, postgres_url: str) -> None:
    await store.write([make_record(i, ts=1000.0 + i) for i in range(30)])
    await store.write([make_record(100 + i, ts=5000.0) for i in range(5)])
    assert await store.delete_older_than(2000.0, 20) == 20
    assert await store.delete_older_than(2000.0, 20) == 10
    assert await store.delete_older_than(2000.0, 20) == 0
    rows = await fetch(postgres_url, "SELECT count(*) AS n FROM shadow_log")
    assert rows[0]["n"] == 5


async def test_promotion_recorded(store: PostgresStore, postgres_url: str) -> None:
    await store.record_promotion(PromotionRecord(1_790_000_000.0, "r", "v1", "v2", "sha", "i"))
    rows = await fetch(
        postgres_url, "SELECT route, previous_primary, new_primary FROM shadow_promotions"
    )
    assert [tuple(r) for r in rows] == [("r", "v1", "v2")]


async def test_same_promotion_from_several_replicas_is_stored_once(
    store: PostgresStore, postgres_url: str
) -> None:
    others = [PostgresStore(postgres_url) for _ in range(3)]
    for other in others:
        await other.open()
    try:
        t = 1_790_000_000.0
        same = [PromotionRecord(t + i, "r", "v1", "v2", "sha1", f"replica-{i}") for i in range(4)]
        stored = await asyncio.gather(
            *(s.record_promotion(p) for s, p in zip([store, *others], same, strict=True))
        )
        assert sorted(stored) == [False, False, False, True]
        # Promoting back and forth later is a new event even with the same file content.
        assert await store.record_promotion(
            PromotionRecord(t + 60, "r", "v2", "v1", "sha0", "replica-0")
        )
        assert await store.record_promotion(
            PromotionRecord(t + 3600, "r", "v1", "v2", "sha1", "replica-0")
        )
    finally:
        for other in others:
            await other.close()
    rows = await fetch(
        postgres_url, "SELECT previous_primary, new_primary FROM shadow_promotions ORDER BY ts"
    )
    assert [tuple(r) for r in rows] == [("v1", "v2"), ("v2", "v1"), ("v1", "v2")]


async def test_unreachable_server_is_storage_unavailable() -> None:
    store = PostgresStore("postgresql://postgres@127.0.0.1:1/nothing", timeout_s=2)
    with pytest.raises(StorageUnavailable):
        await store.open()
    with pytest.raises(StorageUnavailable):
        await store.write([make_record(1)])


def test_open_store_picks_the_backend_by_url(tmp_path: object) -> None:
    assert open_store("postgresql://u@h/db").backend == "postgresql"
    assert open_store("postgres://u@h/db").backend == "postgresql"
    assert open_store("sqlite:///x.db").backend == "sqlite"
    assert open_store("jsonl:///tmp/x").backend == "jsonl"
    with pytest.raises(UsageError, match=r"mysql.*expected postgresql://"):
        open_store("mysql://u@h/db")
    with pytest.raises(UsageError, match="no scheme"):
        open_store("shadow.db")
