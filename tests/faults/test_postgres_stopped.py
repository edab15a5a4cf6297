"""PostgreSQL stopped with -m immediate under load: clients never notice, nothing is lost or doubled."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import asyncpg
from aiohttp.test_utils import TestServer

from tests.fakemodel import fake_model
from tests.faults.privatepg import private_cluster
from tests.proxyharness import running_service, sample, write_config
from tests.waiting import until as wait_until

OUTAGE_S = 20


async def test_immediate_stop_under_load(tmp_path: Path) -> None:
    p, s = await fake_model({"prediction": "a"}), await fake_model({"prediction": "b"})
    try:
        await _outage(tmp_path, p, s)
    finally:
        await p.close()
        await s.close()


async def _outage(tmp_path: Path, p: TestServer, s: TestServer) -> None:
    with private_cluster() as cluster:
        config = write_config(
            tmp_path,
            {"p": str(p.make_url("")).rstrip("/"), "s": str(s.make_url("")).rstrip("/")},
            [{"name": "r", "primary": "p", "shadows": ["s"], "compare": {"label": "prediction"}}],
            storage={"url": cluster.url, "batch_size": 50, "flush_interval_ms": 50},
        )
        sent = 0
        statuses: dict[int, int] = {}
        async with running_service(config) as service, aiohttp.ClientSession() as client:
            service.overload.threshold_s = 1e9  # this test is about storage: no load shedding

            async def traffic(seconds: float) -> None:
                nonlocal sent
                loop = asyncio.get_running_loop()
                until = loop.time() + seconds
                while loop.time() < until:
                    async with client.post(
                        f"http://127.0.0.1:{service.proxy_port}/x",
                        data=b"{}",
                        headers={"X-Request-ID": f"r{sent}"},
                    ) as r:
                        await r.read()
                        statuses[r.status] = statuses.get(r.status, 0) + 1
                    sent += 1
                    await asyncio.sleep(0.01)

            await traffic(2)
            await wait_until(
                lambda: sample(service, "shadowproxy_records_total", outcome="written") > 0
            )
            await asyncio.to_thread(cluster.stop, "immediate")
            await traffic(OUTAGE_S)
            assert (
                service.recorder.status()["spool_pending"] > 0
                or service.recorder.status()["queue_depth"] > 0
            )
            await asyncio.to_thread(cluster.start)
            await traffic(2)
            await wait_until(lambda: service.pipeline.produced == sent)  # every mirror finished

            def settled() -> bool:
                st = service.recorder.status()
                done = st["written"] + st["spooled"] + st["dropped"] == sent
                return done and st["spool_pending"] == 0 and st["queue_depth"] == 0

            await wait_until(settled, timeout=60)
            status = service.recorder.status()
        assert statuses == {200: sent}  # no client ever saw the outage
        assert status["written"] + status["spooled"] + status["dropped"] == sent
        assert status["dropped"] == 0 and status["spooled"] > 0
        conn = await asyncpg.connect(cluster.url)
        try:
            count, distinct = await conn.fetchrow(
                "select count(*), count(distinct request_id) from shadow_log"
            )
        finally:
            await conn.close()
        assert count == distinct == sent  # every pair once: none lost, none doubled
