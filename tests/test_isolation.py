"""The product's first promise: whatever a shadow does, the client gets the primary's bytes."""

from __future__ import annotations

import asyncio
import glob
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.fakes import RawServer, garbage, reset_before_headers, reset_mid_body
from tests.proxyharness import free_port, running_service, sample, write_config
from tests.waiting import until as wait_until

PRIMARY_BODY = b'{"prediction": "positive", "confidence": 0.93}'


async def primary_app() -> TestServer:
    async def predict(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(
            body=PRIMARY_BODY, content_type="application/json", headers={"X-Model": "v1"}
        )

    app = web.Application()
    app.router.add_post("/predict", predict)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return server


class HangingShadow:
    """An HTTP shadow that holds every request until released (slow or hanging)."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.arrived = 0
        self.finished = 0

    async def handler(self, request: web.Request) -> web.Response:
        self.arrived += 1
        await request.read()
        await self.release.wait()
        self.finished += 1
        return web.Response(
            body=b'{"prediction": "negative", "confidence": 0.5}', content_type="application/json"
        )


@asynccontextmanager
async def shadow_upstream(
    kind: str, stack: AsyncExitStack
) -> AsyncIterator[tuple[str, HangingShadow | None]]:
    if kind in ("slow", "hanging"):
        hanging = HangingShadow()
        app = web.Application()
        app.router.add_post("/predict", hanging.handler)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        try:
            yield str(server.make_url("")).rstrip("/"), hanging
        finally:
            hanging.release.set()
            await server.close()
    elif kind == "refusing":
        yield f"http://127.0.0.1:{free_port()}", None
    else:
        behaviour = {
            "garbage": garbage,
            "resetting": reset_mid_body,
            "reset-before-headers": reset_before_headers,
        }[kind]
        raw = await stack.enter_async_context(RawServer(behaviour))
        yield raw.url, None


EXPECTED_ERROR = {
    "slow": None,
    "hanging": "timeout",
    "refusing": "connect",
    "garbage": "protocol",
    "resetting": "protocol",
    "reset-before-headers": "reset",
}


def stored_rows(tmp_path: Path) -> list[dict[str, object]]:
    rows = []
    for name in sorted(glob.glob(str(tmp_path / "records" / "shadow_log-*.jsonl"))):
        with open(name, "rb") as f:
            rows += [orjson.loads(line) for line in f if line.strip()]
    return rows


@pytest.mark.parametrize("kind", list(EXPECTED_ERROR))
async def test_client_gets_primary_bytes_whatever_the_shadow_does(
    tmp_path: Path, kind: str
) -> None:
    primary = await primary_app()
    async with AsyncExitStack() as stack, shadow_upstream(kind, stack) as (shadow_url, hanging):
        timeout_ms = 30000 if kind == "slow" else 300
        config = write_config(
            tmp_path,
            {
                "p": str(primary.make_url("")).rstrip("/"),
                "s": {"url": shadow_url, "timeout_ms": timeout_ms},
            },
            [
                {
                    "name": "r",
                    "match": {"path": "/predict"},
                    "primary": "p",
                    "shadows": ["s"],
                    "compare": {"label": "prediction", "score": "confidence"},
                }
            ],
        )
        async with running_service(config) as service, aiohttp.ClientSession() as client:
            async with client.post(
                f"http://127.0.0.1:{primary.port}/predict", data=b"{}"
            ) as direct:
                direct_status, direct_body = direct.status, await direct.read()
                direct_model = direct.headers["X-Model"]
            for i in range(5):
                async with client.post(
                    f"http://127.0.0.1:{service.proxy_port}/predict",
                    data=b'{"text": "great"}',
                    headers={"X-Request-ID": f"{kind}-{i}"},
                ) as r:
                    assert (r.status, await r.read()) == (direct_status, direct_body)
                    assert r.headers["X-Model"] == direct_model
                    assert r.headers["X-Request-ID"] == f"{kind}-{i}"
            if hanging is not None:
                # Every answer above arrived while the shadow still held all its requests.
                await wait_until(lambda: hanging.arrived == 5)
                assert hanging.finished == 0
                if kind == "slow":
                    hanging.release.set()  # a hanging one is cut by the shadow timeout
            await wait_until(
                lambda: sample(service, "shadowproxy_records_total", outcome="written") == 5
            )
            assert (
                sample(
                    service,
                    "shadowproxy_requests_total",
                    route="r",
                    upstream="p",
                    role="primary",
                    code="200",
                )
                == 5
            )
        rows = stored_rows(tmp_path)
    await primary.close()
    assert sorted(str(r["request_id"]) for r in rows) == [f"{kind}-{i}" for i in range(5)]
    for row in rows:
        assert row["shadow_error"] == EXPECTED_ERROR[kind], row
        assert row["primary_status"] == 200
        if kind == "slow":
            assert row["agreement"] is False and row["shadow_label"] == "negative"
        else:
            assert row["agreement"] is None


async def test_hanging_shadow_keeps_tasks_and_sockets_bounded(tmp_path: Path) -> None:
    primary = await primary_app()
    async with (
        AsyncExitStack() as stack,
        shadow_upstream("hanging", stack) as (shadow_url, hanging),
    ):
        assert hanging is not None
        config = write_config(
            tmp_path,
            {
                "p": str(primary.make_url("")).rstrip("/"),
                "s": {"url": shadow_url, "timeout_ms": 60000},
            },
            [
                {
                    "name": "r",
                    "match": {"path": "/predict"},
                    "primary": "p",
                    "shadows": ["s"],
                    "mirror": {"max_in_flight": 4},
                }
            ],
        )
        async with running_service(config) as service, aiohttp.ClientSession() as client:
            service.overload.threshold_s = 1e9  # this test counts saturation, not load shedding

            async def one() -> None:
                async with client.post(
                    f"http://127.0.0.1:{service.proxy_port}/predict", data=b"{}"
                ) as r:
                    assert await r.read() == PRIMARY_BODY

            await asyncio.gather(*(one() for _ in range(100)))
            await wait_until(lambda: hanging.arrived == 4)
            assert len(service.mirror_tasks) == 4
            assert hanging.arrived == 4  # the shadow's pool never opened more than max_in_flight
            assert (
                sample(
                    service,
                    "shadowproxy_mirror_dropped_total",
                    route="r",
                    shadow="s",
                    reason="saturated",
                )
                == 96
            )
            hanging.release.set()
            await wait_until(lambda: len(service.mirror_tasks) == 0)
    await primary.close()


async def test_mirrors_beyond_the_shadow_pool_are_dropped_not_queued(tmp_path: Path) -> None:
    primary = await primary_app()
    async with (
        AsyncExitStack() as stack,
        shadow_upstream("hanging", stack) as (shadow_url, hanging),
    ):
        assert hanging is not None
        upstreams = {
            "p": str(primary.make_url("")).rstrip("/"),
            "s": {"url": shadow_url, "timeout_ms": 60000, "max_connections": 3},
        }
        route = {"name": "r", "match": {"path": "/predict"}, "primary": "p", "shadows": ["s"]}
        config = write_config(tmp_path, upstreams, [{**route, "mirror": {"max_in_flight": 10}}])
        async with running_service(config) as service, aiohttp.ClientSession() as client:
            service.overload.threshold_s = 1e9  # count saturation, not load shedding
            for _ in range(8):
                async with client.post(
                    f"http://127.0.0.1:{service.proxy_port}/predict", data=b"{}"
                ) as r:
                    assert await r.read() == PRIMARY_BODY
            await wait_until(lambda: hanging.arrived == 3)
            assert service.dispatcher.in_flight[("r", "s")] == 3
            assert (
                sample(
                    service,
                    "shadowproxy_mirror_dropped_total",
                    route="r",
                    shadow="s",
                    reason="saturated",
                )
                == 5
            )
            hanging.release.set()
            await wait_until(lambda: len(service.mirror_tasks) == 0)
    await primary.close()
