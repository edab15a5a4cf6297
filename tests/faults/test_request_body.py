"""Request bodies held in memory: bounded per request and, together, per process."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson

from tests.fakemodel import fake_model
from tests.proxyharness import running_service, write_config

SERVER = {"max_body_bytes": 10_000, "max_buffered_body_bytes": 1_000}


def base(server: object) -> str:
    return str(server.make_url("")).rstrip("/")  # type: ignore[attr-defined]


async def test_bodies_past_the_process_budget_get_503_unread_and_the_budget_comes_back(
    tmp_path: Path,
) -> None:
    release, arrived = asyncio.Event(), asyncio.Event()
    primary = await fake_model({"prediction": "p"}, hold=release, arrived=arrived)
    config = write_config(
        tmp_path, {"p": base(primary)}, [{"name": "r", "primary": "p"}], server=SERVER
    )
    async with running_service(config) as service, aiohttp.ClientSession() as client:
        url = f"http://127.0.0.1:{service.proxy_port}"
        held = asyncio.ensure_future(client.post(url + "/slow", data=b"a" * 800))
        await asyncio.wait_for(arrived.wait(), 5)  # 800 bytes held while the primary thinks
        assert service.body_budget.used == 800
        async with client.post(url + "/fast", data=b"b" * 800) as refused:
            assert refused.status == 503
            error = orjson.loads(await refused.read())
        assert "max_buffered_body_bytes" in error["error"] and error["request_id"]
        release.set()
        async with await asyncio.wait_for(held, 5) as first:
            assert first.status == 200
        async with client.post(url + "/fast", data=b"c" * 800) as after:  # given back
            assert after.status == 200
        assert service.body_budget.used == 0
    await primary.close()


async def _chunks(count: int, size: int) -> AsyncIterator[bytes]:
    for _ in range(count):
        yield b"x" * size


async def test_a_body_without_length_is_counted_as_it_arrives(tmp_path: Path) -> None:
    primary = await fake_model({"prediction": "p"})
    config = write_config(
        tmp_path, {"p": base(primary)}, [{"name": "r", "primary": "p"}], server=SERVER
    )
    async with running_service(config) as service, aiohttp.ClientSession() as client:
        url = f"http://127.0.0.1:{service.proxy_port}/x"
        async with client.post(url, data=_chunks(3, 200)) as small:  # chunked, 600 bytes
            assert small.status == 200
        async with client.post(url, data=_chunks(6, 200)) as big:  # 1,200 bytes > the budget
            assert big.status == 503
        assert service.body_budget.used == 0
    await primary.close()
