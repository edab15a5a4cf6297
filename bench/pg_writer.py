"""Sustained records/s of the PostgreSQL writer: Recorder -> PostgresStore, COPY batches.

    .venv/bin/python bench/pg_writer.py [--records 200000] [--batch-size 500 2000]

Creates a throw-away database on $SHADOWPROXY_TEST_DATABASE_URL (default
postgresql://postgres@127.0.0.1:5432/postgres), submits synthetic records
(~1 KB each, bodies included) as fast as the recorder takes them, and reports
records/s from the first submit to the last row written. Drops the database.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
import uuid
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from prometheus_client import CollectorRegistry

from shadowproxy.config.settings import StorageSettings
from shadowproxy.storage.postgres import PostgresStore
from shadowproxy.storage.record import Record
from shadowproxy.storage.recorder import Recorder
from shadowproxy.telemetry.metrics import Metrics

SERVER = os.environ.get(
    "SHADOWPROXY_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def record(i: int) -> Record:
    return Record(
        request_id=f"bench-{i:09d}", ts=time.time(), route="sentiment", method="POST",
        path="/predict", query="", request_headers={"content-type": "application/json"},
        request_body='{"inputs": [{"name": "x", "data": [1.0, 2.0, 3.0]}], "pad": "' + "x" * 400 + '"}',
        primary_upstream="model-v1", primary_status=200, primary_latency_ms=12.3,
        primary_body='{"outputs": [{"name": "y", "data": [0.91, 0.09]}]}', primary_label="0",
        primary_score=0.91, shadow_upstream="model-v2", shadow_status=200,
        shadow_latency_ms=18.7, shadow_body='{"outputs": [{"name": "y", "data": [0.12, 0.88]}]}',
        shadow_label="1", shadow_score=0.88, shadow_error=None, agreement=False,
        diff=[{"path": "outputs[0].data[0]", "primary": 0.91, "shadow": 0.12}],
        instance="bench", config_sha="0" * 64,
    )  # fmt: skip


async def run(records: int, batch_size: int) -> float:
    name = f"shadowproxy_bench_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(SERVER, timeout=10)
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = urlunsplit(urlsplit(SERVER)._replace(path="/" + name))
    try:
        with tempfile.TemporaryDirectory() as spool:
            settings = StorageSettings(
                url=url, queue_max=records, spool_dir=spool, batch_size=batch_size,
                flush_interval_ms=50,
            )  # fmt: skip
            recorder = Recorder(
                PostgresStore(url), settings, Metrics(CollectorRegistry()), instance="b"
            )
            await recorder.start()
            batch = [record(i) for i in range(records)]
            started = time.perf_counter()
            for r in batch:
                recorder.submit(r)
            while recorder.status()["written"] < records:
                await asyncio.sleep(0.01)
                status = recorder.status()
                if status["spooled"] or status["dropped"]:
                    raise SystemExit(f"writer fell back: {status}")
            elapsed = time.perf_counter() - started
            await recorder.close(10)
        check = await asyncpg.connect(url, timeout=10)
        rows = await check.fetchval("SELECT count(*) FROM shadow_log")
        await check.close()
        assert rows == records, rows
        return records / elapsed
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--batch-size", type=int, nargs="+", default=[500])
    args = parser.parse_args()
    for size in args.batch_size:
        rate = asyncio.run(run(args.records, size))
        print(f"records={args.records} batch_size={size} records_per_s={rate:,.0f}")


if __name__ == "__main__":
    main()
