"""Several replicas on one PostgreSQL and one routes.yaml, as on Kubernetes."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import aiohttp
import asyncpg
from aiohttp.test_utils import TestServer

from tests.fakemodel import fake_model
from tests.processes import serve

ROUTES = """\
# Two replicas share this file (a ConfigMap on Kubernetes).
version: 1
admin: {{watch_config: true}}
storage:
  url: {database}
  spool_dir: {spool}
upstreams:
  v1: {{url: "{v1}"}}   # production
  v2: {{url: "{v2}"}}   # candidate
routes:
  - name: sentiment
    match: {{path_prefix: /predict}}
    primary: v1
    shadows: [v2]
    compare: {{label: prediction}}
    gate: {{min_samples: 10}}
"""


async def answered_by(client: aiohttp.ClientSession, url: str, rid: str) -> str:
    async with client.post(url + "/predict", data=b"{}", headers={"X-Request-ID": rid}) as r:
        assert r.status == 200
        return str((await r.json())["model"])


async def test_two_replicas_promote_through_the_file_and_record_everything_once(
    tmp_path: Path, postgres_url: str
) -> None:
    v1, v2 = (
        await fake_model({"prediction": "positive", "model": "v1"}),
        await fake_model({"prediction": "positive", "model": "v2"}),
    )
    try:
        await _two_replicas(tmp_path, postgres_url, v1, v2)
    finally:
        await v1.close()
        await v2.close()


async def _two_replicas(tmp_path: Path, postgres_url: str, v1: TestServer, v2: TestServer) -> None:
    config = tmp_path / "routes.yaml"
    config.write_text(
        ROUTES.format(
            database=postgres_url,
            spool=tmp_path / "spool",
            v1=str(v1.make_url("")).rstrip("/"),
            v2=str(v2.make_url("")).rstrip("/"),
        )
    )
    with (
        serve(config, env={"SHADOWPROXY_INSTANCE": "replica-a"}) as a,
        serve(config, env={"SHADOWPROXY_INSTANCE": "replica-b"}) as b,
    ):
        await asyncio.gather(a.ready(), b.ready())
        async with aiohttp.ClientSession() as client:
            for i in range(20):
                proc = a if i % 2 == 0 else b
                assert await answered_by(client, proc.url, f"before-{i}") == "v1"
            promote = await asyncio.to_thread(
                subprocess.run,
                [
                    sys.executable,
                    "-m",
                    "shadowproxy",
                    "promote",
                    "sentiment",
                    "--config",
                    str(config),
                ],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert promote.returncode == 0, promote.stderr
            loop = asyncio.get_running_loop()
            started = loop.time()
            switched: dict[str, float] = {}
            async with asyncio.timeout(5):
                while len(switched) < 2:
                    for name, proc in (("a", a), ("b", b)):
                        if (
                            name not in switched
                            and await answered_by(client, proc.url, f"probe-{name}-{len(switched)}")
                            == "v2"
                        ):
                            switched[name] = loop.time() - started
                    await asyncio.sleep(0.05)
            for i in range(20):
                proc = a if i % 2 == 0 else b
                assert await answered_by(client, proc.url, f"after-{i}") == "v2"
    # Both replicas exited cleanly (SIGTERM drain flushed their records).
    assert a.proc.returncode == 0 and b.proc.returncode == 0
    conn = await asyncpg.connect(postgres_url)
    try:
        rows = await conn.fetch(
            "select request_id, instance, shadow_upstream from shadow_log where request_id not like 'probe-%'"
        )
        shadow_v2 = await conn.fetchval(
            "select count(*) from shadow_log where shadow_upstream = 'v2'"
        )
        per_instance = dict(
            await conn.fetch("select instance, count(*) from shadow_log group by instance")
        )
        promotions = await conn.fetch(
            "select route, previous_primary, new_primary, instance from shadow_promotions"
        )
    finally:
        await conn.close()
    ids = [r["request_id"] for r in rows]
    assert len(ids) == len(set(ids)) == 40  # every pair once
    assert {
        r["request_id"]: r["instance"] for r in rows if r["request_id"].startswith("before-")
    } == {f"before-{i}": ("replica-a" if i % 2 == 0 else "replica-b") for i in range(20)}
    assert {r["shadow_upstream"] for r in rows if r["request_id"].startswith("after-")} == {"v1"}
    assert [(p["route"], p["previous_primary"], p["new_primary"]) for p in promotions] == [
        ("sentiment", "v1", "v2")
    ]
    report = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-m",
            "shadowproxy",
            "report",
            "--config",
            str(config),
            "--format",
            "json",
            "--shadow",
            "v2",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert report.returncode in (0, 1, 3), report.stderr
    entries = json.loads(report.stdout)["routes"]
    # The report counts every replica's pairs (probes included: they were mirrored too).
    assert set(per_instance) == {"replica-a", "replica-b"}
    assert [(e["route"], e["shadow"], e["samples"]) for e in entries] == [
        ("sentiment", "v2", shadow_v2)
    ]
    assert shadow_v2 >= 20
