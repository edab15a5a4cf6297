"""PostgreSQL faults beyond an outage: a lost COMMIT acknowledgement, a locked table,
values that would poison a batch. Each ends with exact accounting and no duplicate."""

from __future__ import annotations

from pathlib import Path

import asyncpg
import pytest
from prometheus_client import CollectorRegistry

from shadowproxy.config.settings import StorageSettings
from shadowproxy.pairs.record_build import build_record
from shadowproxy.storage.postgres import PostgresStore
from shadowproxy.storage.recorder import Recorder
from shadowproxy.telemetry.metrics import Metrics
from tests.recordkit import (
    Forwarder,
    make_comparison,
    make_exchange,
    make_record,
    shadow_log_counts,
)
from tests.waiting import until

pytestmark = pytest.mark.postgres


def make_recorder(
    url: str, tmp_path: Path, *, queue_max: int = 100_000, write_timeout_s: float = 0.5
) -> Recorder:
    settings = StorageSettings(
        url=url, spool_dir=str(tmp_path / "spool"), batch_size=50, flush_interval_ms=5,
        queue_max=queue_max, retention_days=0,  # the synthetic records are months old
    )  # fmt: skip
    store = PostgresStore(url, timeout_s=1)
    metrics = Metrics(CollectorRegistry())
    return Recorder(store, settings, metrics, instance="f", write_timeout_s=write_timeout_s)


def balanced(recorder: Recorder) -> bool:
    s = recorder.status()
    return s["written"] + s["spooled"] + s["dropped"] == s["submitted"]


async def test_lost_commit_acknowledgement_adds_no_duplicate(
    forwarder: tuple[Forwarder, str], postgres_url: str, tmp_path: Path
) -> None:
    fwd, url = forwarder
    recorder = make_recorder(url, tmp_path)
    await recorder.start()
    try:
        for i in range(200):
            recorder.submit(make_record(i))
        await until(lambda: recorder.status()["written"] == 200)
        fwd.mute_on = b"COMMIT\x00"  # the next COMMIT is done, its acknowledgement lost
        for i in range(200, 250):
            recorder.submit(make_record(i))
        await until(lambda: recorder.status()["spooled"] == 50)
        assert fwd.mute_replies and fwd.mute_on is None  # the batch timed out awaiting the ack
        assert await shadow_log_counts(postgres_url) == (
            250,
            250,
        )  # committed although unacknowledged
        fwd.mute_replies = False
        for i in range(250, 350):
            recorder.submit(make_record(i))
        await until(
            lambda: (
                recorder.store_ok
                and recorder.status()["spool_pending"] == 0
                and recorder.status()["written"] + recorder.status()["spooled"] == 350
            )
        )
    finally:
        await recorder.close(5)
    assert balanced(recorder) and recorder.status()["dropped"] == 0
    assert await shadow_log_counts(postgres_url) == (350, 350)


async def test_locked_table_fills_the_queue_then_spools(postgres_url: str, tmp_path: Path) -> None:
    recorder = make_recorder(postgres_url, tmp_path, queue_max=200, write_timeout_s=10)
    await recorder.start()
    locker = await asyncpg.connect(postgres_url, timeout=5)
    lock = locker.transaction()
    await lock.start()
    await locker.execute("LOCK TABLE shadow_log IN ACCESS EXCLUSIVE MODE")
    try:
        for i in range(50):
            recorder.submit(make_record(i))
        await until(lambda: recorder.status()["queue_depth"] == 0)  # that batch waits on the lock
        for i in range(50, 1000):
            recorder.submit(make_record(i))
        await until(lambda: recorder.status()["spooled"] == 750)  # queue full: the rest spooled
        assert recorder.status()["queue_depth"] == 200
        assert recorder.store_ok  # slow is not down: nothing timed out yet
    finally:
        await lock.rollback()
        await locker.close()
    await until(
        lambda: recorder.status()["written"] == 250 and recorder.status()["spool_pending"] == 0
    )
    await recorder.close(5)
    assert balanced(recorder)
    assert await shadow_log_counts(postgres_url) == (1000, 1000)


async def test_hostile_values_never_poison_a_batch(postgres_url: str, tmp_path: Path) -> None:
    recorder = make_recorder(postgres_url, tmp_path, write_timeout_s=5)
    await recorder.start()
    hostile = [
        make_exchange(request_body=b"\x00\x00", headers=(("X-A", "\x00\udcff"),)),
        make_exchange(primary_body=b"\xff\xfe\xfd", shadow_body=b"\xc3("),
        make_exchange(shadow_body=b'{"big": "' + b"y" * 5_000_000 + b'"}'),
    ]
    for i, exchange in enumerate(hostile * 10):
        record = build_record(exchange, make_comparison(), StorageSettings(), "i")
        recorder.submit(
            make_record(
                i,
                **{
                    k: getattr(record, k)
                    for k in ("request_body", "request_headers", "primary_body", "shadow_body")
                },
            )
        )
    recorder.submit(make_record(99, primary_status=2**40))  # cannot fit the column: rejected
    await until(lambda: recorder.status()["written"] + recorder.status()["dropped"] == 31)
    await recorder.close(5)
    status = recorder.status()
    assert (status["written"], status["dropped"], status["spooled"]) == (30, 1, 0)
    assert await shadow_log_counts(postgres_url) == (30, 30)
