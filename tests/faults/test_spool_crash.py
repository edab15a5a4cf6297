"""SIGKILL while records wait in the spool, the last line torn: the next start stores every
complete record exactly once and counts the torn line."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import asyncpg
import pytest
from prometheus_client import CollectorRegistry

from shadowproxy.config.settings import StorageSettings
from shadowproxy.storage.postgres import PostgresStore
from shadowproxy.storage.recorder import Recorder
from shadowproxy.telemetry.metrics import Metrics
from tests.waiting import until

pytestmark = pytest.mark.postgres

VICTIM = """
import asyncio, os, signal, sys
from prometheus_client import CollectorRegistry
from shadowproxy.telemetry.metrics import Metrics
from shadowproxy.storage.recorder import Recorder
from shadowproxy.config.settings import StorageSettings
from shadowproxy.storage.postgres import PostgresStore
from tests.recordkit import make_record

async def main():
    spool_dir = sys.argv[1]
    settings = StorageSettings(spool_dir=spool_dir, batch_size=50, flush_interval_ms=5,
                               retention_days=0)
    store = PostgresStore("postgresql://postgres@127.0.0.1:1/down", timeout_s=1)
    recorder = Recorder(store, settings, Metrics(CollectorRegistry()), instance="victim")
    await recorder.start()
    for i in range(500):
        recorder.submit(make_record(i))
    while recorder.status()["spooled"] < 500:
        await asyncio.sleep(0.005)
    segment = sorted(os.listdir(spool_dir))[-1]
    with open(os.path.join(spool_dir, segment), "ab") as f:  # dies in the middle of a line
        f.write(b'{"request_id": "req-torn", "ts": 17')
    os.kill(os.getpid(), signal.SIGKILL)

asyncio.run(main())
"""


async def test_sigkill_with_spooled_records_and_a_torn_line(
    postgres_url: str, tmp_path: Path
) -> None:
    spool_dir = tmp_path / "spool"
    root = Path(__file__).resolve().parents[2]
    victim = await asyncio.create_subprocess_exec(
        sys.executable, "-c", VICTIM, str(spool_dir), cwd=root
    )
    assert await asyncio.wait_for(victim.wait(), 30) == -signal.SIGKILL

    settings = StorageSettings(spool_dir=str(spool_dir), batch_size=50, retention_days=0)
    store = PostgresStore(postgres_url, timeout_s=5)
    recorder = Recorder(store, settings, Metrics(CollectorRegistry()), instance="next")
    await recorder.start()
    await until(lambda: recorder.status()["spool_pending"] == 0)
    await recorder.close(5)
    status = recorder.status()
    assert status["spool_corrupt"] == 1
    # Replayed records were counted by the process that spooled them, not again here.
    assert (status["written"], status["spooled"], status["dropped"]) == (0, 0, 0)
    conn = await asyncpg.connect(postgres_url, timeout=5)
    try:
        n, distinct = await conn.fetchrow(
            "SELECT count(*), count(DISTINCT request_id) FROM shadow_log"
        ) or (0, 0)
    finally:
        await conn.close()
    assert (n, distinct) == (500, 500)
    assert list(spool_dir.iterdir()) == []
