"""Unit tests for shadowproxy.httpclient against raw loopback servers.

Each test runs a ``RawServer`` (tests/fakes.py) whose behaviour plays one upstream, and a
``ConnectionPool`` pointed at it; both are closed when the test ends. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager

import pytest

from shadowproxy.httpclient import _HIGH_WATER, ConnectionPool, UpstreamError
from tests.fakes import Behaviour, RawServer

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
IDLE_S = 2.0  # the silence allowed when nothing is expected to go wrong


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One request off the wire: its head (through the blank line) and its body."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    body = await reader.readexactly(length) if length else b""
    return head, body


def answering(response: bytes, log: list[bytes] | None = None) -> Behaviour:
    """Answer every request on a connection with ``response``; log the raw requests."""

    async def behaviour(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head, body = await read_request(reader)
            if log is not None:
                log.append(head + body)
            writer.write(response)
            await writer.drain()

    return behaviour


def port_of(raw: RawServer) -> int:
    assert raw.server is not None
    return int(raw.server.sockets[0].getsockname()[1])


@asynccontextmanager
async def serving(behaviour: Behaviour) -> AsyncIterator[tuple[RawServer, ConnectionPool]]:
    async with RawServer(behaviour) as raw:
        pool = ConnectionPool(raw.url, connect_timeout=2.0)
        try:
            yield raw, pool
        finally:
            await asyncio.wait_for(pool.close(), 5)


async def fetch(
    pool: ConnectionPool,
    method: str = "GET",
    target: str = "/",
    headers: Iterable[tuple[str, str]] = (),
    body: bytes = b"",
) -> tuple[int, bytes]:
    connection = await pool.send(method, target, headers, body, idle_s=IDLE_S)
    try:
        data = await connection.read(IDLE_S)
    except BaseException:
        connection.close()
        raise
    connection.release()
    return connection.status, data


async def expect_error(kind: str, call: object) -> UpstreamError:
    assert asyncio.iscoroutine(call)
    with pytest.raises(UpstreamError) as caught:
        await asyncio.wait_for(call, 5)
    assert caught.value.kind == kind, caught.value
    return caught.value


# 1. The request on the wire ----------------------------------------------------------


async def test_request_bytes_are_exact() -> None:
    log: list[bytes] = []
    async with serving(answering(OK, log)) as (raw, pool):
        host = f"Host: 127.0.0.1:{port_of(raw)}\r\n".encode()
        headers = [("Content-Type", "application/json"), ("X-Trace", "abc"), ("accept", "*/*")]
        assert await fetch(pool, "POST", "/submit?x=1", headers, b'{"a":1}') == (200, b"ok")
        assert await fetch(pool, "POST", "/empty", [("X-B", "2")], b"") == (200, b"ok")
        assert await fetch(pool, "GET", "/get", [("X-C", "3")], b"") == (200, b"ok")
        assert await fetch(pool, "DELETE", "/d", [], b"xyz") == (200, b"ok")
        assert await fetch(pool, "PUT", "/p", [], b"") == (200, b"ok")
    assert log == [
        b"POST /submit?x=1 HTTP/1.1\r\n"
        + host
        + b"Content-Type: application/json\r\nX-Trace: abc\r\naccept: */*\r\n"
        + b'Content-Length: 7\r\n\r\n{"a":1}',
        b"POST /empty HTTP/1.1\r\n" + host + b"X-B: 2\r\nContent-Length: 0\r\n\r\n",
        b"GET /get HTTP/1.1\r\n" + host + b"X-C: 3\r\n\r\n",
        b"DELETE /d HTTP/1.1\r\n" + host + b"Content-Length: 3\r\n\r\nxyz",
        b"PUT /p HTTP/1.1\r\n" + host + b"Content-Length: 0\r\n\r\n",
    ]
    assert raw.connections == 1


# 2./3. Keep-alive and body framing ------------------------------------------------------


@pytest.mark.parametrize(
    ("response", "body", "connections"),
    [
        pytest.param(OK, b"ok", 1, id="http11-content-length-reused"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
            b"hello world",
            1,
            id="http11-chunked-dechunked-and-reused",
        ),
        pytest.param(b"HTTP/1.1 204 No Content\r\n\r\n", b"", 1, id="http11-204-no-length-reused"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
            b"ok",
            2,
            id="connection-close-not-reused",
        ),
        pytest.param(
            b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", b"ok", 2, id="http10-not-reused"
        ),
        pytest.param(
            b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok",
            b"ok",
            1,
            id="http10-keep-alive-reused",
        ),
    ],
)
async def test_keep_alive_reuse(response: bytes, body: bytes, connections: int) -> None:
    # The server keeps every connection open and answers again: only the client decides.
    async with serving(answering(response)) as (raw, pool):
        assert await fetch(pool, "GET", "/one") == (int(response[9:12]), body)
        assert await fetch(pool, "GET", "/two") == (int(response[9:12]), body)
        assert raw.connections == connections


async def test_chunked_body_is_dechunked_and_headers_are_raw() -> None:
    response = (
        b"HTTP/1.1 201 Created Here\r\nX-One: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n1;ext=1\r\nd\r\n10\r\n0123456789abcdef\r\n0\r\nX-Trailer: t\r\n\r\n"
    )
    async with serving(answering(response)) as (_, pool):
        connection = await pool.send("GET", "/", [], b"", idle_s=IDLE_S)
        assert connection.status == 201
        assert connection.reason == "Created Here"
        assert connection.headers[:2] == [(b"X-One", b"a"), (b"Transfer-Encoding", b"chunked")]
        assert connection.content_length is None
        assert await connection.read(IDLE_S) == b"abcd0123456789abcdef"
        connection.release()


async def test_body_until_close_is_read_whole_and_not_reused() -> None:
    pieces = [bytes([65 + i]) * 20_000 for i in range(5)]

    async def until_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n")
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
        # returning closes the connection (RawServer), which ends the body

    async with serving(until_close) as (raw, pool):
        connection = await pool.send("GET", "/", [], b"", idle_s=IDLE_S)
        assert connection.status == 200
        assert connection.content_length is None
        assert await connection.read(IDLE_S) == b"".join(pieces)
        connection.release()
        assert await fetch(pool) == (200, b"".join(pieces))
        assert raw.connections == 2


# 4. HEAD -------------------------------------------------------------------------------


async def test_head_answer_completes_at_once_and_is_not_reused() -> None:
    log: list[bytes] = []
    async with serving(answering(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", log)) as (
        raw,
        pool,
    ):
        connection = await pool.send("HEAD", "/h", [], b"", idle_s=IDLE_S)
        assert connection.status == 200
        assert connection.content_length == 10
        # A small idle_s: a client waiting for the 10 promised bytes would time out here.
        assert await connection.read(0.5) == b""
        assert await connection.read_chunk(0.5) == b""
        connection.release()
        connection = await pool.send("HEAD", "/h", [], b"", idle_s=IDLE_S)
        assert await connection.read(0.5) == b""
        connection.release()
        assert raw.connections == 2
    assert log[0].startswith(b"HEAD /h HTTP/1.1\r\n")
    assert b"Content-Length" not in log[0]


# 5. 100 Continue -----------------------------------------------------------------------


async def test_100_continue_then_the_real_answer() -> None:
    async def continuing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            writer.write(b"HTTP/1.1 100 Continue\r\nX-Interim: yes\r\n\r\n")
            await writer.drain()
            writer.write(b"HTTP/1.1 200 OK\r\nX-Final: yes\r\nContent-Length: 4\r\n\r\nreal")
            await writer.drain()

    async with serving(continuing) as (raw, pool):
        connection = await pool.send("POST", "/", [], b"{}", idle_s=IDLE_S)
        assert connection.status == 200
        assert connection.reason == "OK"
        assert connection.headers == [(b"X-Final", b"yes"), (b"Content-Length", b"4")]
        assert connection.content_length == 4
        assert await connection.read(IDLE_S) == b"real"
        connection.release()
        # The interim answer left nothing behind: the connection carries the next exchange.
        assert await fetch(pool, "POST", "/", [], b"{}") == (200, b"real")
        assert raw.connections == 1


# 6. Errors -----------------------------------------------------------------------------


async def test_connect_refused_is_connect() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    pool = ConnectionPool(f"http://127.0.0.1:{port}", connect_timeout=2.0)
    try:
        await expect_error("connect", pool.send("GET", "/", [], b"", idle_s=IDLE_S))
    finally:
        await asyncio.wait_for(pool.close(), 5)


async def test_silent_server_is_timeout_after_idle_s_and_the_connection_is_closed() -> None:
    closed = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await reader.read()  # EOF: the client gave up and closed
        closed.set()

    async with serving(silent) as (_, pool):
        loop = asyncio.get_running_loop()
        started = loop.time()
        await expect_error("timeout", pool.send("GET", "/", [], b"", idle_s=0.2))
        elapsed = loop.time() - started
        assert 0.18 <= elapsed < 1.5, elapsed
        await asyncio.wait_for(closed.wait(), 5)


async def test_timeout_while_reading_the_body() -> None:
    async def stalls(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345")
        await writer.drain()
        await reader.read()

    async with serving(stalls) as (_, pool):
        connection = await pool.send("GET", "/", [], b"", idle_s=IDLE_S)
        try:
            assert await connection.read_chunk(IDLE_S) == b"12345"
            await expect_error("timeout", connection.read_chunk(0.2))
            await expect_error("timeout", connection.read(0.2))
        finally:
            connection.close()


async def test_total_s_bounds_an_answer_that_keeps_dripping() -> None:
    """Each piece arrives well within any idle bound; only the whole-exchange deadline ends it."""

    async def drips(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(200):  # bounded: 10 s at most
            writer.write(b"1\r\nx\r\n")
            await writer.drain()
            await asyncio.sleep(0.05)

    async with serving(drips) as (_, pool):
        loop = asyncio.get_running_loop()
        started = loop.time()
        connection = await pool.send("GET", "/", [], b"", idle_s=None, total_s=0.4)
        try:
            pieces = 0

            async def drain() -> None:
                nonlocal pieces
                while await connection.read_chunk(None):
                    pieces += 1

            await expect_error("timeout", drain())
        finally:
            connection.close()
        assert pieces >= 2  # the drip was flowing: the deadline, not silence, ended it
        assert 0.35 <= loop.time() - started < 3.0


@pytest.mark.parametrize("how", ["close", "abort"])
async def test_close_before_any_answer_is_reset(how: str) -> None:
    async def hangs_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        if how == "abort":
            writer.transport.abort()
        # otherwise returning closes the connection gracefully

    async with serving(hangs_up) as (_, pool):
        await expect_error("reset", pool.send("GET", "/", [], b"", idle_s=IDLE_S))


@pytest.mark.parametrize("reader_name", ["read", "read_chunk"])
async def test_close_inside_the_body_is_protocol(reader_name: str) -> None:
    async def short(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
        await writer.drain()
        # returning closes the connection after 10 of the 100 promised bytes

    async with serving(short) as (_, pool):
        connection = await pool.send("GET", "/", [], b"", idle_s=IDLE_S)
        assert connection.status == 200
        assert connection.content_length == 100
        try:
            if reader_name == "read":
                await expect_error("protocol", connection.read(IDLE_S))
            else:
                got = b""
                with pytest.raises(UpstreamError) as caught:
                    while chunk := await asyncio.wait_for(connection.read_chunk(IDLE_S), 5):
                        got += chunk
                assert caught.value.kind == "protocol"
                assert got == b"0123456789"
        finally:
            connection.close()


@pytest.mark.parametrize(
    "response",
    [
        pytest.param(b"NOT HTTP\r\n\r\n", id="garbage"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n0\r\n\r\n",
            id="content-length-and-transfer-encoding",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\nhello",
            id="transfer-encoding-and-content-length",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok",
            id="two-content-lengths",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nokk",
            id="two-different-content-lengths",
        ),
        pytest.param(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
            id="101-switching-protocols",
        ),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\nok", id="bad-content-length"),
    ],
)
async def test_malformed_answer_is_protocol_and_closes(response: bytes) -> None:
    closed = asyncio.Event()

    async def malformed(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(response)
        await writer.drain()
        await reader.read()  # keep the connection open: the error must come from the bytes
        closed.set()

    async with serving(malformed) as (raw, pool):
        await expect_error("protocol", pool.send("GET", "/", [], b"", idle_s=IDLE_S))
        await asyncio.wait_for(closed.wait(), 5)  # the client dropped the connection
        assert raw.connections == 1


# 7. Header injection -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "headers"),
    [
        pytest.param("/", [("X-Evil", "a\r\nX-Injected: 1")], id="crlf-in-value"),
        pytest.param("/", [("X-Evil", "a\nX-Injected: 1")], id="lf-in-value"),
        pytest.param("/", [("X-Evil", "a\rb")], id="cr-in-value"),
        pytest.param("/", [("X-Evil\r\nX-Injected", "1")], id="crlf-in-name"),
        pytest.param("/ HTTP/1.1\r\nX-Injected: 1\r\nX:", [], id="crlf-in-target"),
    ],
)
async def test_cr_or_lf_in_the_request_is_refused_before_sending(
    target: str, headers: list[tuple[str, str]]
) -> None:
    log: list[bytes] = []
    async with serving(answering(OK, log)) as (raw, pool):
        await expect_error("protocol", pool.send("GET", target, headers, b"", idle_s=IDLE_S))
        assert raw.connections == 0
        # A clean request afterwards is the only thing the server ever sees.
        assert await fetch(pool, "GET", "/clean") == (200, b"ok")
        assert raw.connections == 1
    assert len(log) == 1
    assert log[0].startswith(b"GET /clean HTTP/1.1\r\n")
    assert b"Injected" not in log[0]


# 8./9./10. Large bodies and backpressure -----------------------------------------------

BIG_RESPONSE = random.Random(8).randbytes(4 * 1024 * 1024)


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_large_answer_read_slowly_arrives_intact_with_bounded_buffering(
    framing: str,
) -> None:
    async def big(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        if framing == "chunked":
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(BIG_RESPONSE))
        step = 64 * 1024
        for start in range(0, len(BIG_RESPONSE), step):
            piece = BIG_RESPONSE[start : start + step]
            if framing == "chunked":
                writer.write(b"%x\r\n%b\r\n" % (len(piece), piece))
            else:
                writer.write(piece)
            await writer.drain()
        if framing == "chunked":
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        await reader.read()

    async with serving(big) as (_, pool):
        connection = await pool.send("GET", "/big", [], b"", idle_s=IDLE_S)
        received = bytearray()
        peak = 0
        try:
            while True:
                peak = max(peak, connection._buffered)
                chunk = await connection.read_chunk(IDLE_S)
                if not chunk:
                    break
                received += chunk
                await asyncio.sleep(0.002)  # a slow consumer, on purpose
        finally:
            connection.close()
        assert len(received) == len(BIG_RESPONSE)
        assert bytes(received) == BIG_RESPONSE
        # Reading paused: the buffer reached the high-water mark but never held much more than
        # it plus one socket read; and it resumed, or the body could not have completed.
        assert _HIGH_WATER <= peak <= _HIGH_WATER + 512 * 1024, peak


async def test_large_request_body_is_delivered_intact() -> None:
    payload = random.Random(9).randbytes(3 * 1024 * 1024)
    bodies: list[bytes] = []

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            _, body = await read_request(reader)
            bodies.append(body)
            size = b"%d" % len(body)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(size), size))
            await writer.drain()

    async with serving(sink) as (raw, pool):
        assert await fetch(pool, "POST", "/upload", [], payload) == (200, b"3145728")
        assert await fetch(pool, "POST", "/small", [], b"x") == (200, b"1")
        assert raw.connections == 1
    assert len(bodies) == 2
    assert len(bodies[0]) == len(payload)
    assert bodies[0] == payload
    assert bodies[1] == b"x"


async def test_upstream_that_never_reads_the_body_times_out_and_close_is_prompt() -> None:
    payload = b"z" * (8 * 1024 * 1024)
    never = asyncio.Event()

    async def deaf(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await never.wait()  # cancelled when the server shuts down

    async with serving(deaf) as (_, pool):
        loop = asyncio.get_running_loop()
        started = loop.time()
        await expect_error("timeout", pool.send("POST", "/", [], payload, idle_s=0.3))
        assert loop.time() - started < 3.0
        started = loop.time()
        await asyncio.wait_for(pool.close(), 5)
        assert loop.time() - started < 0.5
        assert not pool.connections


# 11. Bytes on an idle connection -------------------------------------------------------


async def test_bytes_on_an_idle_connection_make_it_unusable() -> None:
    go = asyncio.Event()
    first_closed = asyncio.Event()
    accepted = 0

    async def chatty(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        if accepted == 1:
            await read_request(reader)
            writer.write(OK)
            await writer.drain()
            await go.wait()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstale")
            await writer.drain()
            await reader.read()  # EOF: the client dropped the connection
            first_closed.set()
        else:
            await answering(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfresh")(reader, writer)

    async with serving(chatty) as (raw, pool):
        assert await fetch(pool) == (200, b"ok")
        go.set()
        await asyncio.wait_for(first_closed.wait(), 5)
        assert await fetch(pool) == (200, b"fresh")
        assert raw.connections == 2


# 12. A closed pool ---------------------------------------------------------------------


async def test_send_after_close_is_connect_and_idle_connections_are_closed() -> None:
    closed = asyncio.Event()

    async def once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(OK)
        await writer.drain()
        await reader.read()
        closed.set()

    async with serving(once) as (raw, pool):
        assert await fetch(pool) == (200, b"ok")
        await asyncio.wait_for(pool.close(), 5)
        await asyncio.wait_for(closed.wait(), 5)  # the kept-alive connection was closed
        await expect_error("connect", pool.send("GET", "/", [], b"", idle_s=IDLE_S))
        assert raw.connections == 1
