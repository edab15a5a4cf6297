"""PostgreSQL refuses connections while records flow, then comes back.

A TCP forwarder in front of the shared server plays the outage: closing it
refuses new connections and aborts the established ones (what clients see when
PostgreSQL is stopped with ``-m immediate``), reopening it is the restart.
Afterwards every pair is in the table exactly once and
written + spooled + dropped == produced.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from shadowproxy.config.settings import StorageSettings
from shadowproxy.storage.postgres import PostgresStore
from shadowproxy.storage.recorder import Recorder
from shadowproxy.telemetry.metrics import Metrics
from tests.recordkit import Forwarder, make_record, shadow_log_counts
from tests.waiting import until

pytestmark = pytest.mark.postgres


def make_recorder(url: str, tmp_path: Path) -> Recorder:
    settings = StorageSettings(
        url=url,
        spool_dir=str(tmp_path / "spool"),
        batch_size=50,
        flush_interval_ms=5,
        retention_days=0,  # the synthetic records are months old: retention would race
    )
    store = PostgresStore(url, timeout_s=2)
    return Recorder(store, settings, Metrics(CollectorRegistry()), instance="f", write_timeout_s=2)


async def produce(recorder: Recorder, start: int, count: int) -> None:
    for i in range(start, start + count):
        recorder.submit(make_record(i))
        if i % 10 == 0:
            await asyncio.sleep(0.001)  # traffic keeps flowing, not one burst


def assert_balanced(recorder: Recorder, produced: int) -> None:
    s = recorder.status()
    assert s["submitted"] == produced
    assert s["written"] + s["spooled"] + s["dropped"] == produced
    assert s["dropped"] == 0


async def test_outage_while_records_flow(
    forwarder: tuple[Forwarder, str], postgres_url: str, tmp_path: Path
) -> None:
    fwd, url = forwarder
    recorder = make_recorder(url, tmp_path)
    await recorder.start()
    assert recorder.store_ok
    producer = asyncio.ensure_future(produce(recorder, 0, 3000))
    try:
        await until(lambda: recorder.status()["written"] >= 300)
        await fwd.refuse()  # PostgreSQL goes away mid-traffic
        await until(lambda: recorder.status()["spooled"] >= 300 and not recorder.store_ok)
        assert recorder.ready  # spooling
        await fwd.accept()  # and comes back
        await asyncio.wait_for(producer, 30)
        await until(
            lambda: (
                recorder.store_ok
                and recorder.status()["queue_depth"] == 0
                and recorder.status()["spool_pending"] == 0
                and recorder.status()["written"] + recorder.status()["spooled"] == 3000
            )
        )
    finally:
        producer.cancel()
        await recorder.close(5)
    assert_balanced(recorder, 3000)
    assert recorder.status()["spooled"] >= 300
    assert await shadow_log_counts(postgres_url) == (3000, 3000)
    assert list((tmp_path / "spool").iterdir()) == []


async def test_down_at_start_then_drains(
    forwarder: tuple[Forwarder, str], postgres_url: str, tmp_path: Path
) -> None:
    fwd, url = forwarder
    await fwd.refuse()
    recorder = make_recorder(url, tmp_path)
    await recorder.start()  # does not fail: serves and spools
    assert not recorder.store_ok and recorder.ready
    await produce(recorder, 0, 500)
    await until(lambda: recorder.status()["spooled"] == 500)
    await fwd.accept()
    await until(lambda: recorder.store_ok and recorder.status()["spool_pending"] == 0)
    await recorder.close(5)
    assert_balanced(recorder, 500)
    assert await shadow_log_counts(postgres_url) == (500, 500)
