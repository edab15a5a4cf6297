"""Mirrors are shed first, and counted, when the event loop runs late."""

from __future__ import annotations

import time
from pathlib import Path

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

from shadowproxy.base.tasks import TaskGroup
from shadowproxy.proxy.overload import LoopLagMonitor
from tests.proxyharness import running_service, sample, write_config


async def test_monitor_flags_a_blocked_loop_and_recovers() -> None:
    monitor = LoopLagMonitor(interval_s=0.01, threshold_s=0.05)
    tasks = TaskGroup()
    tasks.spawn(monitor.run(), name="lag")
    ticks = monitor.ticks
    while monitor.ticks < ticks + 2:  # let it settle
        await monitor.tick_event.wait()
    assert not monitor.overloaded
    time.sleep(0.2)  # block the loop as a CPU-bound burst would
    ticks = monitor.ticks
    while monitor.ticks == ticks:
        await monitor.tick_event.wait()
    assert monitor.overloaded and monitor.lag_s >= 0.1
    while monitor.overloaded:
        await monitor.tick_event.wait()
    await tasks.cancel_all()


async def test_overloaded_proxy_sheds_mirrors_not_requests(tmp_path: Path) -> None:
    shadow_calls = 0

    async def shadow(request: web.Request) -> web.Response:
        nonlocal shadow_calls
        shadow_calls += 1
        return web.json_response({})

    async def primary(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    servers = []
    for handler in (primary, shadow):
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
    urls = [str(s.make_url("")).rstrip("/") for s in servers]
    config = write_config(
        tmp_path, {"p": urls[0], "s": urls[1]}, [{"name": "r", "primary": "p", "shadows": ["s"]}]
    )
    async with (
        running_service(config, shed_on_overload=True) as service,
        aiohttp.ClientSession() as client,
    ):
        service.overload.overloaded = True  # as the monitor sets it while the loop lags
        service.overload.threshold_s = -1.0  # and every later sample keeps it set
        for _ in range(10):
            async with client.get(f"http://127.0.0.1:{service.proxy_port}/x") as r:
                assert r.status == 200 and await r.json() == {"ok": True}
        assert (
            sample(
                service,
                "shadowproxy_mirror_dropped_total",
                route="r",
                shadow="s",
                reason="overload",
            )
            == 10
        )
        assert shadow_calls == 0
    for server in servers:
        await server.close()
