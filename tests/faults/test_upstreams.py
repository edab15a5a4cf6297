"""Broken upstreams: the client gets the primary's answer or the documented JSON error."""

from __future__ import annotations

import asyncio
import glob
import gzip
import io
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from shadowproxy.control.service import Service
from tests.fakes import RawServer, garbage, read_head, reset_before_headers
from tests.proxyharness import free_port, running_service, sample, write_config
from tests.waiting import until as wait_until

PRIMARY_BODY = b'{"prediction": "a", "confidence": 0.9}'


async def json_upstream(body: bytes = PRIMARY_BODY, status: int = 200) -> TestServer:
    async def handler(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=status, body=body, content_type="application/json")

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", handler)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return server


def base(server: TestServer) -> str:
    return str(server.make_url("")).rstrip("/")


@asynccontextmanager
async def proxied(
    tmp_path: Path, upstreams: dict[str, Any], route: dict[str, Any], **top: Any
) -> AsyncIterator[Service]:
    config = write_config(
        tmp_path, upstreams, [{"name": "r", "match": {"path_prefix": "/"}, **route}], **top
    )
    async with running_service(config) as service:
        yield service


async def fetch(port: int, path: str = "/x", data: bytes = b"{}", **kw: Any) -> tuple[int, bytes]:
    payload = io.BytesIO(data) if len(data) > 1024 * 1024 else data
    async with (
        aiohttp.ClientSession() as client,
        client.post(f"http://127.0.0.1:{port}{path}", data=payload, **kw) as r,
    ):
        return r.status, await r.read()


# Primary faults -----------------------------------------------------------------


async def test_primary_hang_gives_504_at_its_timeout_and_closes_the_socket(tmp_path: Path) -> None:
    closed = asyncio.Event()

    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        await reader.read()  # returns when the proxy gives up and closes
        closed.set()

    async with (
        RawServer(hang) as raw,
        proxied(tmp_path, {"p": {"url": raw.url, "timeout_ms": 300}}, {"primary": "p"}) as service,
    ):
        status, body = await fetch(service.proxy_port)
        assert status == 504
        assert orjson.loads(body)["error"] == "primary upstream p: timeout"
        await asyncio.wait_for(closed.wait(), 5)


@pytest.mark.parametrize(
    ("name", "behaviour"),
    [
        ("reset-before-headers", reset_before_headers),
        ("garbage", garbage),
        (
            "cl-and-te",
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        ),
        (
            "duplicate-cl",
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        ),
        ("short-body", b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"partial"'),
    ],
)
async def test_broken_primary_answers_give_502_and_no_reuse(
    tmp_path: Path, name: str, behaviour: Any
) -> None:
    if isinstance(behaviour, bytes):
        canned = behaviour

        async def behaviour(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_head(reader)
            writer.write(canned)
            await writer.drain()
            if name == "short-body":
                writer.transport.abort()
                return
            await reader.read()  # hold the connection open: the proxy must not reuse it

    async with (
        RawServer(behaviour) as raw,
        proxied(tmp_path, {"p": raw.url}, {"primary": "p"}) as service,
    ):
        for attempt in range(1, 3):
            status, body = await fetch(service.proxy_port)
            assert status == 502, (name, body)
            assert orjson.loads(body)["error"].startswith("primary upstream p: ")
            assert raw.connections == attempt  # a connection that spoke oddly is never reused


async def test_non_ascii_response_header_bytes_give_502(tmp_path: Path) -> None:
    async def latin1(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\nX-Name: caf\xe9\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
        )
        await writer.drain()

    async with (
        RawServer(latin1) as raw,
        proxied(tmp_path, {"p": raw.url}, {"primary": "p"}) as service,
    ):
        status, body = await fetch(service.proxy_port)
        assert status == 502  # never forwarded with the bytes silently altered
        assert (
            orjson.loads(body)["error"] == "primary upstream p: non-ASCII bytes in response headers"
        )


async def test_primary_reset_mid_stream_aborts_the_client_connection(tmp_path: Path) -> None:
    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.transport.abort()

    async with (
        RawServer(cut) as raw,
        proxied(tmp_path, {"p": raw.url}, {"primary": "p"}) as service,
    ):
        async with (
            aiohttp.ClientSession() as client,
            client.get(f"http://127.0.0.1:{service.proxy_port}/") as r,
        ):
            assert r.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await r.read()  # never a complete-looking truncated answer


async def test_dns_failure_gives_502(tmp_path: Path) -> None:
    async with proxied(
        tmp_path, {"p": "http://does-not-exist.invalid:80"}, {"primary": "p"}
    ) as service:
        status, body = await fetch(service.proxy_port)
        assert status == 502
        assert orjson.loads(body)["error"] == "primary upstream p: connect"


async def test_stale_keepalive_never_replays_or_misattributes(tmp_path: Path) -> None:
    seen: list[bytes] = []

    async def answer_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await read_head(reader)
        rid = next(
            line.split(b": ", 1)[1]
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"x-request-id")
        )
        seen.append(rid)
        body = b'{"id": "' + rid + b'"}'
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        await writer.drain()
        writer.close()  # keep-alive was implied; the server closes anyway

    async with (
        RawServer(answer_then_close) as raw,
        proxied(tmp_path, {"p": raw.url}, {"primary": "p"}) as service,
    ):
        for i in range(10):
            status, body = await fetch(service.proxy_port, headers={"X-Request-ID": f"post-{i}"})
            if status == 200:
                assert orjson.loads(body)["id"] == f"post-{i}"
            else:
                assert status == 502
    assert seen == [
        f"post-{i}".encode() for i in range(len(seen))
    ]  # each POST sent at most once, in order
    assert len(seen) >= 9


async def test_primary_pool_exhaustion_queues_briefly_then_503(tmp_path: Path) -> None:
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        await request.read()
        await release.wait()
        return web.json_response({"prediction": "a"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", slow)
    primary = TestServer(app, host="127.0.0.1")
    await primary.start_server()
    upstreams = {
        "p": {
            "url": base(primary),
            "max_connections": 2,
            "connect_timeout_ms": 300,
            "timeout_ms": 10000,
        }
    }
    async with proxied(tmp_path, upstreams, {"primary": "p"}) as service:
        holders = [asyncio.ensure_future(fetch(service.proxy_port)) for _ in range(2)]
        await wait_until(lambda: service.runtime.current.primaries["p"]._slots.locked())
        waiters = [asyncio.ensure_future(fetch(service.proxy_port)) for _ in range(2)]
        await wait_until(lambda: service.runtime.current.primaries["p"].waiting == 2)
        status, body = await fetch(service.proxy_port)  # the queue is full: refused at once
        assert status == 503 and "pool exhausted" in orjson.loads(body)["error"]
        assert [s for s, _ in await asyncio.gather(*waiters)] == [
            503,
            503,
        ]  # waited the connect timeout
        release.set()
        assert [s for s, _ in await asyncio.gather(*holders)] == [200, 200]
        assert (
            sample(
                service,
                "shadowproxy_requests_total",
                route="r",
                upstream="p",
                role="primary",
                code="pool_exhausted",
            )
            == 3
        )
    await primary.close()


# Shadow fault matrix -------------------------------------------------------------


async def never_reads(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await asyncio.sleep(3600)


async def endless_chunks(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_head(reader)
    writer.write(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    chunk = b"1000\r\n" + b"7" * 4096 + b"\r\n"
    for _ in range(100_000):  # bounded: 400 MB at most, far more than anyone should read
        writer.write(chunk)
        await writer.drain()


BOMB = gzip.compress(b"[" + b"0," * 25_000_000 + b"0]", compresslevel=9)


async def gzip_bomb(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_head(reader)
    writer.write(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\n"
        b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(BOMB) + BOMB
    )
    await writer.drain()


SHADOW_FAULTS: dict[str, tuple[Any, str]] = {
    "refused": (None, "connect"),
    "reset": (reset_before_headers, "reset"),
    "garbage": (garbage, "protocol"),
    "status-500": ("500", "status_5xx"),
    "delay-30s": ("delay", "timeout"),
    "never-reads-5mb": (never_reads, "timeout"),
    "endless-chunked": (endless_chunks, "truncated"),
    "gzip-bomb": (gzip_bomb, "truncated"),
}


@pytest.mark.parametrize("fault", list(SHADOW_FAULTS))
async def test_shadow_fault_matrix(tmp_path: Path, fault: str) -> None:
    behaviour, expected_error = SHADOW_FAULTS[fault]
    primary = await json_upstream()
    async with AsyncExitStack() as stack:
        if behaviour is None:
            shadow_url = f"http://127.0.0.1:{free_port()}"
        elif behaviour == "500":
            server = await json_upstream(b'{"error": "boom"}', status=500)
            stack.push_async_callback(server.close)
            shadow_url = base(server)
        elif behaviour == "delay":
            hold = asyncio.Event()

            async def delayed(request: web.Request) -> web.Response:
                await asyncio.wait_for(hold.wait(), 30)
                return web.json_response({"prediction": "a"})

            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", delayed)
            server = TestServer(app, host="127.0.0.1")
            await server.start_server()
            stack.push_async_callback(server.close)
            stack.callback(hold.set)
            shadow_url = base(server)
        else:
            shadow_url = (await stack.enter_async_context(RawServer(behaviour))).url
        body = (
            b'{"input": "' + b"x" * (5 * 1024 * 1024) + b'"}'
            if fault == "never-reads-5mb"
            else b"{}"
        )
        async with proxied(
            tmp_path,
            {"p": base(primary), "s": {"url": shadow_url, "timeout_ms": 500}},
            {
                "primary": "p",
                "shadows": ["s"],
                "mirror": {"max_body_bytes": 8 * 1024 * 1024},
                "compare": {"label": "prediction"},
            },
            storage={"max_stored_body_bytes": 4096},
        ) as service:
            for i in range(3):
                status, got = await fetch(
                    service.proxy_port, data=body, headers={"X-Request-ID": f"{fault}-{i}"}
                )
                assert (status, got) == (200, PRIMARY_BODY)
            await wait_until(
                lambda: sample(service, "shadowproxy_records_total", outcome="written") == 3
            )
            rows = []
            for name in glob.glob(str(tmp_path / "records" / "shadow_log-*.jsonl")):
                rows += [
                    orjson.loads(line) for line in Path(name).read_bytes().splitlines() if line
                ]
            assert len(rows) == 3
            for row in rows:
                assert row["shadow_error"] == expected_error, row
                assert row["agreement"] in (None, False)
                for key in ("shadow_body", "primary_body", "request_body"):
                    assert (
                        row[key] is None or len(row[key].encode()) <= 4096 + 200
                    )  # capture cap + marker
    await primary.close()


async def test_keepalive_client_with_slow_shadow_runs_at_primary_speed(tmp_path: Path) -> None:
    """50 sequential requests on one keep-alive connection while the shadow takes 2 s each."""
    primary = await json_upstream()
    hold = asyncio.Event()
    shadow_started = 0

    async def slow(request: web.Request) -> web.Response:
        nonlocal shadow_started
        shadow_started += 1
        await asyncio.wait_for(hold.wait(), 2)
        return web.json_response({"prediction": "a"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", slow)
    shadow = TestServer(app, host="127.0.0.1")
    await shadow.start_server()
    async with (
        proxied(
            tmp_path,
            {"p": base(primary), "s": {"url": base(shadow), "timeout_ms": 5000}},
            {"primary": "p", "shadows": ["s"]},
        ) as service,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as client,
    ):
        for _ in range(50):
            async with client.post(f"http://127.0.0.1:{service.proxy_port}/x", data=b"{}") as r:
                assert await r.read() == PRIMARY_BODY
        # All 50 answers came back while every shadow call was still waiting on its 2 s.
        await wait_until(lambda: shadow_started == 50)
        assert sample(service, "shadowproxy_records_total", outcome="written") == 0
        hold.set()
        await wait_until(
            lambda: sample(service, "shadowproxy_records_total", outcome="written") == 50
        )
    await primary.close()
    await shadow.close()
