"""Recorder accounting: written + spooled + dropped == submitted, whatever the store does."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from shadowproxy.base.errors import StorageUnavailable
from shadowproxy.config.settings import StorageSettings
from shadowproxy.storage.base import PromotionRecord
from shadowproxy.storage.batch import RecordsRejected
from shadowproxy.storage.record import Record
from shadowproxy.storage.recorder import Recorder
from shadowproxy.storage.spool import Spool
from shadowproxy.storage.sqlite import SqliteStore
from shadowproxy.telemetry.metrics import Metrics
from tests.recordkit import make_record
from tests.waiting import until


class FakeStore:
    """A store whose availability the test switches; remembers rows by (request_id, shadow)."""

    backend = "fake"
    location = "memory"

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], Record] = {}
        self.down = False
        self.gate: asyncio.Event | None = None  # when set: writes wait for it
        self.poison: set[str] = set()
        self.promotions: list[PromotionRecord] = []

    async def open(self) -> None:
        if self.down:
            raise StorageUnavailable("down")

    async def write(self, records: Sequence[Record]) -> None:
        if self.gate is not None:
            await self.gate.wait()
        if self.down:
            raise StorageUnavailable("down")
        bad = [(r, "poison") for r in records if r.request_id in self.poison]
        for r in records:
            if r.request_id not in self.poison:
                self.rows.setdefault((r.request_id, r.shadow_upstream), r)
        if bad:
            raise RecordsRejected(bad, len(records) - len(bad))

    async def record_promotion(self, promotion: PromotionRecord) -> None:
        if self.down:
            raise StorageUnavailable("down")
        self.promotions.append(promotion)

    async def delete_older_than(self, cutoff_ts: float, batch_size: int) -> int:
        if self.down:
            raise StorageUnavailable("down")
        return 0

    async def close(self) -> None:
        return None


def settings(tmp_path: Path, **kw: object) -> StorageSettings:
    base: dict[str, object] = {
        "spool_dir": str(tmp_path / "spool"),
        "batch_size": 50,
        "flush_interval_ms": 5,
        "retention_days": 0,  # the synthetic records are months old: retention would race
    }
    base.update(kw)
    return StorageSettings(**base)  # type: ignore[arg-type]


def balanced(recorder: Recorder) -> bool:
    s = recorder.status()
    return s["written"] + s["spooled"] + s["dropped"] == s["submitted"]


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def test_records_reach_sqlite(tmp_path: Path, metrics: Metrics) -> None:
    store = SqliteStore(str(tmp_path / "s.db"))
    recorder = Recorder(store, settings(tmp_path), metrics, instance="t")
    await recorder.start()
    for i in range(1234):
        recorder.submit(make_record(i))
    await until(lambda: recorder.status()["written"] == 1234)
    await recorder.close(5)
    status = recorder.status()
    assert (status["written"], status["spooled"], status["dropped"]) == (1234, 0, 0)
    assert status["backend"] == "sqlite" and status["queue_depth"] == 0
    assert sample(metrics, "shadowproxy_records_total", outcome="written") == 1234
    assert sample(metrics, "shadowproxy_record_queue_depth") == 0


async def test_store_down_spools_then_drains_without_duplicates(
    tmp_path: Path, metrics: Metrics
) -> None:
    store = FakeStore()
    recorder = Recorder(store, settings(tmp_path), metrics, instance="t")
    await recorder.start()
    for i in range(100):
        recorder.submit(make_record(i))
    await until(lambda: recorder.status()["written"] == 100)
    store.down = True
    for i in range(100, 400):
        recorder.submit(make_record(i))
    await until(lambda: recorder.status()["spooled"] == 300)
    assert not recorder.store_ok and recorder.ready  # spooling keeps it ready
    assert sample(metrics, "shadowproxy_spool_pending") == 300
    store.down = False
    await until(lambda: recorder.status()["spool_pending"] == 0 and recorder.store_ok)
    assert sorted(k[0] for k in store.rows) == [make_record(i).request_id for i in range(400)]
    await recorder.close(5)
    status = recorder.status()
    assert (status["written"], status["spooled"], status["dropped"]) == (100, 300, 0)
    assert sample(metrics, "shadowproxy_records_total", outcome="spooled") == 300
    assert sample(metrics, "shadowproxy_spool_pending") == 0


async def test_full_queue_overflows_to_the_spool(tmp_path: Path, metrics: Metrics) -> None:
    store = FakeStore()
    store.gate = asyncio.Event()  # the store hangs: the writer holds one batch
    recorder = Recorder(store, settings(tmp_path, queue_max=100), metrics, instance="t")
    await recorder.start()
    for i in range(50):
        recorder.submit(make_record(i))
    await until(lambda: recorder.status()["queue_depth"] == 0)  # that batch is in flight
    for i in range(50, 1000):
        recorder.submit(make_record(i))
    await until(lambda: recorder.status()["spooled"] == 1000 - 100 - 50)
    assert recorder.status()["queue_depth"] == 100
    store.gate.set()
    await until(lambda: len(store.rows) == 1000 and recorder.status()["spool_pending"] == 0)
    await recorder.close(5)
    assert balanced(recorder)
    assert recorder.status()["written"] == 150


async def test_spool_unusable_and_store_down_drops_and_counts(
    tmp_path: Path, metrics: Metrics
) -> None:
    (tmp_path / "file").write_text("x")
    store = FakeStore()
    store.down = True
    recorder = Recorder(
        store, settings(tmp_path, spool_dir=str(tmp_path / "file" / "spool")), metrics, instance="t"
    )
    await recorder.start()
    assert not recorder.ready
    for i in range(120):
        recorder.submit(make_record(i))
    await until(lambda: recorder.status()["dropped"] == 120)
    assert not recorder.ready
    assert sample(metrics, "shadowproxy_records_total", outcome="dropped") == 120
    await recorder.close(2)
    assert balanced(recorder)


async def test_rejected_records_are_dropped_and_counted(tmp_path: Path, metrics: Metrics) -> None:
    store = FakeStore()
    store.poison = {make_record(3).request_id}
    recorder = Recorder(store, settings(tmp_path), metrics, instance="t")
    await recorder.start()
    for i in range(10):
        recorder.submit(make_record(i))
    await recorder.close(5)
    status = recorder.status()
    assert (status["written"], status["dropped"]) == (9, 1)
    assert len(store.rows) == 9


async def test_close_with_a_hanging_store_spools_the_rest(tmp_path: Path, metrics: Metrics) -> None:
    store = FakeStore()
    store.gate = asyncio.Event()  # never set: the write in flight never returns
    recorder = Recorder(store, settings(tmp_path), metrics, instance="t")
    await recorder.start()
    for i in range(120):
        recorder.submit(make_record(i))
    await until(lambda: recorder.status()["queue_depth"] == 70)  # one batch in flight
    await recorder.close(0.5)
    status = recorder.status()
    assert (status["written"], status["spooled"], status["dropped"]) == (0, 120, 0)
    recorder.submit(make_record(999))  # after close: counted, never lost silently
    assert recorder.status()["dropped"] == 1 and balanced(recorder)
    leftover = Spool(str(tmp_path / "spool"), instance="x")
    assert leftover.open() == 120


async def test_leftover_spool_is_stored_at_start_and_not_counted_again(
    tmp_path: Path, metrics: Metrics
) -> None:
    earlier = Spool(str(tmp_path / "spool"), instance="crashed")
    earlier.open()
    earlier.append([make_record(i) for i in range(25)])
    earlier.append([make_record(i) for i in range(20, 30)])  # overlaps: stored once
    earlier.close()
    store = SqliteStore(str(tmp_path / "s.db"))
    recorder = Recorder(store, settings(tmp_path), metrics, instance="t")
    await recorder.start()
    await until(lambda: recorder.status()["spool_pending"] == 0)
    await recorder.close(5)
    status = recorder.status()
    assert (status["written"], status["spooled"], status["dropped"]) == (0, 0, 0)
    import sqlite3

    conn = sqlite3.connect(tmp_path / "s.db")
    assert conn.execute("SELECT count(*) FROM shadow_log").fetchone() == (30,)
    conn.close()


async def test_promotion_deferred_while_down(tmp_path: Path, metrics: Metrics) -> None:
    store = FakeStore()
    recorder = Recorder(store, settings(tmp_path), metrics, instance="t")
    await recorder.start()
    store.down = True
    await recorder.record_promotion(PromotionRecord(1.0, "r", "a", "b", "sha", "t"))
    assert store.promotions == [] and not recorder.store_ok
    store.down = False
    await until(lambda: len(store.promotions) == 1)
    await recorder.close(2)


async def test_retention_deletes_old_rows(tmp_path: Path, metrics: Metrics) -> None:
    store = SqliteStore(str(tmp_path / "s.db"))
    now = 1_790_000_000.0
    recorder = Recorder(
        store, settings(tmp_path, retention_days=2), metrics, instance="t", clock=lambda: now
    )
    await recorder.start()
    for i in range(30):
        recorder.submit(make_record(i, ts=now - 3 * 86400 if i < 20 else now))
    await until(lambda: recorder.status()["written"] == 30)
    assert await recorder.enforce_retention() == 20
    await recorder.close(2)


@pytest.mark.parametrize("url", ["sqlite:///rel/records.db", "jsonl:///rel/records"])
async def test_storage_up_names_the_resolved_store(
    tmp_path: Path, metrics: Metrics, monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    """A relative store URL is resolved against the working directory; the log says where."""
    from structlog.testing import capture_logs

    from shadowproxy.storage import open_store

    monkeypatch.chdir(tmp_path)
    (tmp_path / "rel").mkdir()
    recorder = Recorder(open_store(url, instance="t"), settings(tmp_path), metrics, instance="t")
    with capture_logs() as logs:
        await recorder.start()
    await recorder.close(timeout=5)
    up = [entry for entry in logs if entry["event"] == "storage_up"]
    resolved = str(tmp_path / "rel" / ("records.db" if url.startswith("sqlite") else "records"))
    assert [entry["location"] for entry in up] == [resolved]
