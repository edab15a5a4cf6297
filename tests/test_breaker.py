"""The per-shadow circuit breaker, with a fake clock."""

from __future__ import annotations

from pathlib import Path

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

from shadowproxy.proxy.breaker import CircuitBreaker
from tests.proxyharness import free_port, running_service, sample, write_config
from tests.waiting import until as wait_until


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_opens_after_threshold_probes_and_backs_off() -> None:
    clock = Clock()
    breaker = CircuitBreaker(threshold=3, base_s=1.0, max_s=4.0, clock=clock)
    assert [breaker.record(refused=True) for _ in range(3)] == [False, False, True]
    assert breaker.is_open and not breaker.allow()
    clock.now += 1.0
    assert breaker.allow()  # one probe when the pause is over...
    assert not breaker.allow()  # ...and only one
    assert not breaker.record(refused=True)  # still refusing: open again, pause doubled
    clock.now += 1.5
    assert not breaker.allow()
    clock.now += 0.5
    assert breaker.allow()
    breaker.record(refused=True)
    clock.now += 4.0  # capped at max_s
    assert breaker.allow()
    assert breaker.record(refused=False)  # the shadow is back: closed
    assert not breaker.is_open and breaker.allow()


def test_successes_reset_the_count() -> None:
    breaker = CircuitBreaker(threshold=2, clock=Clock())
    breaker.record(refused=True)
    breaker.record(refused=False)
    breaker.record(refused=True)
    assert not breaker.is_open


async def test_refusing_shadow_is_recorded_without_being_dialled(tmp_path: Path) -> None:
    async def predict(request: web.Request) -> web.Response:
        return web.json_response({"prediction": "a"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", predict)
    primary = TestServer(app, host="127.0.0.1")
    await primary.start_server()
    upstreams = {"p": str(primary.make_url("")).rstrip("/"), "s": f"http://127.0.0.1:{free_port()}"}
    config = write_config(tmp_path, upstreams, [{"name": "r", "primary": "p", "shadows": ["s"]}])
    async with running_service(config) as service, aiohttp.ClientSession() as client:
        for _ in range(20):
            async with client.post(f"http://127.0.0.1:{service.proxy_port}/x", data=b"{}") as r:
                assert r.status == 200
            await wait_until(lambda: len(service.mirror_tasks) == 0)
        await wait_until(
            lambda: sample(service, "shadowproxy_records_total", outcome="written") == 20
        )
        labels = {"route": "r", "upstream": "s", "role": "shadow"}
        assert sample(service, "shadowproxy_requests_total", **labels, code="connect") == 5
        assert sample(service, "shadowproxy_requests_total", **labels, code="circuit_open") == 15
        assert (
            sample(
                service,
                "shadowproxy_comparisons_total",
                route="r",
                shadow="s",
                outcome="shadow_error",
            )
            == 20
        )
    await primary.close()
