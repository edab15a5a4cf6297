"""The proxy's side of an upstream exchange, end to end: what a client sees when the primary
sends large or odd answers, takes a large body, or never reads it.

These are the client-visible behaviours that the unit tests of the old hand-written upstream
client (the deleted tests/test_httpclient.py) covered and no other end-to-end test does; the proxy now speaks
to upstreams through aiohttp's client (shadowproxy/upstream.py). Clients are raw sockets,
upstreams raw HTTP/1.1 servers (helpers from test_conformance.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from pathlib import Path

import orjson
import pytest

from shadowproxy.control.service import Service
from tests.fakes import RawServer, read_to_eof
from tests.faults.test_conformance import (
    OK_BODY,
    READ_LIMIT,
    MiB,
    Seen,
    Upstream,
    answered,
    assert_error_json,
    canned,
    connect,
    get,
    ok_bytes,
    post,
    proxy,
    read_response,
    request,
    route,
    send,
)
from tests.proxyharness import sample
from tests.waiting import until as wait_until

BIG_ANSWER = random.Random(8).randbytes(4 * MiB)


def written(service: Service) -> float:
    return sample(service, "shadowproxy_records_total", outcome="written")


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_large_answer_read_slowly_arrives_intact(tmp_path: Path, framing: str) -> None:
    async def big(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        if framing == "chunked":
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(BIG_ANSWER))
        step = 64 * 1024
        for start in range(0, len(BIG_ANSWER), step):
            piece = BIG_ANSWER[start : start + step]
            writer.write(b"%x\r\n%b\r\n" % (len(piece), piece) if framing == "chunked" else piece)
            await writer.drain()
        if framing == "chunked":
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        return True

    async with (
        Upstream(big) as primary,
        proxy(tmp_path, {"p": primary.url}, [route()]) as service,
        connect(service.proxy_port) as (reader, writer),
    ):
        await send(writer, get("/big"))  # Connection: close: the answer ends with the connection
        received = bytearray()
        async with asyncio.timeout(8):
            while chunk := await reader.read(65536):
                received += chunk
                await asyncio.sleep(0.002)  # a slow consumer, on purpose
        whole = asyncio.StreamReader(limit=READ_LIMIT)
        whole.feed_data(bytes(received))
        whole.feed_eof()
        response = await read_response(whole)
    assert response is not None
    assert (response.status, response.complete) == (200, True)
    assert response.chunked == (framing == "chunked")
    assert len(response.body) == len(BIG_ANSWER)
    assert response.body == BIG_ANSWER


async def test_large_request_body_reaches_primary_and_shadow_intact(tmp_path: Path) -> None:
    payload = random.Random(9).randbytes(3 * MiB)
    async with (
        Upstream() as primary,
        Upstream() as shadow,
        proxy(
            tmp_path,
            {"p": primary.url, "s": shadow.url},
            [route(shadows=("s",), mirror={"max_body_bytes": 4 * MiB})],
        ) as service,
        connect(service.proxy_port) as (reader, writer),
    ):
        await send(writer, post("/upload", payload, close=False), post("/small", b"x"))
        for _ in range(2):
            async with asyncio.timeout(8):
                response = await read_response(reader, "POST")
            assert response is not None
            assert (response.status, response.body) == (200, OK_BODY)
        await wait_until(lambda: written(service) == 2, timeout=5)
    for upstream in (primary, shadow):
        assert [(s.target, len(s.body)) for s in upstream.seen] == [
            ("/upload", len(payload)),
            ("/small", 1),
        ]
        assert upstream.seen[0].body == payload
        assert upstream.seen[1].body == b"x"


async def test_interim_1xx_answers_are_skipped_and_the_connection_reused(tmp_path: Path) -> None:
    async def interim_first(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 100 Continue\r\nX-Interim: yes\r\n\r\n")
        writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n")
        await writer.drain()
        writer.write(ok_bytes(extra=b"X-Final: yes\r\n"))
        await writer.drain()
        return True

    async with (
        Upstream(interim_first) as primary,
        proxy(tmp_path, {"p": primary.url}, [route()]) as service,
        connect(service.proxy_port) as (reader, writer),
    ):
        await send(writer, post("/a", close=False))
        async with asyncio.timeout(5):
            head = await reader.readuntil(b"\r\n\r\n")  # the first thing that comes back
            assert head.startswith(b"HTTP/1.1 200 "), head[:100]
            assert b"X-Final: yes\r\n" in head
            assert b"X-Interim" not in head and b"Link:" not in head
            assert await reader.readexactly(len(OK_BODY)) == OK_BODY
        second = await answered(service.proxy_port, post("/b"))
        assert (second.status, second.body) == (200, OK_BODY)
    assert primary.targets() == ["/a", "/b"]
    assert primary.connections == 1  # the interim answers left nothing behind on it


MALFORMED_ANSWERS = {
    # A 101 to a request that asked for no upgrade (the proxy never forwards Upgrade).
    "101-switching-protocols": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\n\r\nbytes of another protocol",
    "bad-content-length": b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\nok",
    "two-equal-content-lengths": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
    b"Content-Length: 2\r\n\r\nok",
    "transfer-encoding-then-content-length": b"HTTP/1.1 200 OK\r\n"
    b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\nhello",
}


@pytest.mark.parametrize("answer", list(MALFORMED_ANSWERS))
async def test_malformed_primary_answer_gives_502(tmp_path: Path, answer: str) -> None:
    async with (
        Upstream(canned(MALFORMED_ANSWERS[answer])) as primary,
        proxy(tmp_path, {"p": primary.url}, [route()]) as service,
        connect(service.proxy_port) as (reader, writer),
    ):
        await send(writer, get("/x"))  # Connection: close
        async with asyncio.timeout(5):
            raw = await read_to_eof(reader)
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 502 "), head[:200]
        assert set(orjson.loads(body)) == {"error", "request_id"}
    assert primary.targets() == ["/x"]


async def test_primary_that_never_reads_an_8_mib_body_gives_504_and_stop_is_prompt(
    tmp_path: Path,
) -> None:
    payload = b"z" * (8 * MiB)
    heads: list[bytes] = []

    async def deaf(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append(await reader.readuntil(b"\r\n\r\n"))
        await asyncio.Event().wait()  # never reads the body; cancelled when the server closes

    loop = asyncio.get_running_loop()
    async with RawServer(deaf) as raw:
        async with proxy(
            tmp_path,
            {"p": {"url": raw.url, "timeout_ms": 500}},
            [route()],
            server={"max_body_bytes": 16 * MiB},
        ) as service:
            started = loop.time()
            response = await answered(service.proxy_port, post("/x", payload), timeout=8)
            assert_error_json(response, 504)
            assert response.json()["error"] == "primary upstream p: timeout"
            assert loop.time() - started < 5
            stopping = loop.time()
        assert loop.time() - stopping < 3  # nothing held the stop on the stuck upload
    assert len(heads) == 1 and heads[0].startswith(b"POST /x HTTP/1.1\r\n")


@pytest.mark.parametrize("when", ["with-the-answer", "while-idle"])
async def test_bytes_the_primary_sends_out_of_turn_never_answer_another_request(
    tmp_path: Path, when: str
) -> None:
    """An upstream that sends more than its answer (a second answer, a stray 408 before an
    idle close, bytes past its Content-Length) must not answer the next request that happens
    to go out on that connection: each client gets the answer to its own request (or 502)."""
    idle = asyncio.Event()
    stray_sent = asyncio.Event()
    stray = b'HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n"stray"'

    async def out_of_turn(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        own = ok_bytes(b'"%s"' % seen.target.encode())
        if (seen.conn, seen.index) != (1, 0):
            writer.write(own)
            await writer.drain()
            return True
        if when == "with-the-answer":
            writer.write(own + stray)
            await writer.drain()
        else:
            writer.write(own)
            await writer.drain()
            await idle.wait()
            writer.write(stray)
            await writer.drain()
        stray_sent.set()
        return True

    async with (
        Upstream(out_of_turn) as primary,
        proxy(tmp_path, {"p": primary.url}, [route()]) as service,
    ):
        first = await answered(service.proxy_port, request("GET", "/1"))
        assert (first.status, first.body) == (200, b'"/1"')
        idle.set()
        await asyncio.wait_for(stray_sent.wait(), 5)
        # Give the proxy the chance to see the stray bytes before the next request; a proxy
        # that drops such a connection closes it at once (the upstream then reads EOF).
        with contextlib.suppress(TimeoutError):
            await wait_until(lambda: primary.open == 0, timeout=1)
        for i in range(2, 5):
            response = await answered(service.proxy_port, request("GET", f"/{i}"))
            if response.status != 502:
                assert (response.status, response.body) == (200, b'"/%d"' % i), i
    assert sorted(set(primary.targets())) == ["/1", "/2", "/3", "/4"]
