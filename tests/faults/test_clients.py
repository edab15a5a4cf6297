"""Hostile clients: smuggling, oversized heads, slowloris, aborts, odd bytes, slow readers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import given, settings
from hypothesis import strategies as st

from shadowproxy.control.service import Service
from tests.proxyharness import running_service, sample, write_config
from tests.waiting import until as wait_until


@dataclass
class Upstream:
    server: TestServer
    seen: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")


async def start_upstream(handler: web.Handler | None = None) -> Upstream:
    upstream: Upstream

    async def default(request: web.Request) -> web.Response:
        upstream.seen.append(request.raw_path)
        await request.read()
        return web.json_response({"prediction": "ok"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler or default)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    upstream = Upstream(server)
    return upstream


@asynccontextmanager
async def proxy(
    tmp_path: Path, **server: object
) -> AsyncIterator[tuple[Service, Upstream, Upstream]]:
    primary, shadow = await start_upstream(), await start_upstream()
    config = write_config(
        tmp_path,
        {"p": primary.url, "s": shadow.url},
        [{"name": "r", "primary": "p", "shadows": ["s"]}],
        server=server,
    )
    async with running_service(config) as service:
        yield service, primary, shadow
    await primary.server.close()
    await shadow.server.close()


async def exchange(port: int, raw: bytes, timeout: float = 5.0) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), timeout)
    except ConnectionResetError:
        return b""
    finally:
        writer.close()


def status_of(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1]) if raw.startswith(b"HTTP/") else 0


SMUGGLING = {
    "cl-and-te": b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "duplicate-cl": b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde",
    "te-obfuscated-value": b"POST /p HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
    "te-space-before-colon": b"POST /p HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
    "te-list": b"POST /p HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
    "obs-fold": b"GET /p HTTP/1.1\r\nHost: a\r\nX-A: b\r\n c\r\n\r\n",
    "bare-lf": b"GET /p HTTP/1.1\nHost: a\n\n",
    "duplicate-host": b"GET /p HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    "missing-host": b"GET /p HTTP/1.1\r\n\r\n",
    "request-line-too-long": b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: a\r\n\r\n",
    "header-too-long": b"GET /p HTTP/1.1\r\nHost: a\r\nX-B: " + b"b" * 9000 + b"\r\n\r\n",
    "too-many-headers": b"GET /p HTTP/1.1\r\nHost: a\r\n"
    + b"".join(b"X-%d: 1\r\n" % i for i in range(200))
    + b"\r\n",
    "latin1-header": b"GET /p HTTP/1.1\r\nHost: a\r\nX-L: caf\xe9\r\n\r\n",
    "absolute-form": b"GET http://169.254.169.254/latest HTTP/1.1\r\nHost: a\r\n\r\n",
    "connect": b"CONNECT evil:443 HTTP/1.1\r\nHost: evil:443\r\n\r\n",
}


@pytest.mark.parametrize("name", list(SMUGGLING))
async def test_ambiguous_or_oversized_requests_get_400_and_reach_no_upstream(
    tmp_path: Path, name: str
) -> None:
    async with proxy(tmp_path) as (service, primary, shadow):
        raw = await exchange(service.proxy_port, SMUGGLING[name])
        assert status_of(raw) == 400, raw[:200]
        body = orjson.loads(raw.split(b"\r\n\r\n", 1)[1])
        assert set(body) == {"error", "request_id"}
        assert primary.seen == [] and shadow.seen == []
        # the proxy is still fine
        ok = await exchange(
            service.proxy_port, b"GET /p HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
        )
        assert status_of(ok) == 200


@pytest.fixture
async def fuzz_target(tmp_path: Path) -> AsyncIterator[Service]:
    async with proxy(tmp_path) as (service, _, _):
        yield service


async def test_fuzzed_heads(fuzz_target: Service) -> None:
    """Random request heads: always a valid HTTP response or a close; the process stays up."""
    port = fuzz_target.proxy_port
    heads = st.builds(
        lambda m, t, v, hs, end: (
            m
            + b" "
            + t
            + b" "
            + v
            + b"\r\n"
            + b"".join(k + b": " + x + b"\r\n" for k, x in hs)
            + end
        ),
        st.sampled_from([b"GET", b"POST", b"PUT", b"G\x00T", b"", b"PRI"]),
        st.binary(max_size=40),
        st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1x", b""]),
        st.lists(st.tuples(st.binary(max_size=12), st.binary(max_size=24)), max_size=6),
        st.sampled_from([b"\r\n", b"\n", b""]),
    )
    examples: list[bytes] = []

    @settings(max_examples=150, deadline=None, database=None)
    @given(head=heads)
    def collect(head: bytes) -> None:
        examples.append(head)

    collect()
    for head in examples:
        raw = await exchange(port, head + b"Connection: close\r\n\r\n", timeout=5)
        assert raw == b"" or raw.startswith(b"HTTP/1."), raw[:100]
        if raw:
            assert status_of(raw) in (200, 400, 404, 405, 413, 431, 501, 505), raw[:200]
    ok = await exchange(port, b"GET /p HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert status_of(ok) == 200
    assert (
        sample(fuzz_target, "shadowproxy_connections_rejected_total", reason="internal_error") == 0
    )


async def test_slowloris_connections_are_cut_and_fresh_clients_served(tmp_path: Path) -> None:
    async with proxy(tmp_path, header_timeout_s=1.0) as (service, primary, _):
        dripping = []
        for _ in range(200):
            reader, writer = await asyncio.open_connection("127.0.0.1", service.proxy_port)
            writer.write(b"GET /p HTTP/1.1\r\nHost: a\r\nX-Slow: ")
            dripping.append((reader, writer))
        ok = await exchange(
            service.proxy_port, b"GET /p HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
        )
        assert status_of(ok) == 200
        for _reader, writer in dripping:  # keep dripping: the deadline is for the whole head
            writer.write(b"x")
        closed = await asyncio.gather(
            *(asyncio.wait_for(r.read(), 10) for r, _ in dripping), return_exceptions=True
        )
        assert all(c == b"" or isinstance(c, ConnectionResetError) for c in closed)
        for _, writer in dripping:
            writer.close()
        assert (
            sample(service, "shadowproxy_connections_rejected_total", reason="header_timeout")
            == 200
        )
        assert len(primary.seen) == 1


async def test_connection_cap(tmp_path: Path) -> None:
    async with proxy(tmp_path, max_connections=5) as (service, _, _):
        held = [await asyncio.open_connection("127.0.0.1", service.proxy_port) for _ in range(5)]
        raw = await exchange(service.proxy_port, b"GET /p HTTP/1.1\r\nHost: a\r\n\r\n")
        assert raw == b""  # closed at once
        assert (
            sample(service, "shadowproxy_connections_rejected_total", reason="max_connections") == 1
        )
        for _, writer in held:
            writer.close()
        await wait_until(lambda: len(service.proxy_server.connections) == 0)  # type: ignore[union-attr]
        ok = await exchange(
            service.proxy_port, b"GET /p HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
        )
        assert status_of(ok) == 200


async def test_client_abort_during_upload_contacts_nobody(tmp_path: Path) -> None:
    async with proxy(tmp_path) as (service, primary, shadow):
        _reader, writer = await asyncio.open_connection("127.0.0.1", service.proxy_port)
        writer.write(b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000)
        await writer.drain()
        writer.transport.abort()
        await wait_until(lambda: len(service.proxy_server.connections) == 0)  # type: ignore[union-attr]
        assert primary.seen == [] and shadow.seen == []
        assert len(service.mirror_tasks) == 0


async def test_client_abort_after_headers_still_records_the_shadow(tmp_path: Path) -> None:
    release = asyncio.Event()

    async def streaming(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b'{"prediction": ')
        await release.wait()
        await response.write(b'"ok"}')
        return response

    primary, shadow = await start_upstream(streaming), await start_upstream()
    config = write_config(
        tmp_path,
        {"p": primary.url, "s": shadow.url},
        [{"name": "r", "primary": "p", "shadows": ["s"]}],
    )
    async with running_service(config) as service:
        reader, writer = await asyncio.open_connection("127.0.0.1", service.proxy_port)
        writer.write(b"GET /p HTTP/1.1\r\nHost: a\r\nX-Request-ID: abort-1\r\n\r\n")
        await reader.readuntil(b"\r\n\r\n")
        writer.transport.abort()  # the client leaves right after the response head
        release.set()
        await wait_until(
            lambda: sample(service, "shadowproxy_records_total", outcome="written") == 1
        )
        assert shadow.seen == ["/p"]
    await primary.server.close()
    await shadow.server.close()


async def test_slow_reader_backpressures_the_primary(tmp_path: Path) -> None:
    written = 0
    finished = asyncio.Event()

    async def huge(request: web.Request) -> web.StreamResponse:
        nonlocal written
        response = web.StreamResponse()
        await response.prepare(request)
        chunk = b"x" * 65536
        try:
            for _ in range(800):  # 50 MiB if nobody pushes back
                await response.write(chunk)
                written += len(chunk)
        finally:
            finished.set()
        return response

    primary = await start_upstream(huge)
    config = write_config(tmp_path, {"p": primary.url}, [{"name": "r", "primary": "p"}])
    async with running_service(config) as service:
        _reader, writer = await asyncio.open_connection(
            "127.0.0.1", service.proxy_port, limit=65536
        )
        writer.transport.pause_reading()  # a client that never reads
        writer.write(b"GET /big HTTP/1.1\r\nHost: a\r\n\r\n")
        last = -1
        while last != written:  # wait until the upstream is stalled by backpressure
            last = written
            await asyncio.sleep(0.3)
        assert written < 16 * 1024 * 1024, written
        assert not finished.is_set()
        writer.transport.abort()
    await primary.server.close()


async def test_slow_body_gets_408_and_reaches_no_upstream(tmp_path: Path) -> None:
    async with proxy(tmp_path, body_timeout_s=0.5) as (service, primary, shadow):
        reader, writer = await asyncio.open_connection("127.0.0.1", service.proxy_port)
        writer.write(b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
        await writer.drain()  # ...and the other 90 bytes never come
        raw = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        assert status_of(raw) == 408
        assert primary.seen == [] and shadow.seen == []


async def test_idle_keepalive_connection_is_closed(tmp_path: Path) -> None:
    async with proxy(tmp_path, keepalive_timeout_s=0.5) as (service, _, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", service.proxy_port)
        writer.write(b"GET /p HTTP/1.1\r\nHost: a\r\n\r\n")
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        assert status_of(head) == 200
        length = int(
            next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")).split(
                b":"
            )[1]
        )
        await reader.readexactly(length)
        assert await asyncio.wait_for(reader.read(), 10) == b""  # closed by the server when idle
        writer.close()


@pytest.mark.parametrize("given", ["x" * 129, "has space", "tab\there"])
async def test_unusable_request_id_is_replaced(tmp_path: Path, given: str) -> None:
    async with proxy(tmp_path) as (service, primary, _):
        raw = await exchange(
            service.proxy_port,
            b"GET /p HTTP/1.1\r\nHost: a\r\nConnection: close\r\nX-Request-ID: "
            + given.encode()
            + b"\r\n\r\n",
        )
        assert status_of(raw) == 200
        returned = next(
            h for h in raw.split(b"\r\n") if h.lower().startswith(b"x-request-id")
        ).split(b": ", 1)[1]
        assert returned.decode() != given and len(returned) == 32
        assert primary.seen == ["/p"]


def test_refuses_to_start_without_the_c_parser(monkeypatch: pytest.MonkeyPatch) -> None:
    from aiohttp import http_parser

    from shadowproxy.http.listener import assert_c_parser

    assert_c_parser()  # llhttp is what runs here
    monkeypatch.setattr(http_parser, "HttpRequestParser", http_parser.HttpRequestParserPy)
    with pytest.raises(RuntimeError, match="llhttp"):
        assert_c_parser()
