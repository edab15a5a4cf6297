"""Time `shadowproxy report --format json` over 1,000,000 PostgreSQL rows.

    .venv/bin/python bench/report_bench.py [--rows N] [--server URL]

Creates a throw-away database on the server, COPYs N rows of one (route, shadow)
spread over the last 23 hours, times report_command over them, drops the database
and prints the seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from shadowproxy.commands.report import report_command
from shadowproxy.storage.migrate import migrate
from shadowproxy.storage.record import RECORD_COLUMNS

LABELS = ("positive", "negative", "neutral", "mixed", "unknown")
CHUNK = 100_000

CONFIG = """\
version: 1
storage: {{url: "{url}"}}
upstreams:
  v1: {{url: "http://127.0.0.1:9001"}}
  v2: {{url: "http://127.0.0.1:9002"}}
routes:
  - name: sentiment
    match: {{path_prefix: /predict}}
    primary: v1
    shadows: [v2]
    compare: {{label: prediction, score: confidence}}
"""


def rows(count: int, seed: int = 7) -> Iterator[tuple[Any, ...]]:
    rng = random.Random(seed)
    start = time.time() - 23 * 3600
    step = 23 * 3600 / count
    for i in range(count):
        primary = rng.choice(LABELS)
        errored = rng.random() < 0.005
        agrees = rng.random() < 0.97
        shadow = None if errored else primary if agrees else rng.choice(LABELS)
        p_latency = rng.lognormvariate(3.0, 0.5)
        values = {
            "request_id": f"bench-{i}",
            "ts": datetime.fromtimestamp(start + i * step, UTC),
            "route": "sentiment",
            "method": "POST",
            "path": "/predict",
            "query": "",
            "request_headers": '{"content-type": "application/json"}',
            "request_body": f'{{"text": "review number {i} of the benchmark"}}',
            "primary_upstream": "v1",
            "primary_status": 200,
            "primary_latency_ms": p_latency,
            "primary_body": f'{{"prediction": "{primary}"}}',
            "primary_label": primary,
            "primary_score": rng.random(),
            "shadow_upstream": "v2",
            "shadow_status": None if errored else 200,
            "shadow_latency_ms": 1000.0 if errored else p_latency * rng.uniform(0.8, 1.3),
            "shadow_body": None if errored else f'{{"prediction": "{shadow}"}}',
            "shadow_label": shadow,
            "shadow_score": None if errored else rng.random(),
            "shadow_error": "timeout" if errored else None,
            "agreement": None if errored else shadow == primary,
            "diff": "[]",
            "instance": "bench",
            "config_sha": "bench",
        }
        yield tuple(values[c] for c in RECORD_COLUMNS)


async def seed(url: str, count: int) -> None:
    await migrate(url)
    conn = await asyncpg.connect(url)
    try:
        batch: list[tuple[Any, ...]] = []
        for record in rows(count):
            batch.append(record)
            if len(batch) == CHUNK:
                await conn.copy_records_to_table(
                    "shadow_log", records=batch, columns=RECORD_COLUMNS
                )
                batch.clear()
        if batch:
            await conn.copy_records_to_table("shadow_log", records=batch, columns=RECORD_COLUMNS)
        await conn.execute("VACUUM ANALYZE shadow_log")
    finally:
        await conn.close()


async def create_db(server: str) -> tuple[str, str]:
    name = f"shadowproxy_bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(server)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    return name, urlunsplit(urlsplit(server)._replace(path="/" + name))


async def drop_db(server: str, name: str) -> None:
    admin = await asyncpg.connect(server)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument(
        "--server",
        default=os.environ.get(
            "SHADOWPROXY_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
        ),
    )
    args = parser.parse_args()
    name, url = asyncio.run(create_db(args.server))
    try:
        started = time.perf_counter()
        asyncio.run(seed(url, args.rows))
        print(f"seeded {args.rows} rows in {time.perf_counter() - started:.1f} s")
        with tempfile.TemporaryDirectory() as tmp:
            config = os.path.join(tmp, "routes.yaml")
            output = os.path.join(tmp, "report.json")
            with open(config, "w", encoding="utf-8") as handle:
                handle.write(CONFIG.format(url=url))
            started = time.perf_counter()
            code = report_command(
                config_path=config,
                database_url=None,
                route=None,
                shadow=None,
                since="24h",
                fmt="json",
                output=output,
            )
            elapsed = time.perf_counter() - started
            with open(output, encoding="utf-8") as handle:
                entry = json.load(handle)["routes"][0]
        print(
            f"report over {entry['samples']} rows: exit {code}, decision {entry['decision']}, "
            f"agreement {entry['agreement']['value']:.4f}"
        )
        print(f"report_command (json) took {elapsed:.2f} s")
    finally:
        asyncio.run(drop_db(args.server, name))


if __name__ == "__main__":
    main()
