"""The client-facing HTTP/1.1 server on its own: framing, order, deadlines, odd clients.

Each test runs an ``HttpServer`` on loopback with a small handler and talks raw bytes to
it. The fault-suite fixture checks that no task or socket is left behind afterwards.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import orjson
import pytest

from shadowproxy.httpserver import BodyTooLarge, HttpServer, Request

Handler = Callable[[Request], Awaitable[None]]


async def echo(request: Request) -> None:
    """Answers with the method, target and body it received."""
    body = await request.read_body(1 << 20, 2.0)
    payload = orjson.dumps(
        {"method": request.method, "target": request.target, "body": body.decode()}
    )
    request.respond(200, None, [("Content-Type", "application/json")], payload)


@asynccontextmanager
async def running(
    handler: Handler = echo, **options: object
) -> AsyncIterator[tuple[HttpServer, list[str]]]:
    rejects: list[str] = []
    settings: dict[str, object] = {
        "header_timeout_s": 2.0,
        "keepalive_timeout_s": 5.0,
        "max_connections": 100,
        "max_body_bytes": lambda: 1000,
        "on_reject": rejects.append,
    }
    settings.update(options)
    server = HttpServer(handler, **settings)  # type: ignore[arg-type]
    await server.start("127.0.0.1", 0)
    try:
        yield server, rejects
    finally:
        await asyncio.wait_for(server.close(2.0), 10)


async def connect(server: HttpServer) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", server.port)


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One Content-Length framed response: status, headers (lower-cased names), body."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    lines = head.decode().split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    body = await asyncio.wait_for(reader.readexactly(length), 5) if length else b""
    return status, headers, body


async def closed_by_server(reader: asyncio.StreamReader) -> bool:
    try:
        return await asyncio.wait_for(reader.read(), 5) == b""
    except ConnectionResetError:
        return True


async def test_keep_alive_serves_requests_in_turn_with_date_and_length() -> None:
    async with running() as (server, _):
        reader, writer = await connect(server)
        for i in range(3):
            writer.write(b"POST /p?i=%d HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi" % i)
            status, headers, body = await read_response(reader)
            assert status == 200
            assert "date" in headers and "connection" not in headers
            assert orjson.loads(body) == {"method": "POST", "target": f"/p?i={i}", "body": "hi"}
        writer.close()


async def test_pipelined_requests_run_one_at_a_time_and_answer_in_order() -> None:
    started: list[str] = []
    release = asyncio.Event()

    async def handler(request: Request) -> None:
        started.append(request.target)
        if request.target == "/1":
            await release.wait()
        await echo(request)

    async with running(handler) as (server, _):
        reader, writer = await connect(server)
        writer.write(
            b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n"
            b"POST /2 HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc"
            + b"".join(b"GET /%d HTTP/1.1\r\nHost: a\r\n\r\n" % i for i in range(3, 200))
        )
        await asyncio.sleep(0.1)
        assert started == ["/1"]  # the second waits for the first
        release.set()
        answers = [orjson.loads((await read_response(reader))[2]) for _ in range(199)]
        assert [a["target"] for a in answers] == [f"/{i}" for i in range(1, 200)]
        assert answers[1]["body"] == "abc"
        writer.close()


@pytest.mark.parametrize(
    ("connection", "kept"), [(b"", False), (b"Connection: keep-alive\r\n", True)]
)
async def test_http_1_0_closes_unless_asked_to_keep_alive(connection: bytes, kept: bool) -> None:
    async with running() as (server, _):
        reader, writer = await connect(server)
        writer.write(b"GET /x HTTP/1.0\r\n" + connection + b"\r\n")
        status, headers, _ = await read_response(reader)
        assert status == 200
        assert headers["connection"] == ("keep-alive" if kept else "close")
        if kept:
            writer.write(b"GET /y HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            assert (await read_response(reader))[0] == 200
        else:
            assert await closed_by_server(reader)
        writer.close()


async def test_expect_100_continue_is_answered_when_the_body_is_wanted() -> None:
    async with running() as (server, _):
        reader, writer = await connect(server)
        writer.write(
            b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n"
        )
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"data")
        status, _, body = await read_response(reader)
        assert status == 200 and orjson.loads(body)["body"] == "data"
        writer.close()


async def test_chunked_request_body_is_decoded() -> None:
    async with running() as (server, _):
        reader, writer = await connect(server)
        writer.write(
            b"POST /p HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
        )
        status, _, body = await read_response(reader)
        assert status == 200 and orjson.loads(body)["body"] == "abcde"
        writer.close()


async def stream_two_chunks(request: Request) -> None:
    request.start(200, None, [("Content-Type", "text/plain")], None)
    await request.send(b"one ")
    await request.send(b"two")
    request.finish()


async def test_streamed_answer_is_chunked_for_1_1_and_close_delimited_for_1_0() -> None:
    async with running(stream_two_chunks) as (server, _):
        reader, writer = await connect(server)
        writer.write(b"GET /s HTTP/1.1\r\nHost: a\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert b"Transfer-Encoding: chunked\r\n" in head
        body = await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), 5)
        assert body == b"4\r\none \r\n3\r\ntwo\r\n0\r\n\r\n"
        writer.write(b"GET /s HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")  # cannot be kept
        rest = await asyncio.wait_for(reader.read(), 5)
        assert b"Connection: close\r\n" in rest and rest.endswith(b"\r\n\r\none two")
        writer.close()


async def test_head_and_204_carry_no_body_and_keep_the_connection() -> None:
    async def handler(request: Request) -> None:
        status = 204 if request.target == "/empty" else 200
        request.respond(status, None, [], b"" if status == 204 else b"0123456789")

    async with running(handler) as (server, _):
        reader, writer = await connect(server)
        writer.write(b"HEAD /x HTTP/1.1\r\nHost: a\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert b"Content-Length: 10\r\n" in head
        writer.write(b"GET /empty HTTP/1.1\r\nHost: a\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 204 ") and b"Content-Length" not in head
        writer.write(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")  # nothing stray came before it
        status, _, body = await read_response(reader)
        assert (status, body) == (200, b"0123456789")
        writer.close()


async def test_broken_chunked_body_gets_400_and_the_handler_stops_waiting() -> None:
    seen: list[str] = []

    async def handler(request: Request) -> None:
        try:
            await request.read_body(1000, 5.0)
        except ConnectionResetError:
            seen.append("body broke off")
            raise

    async with running(handler) as (server, rejects):
        reader, writer = await connect(server)
        writer.write(b"POST /p HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nab")
        await asyncio.sleep(0.1)
        writer.write(b"c\r\nzz\r\n")  # not a chunk size
        status, headers, body = await read_response(reader)
        assert status == 400 and headers["connection"] == "close"
        assert set(orjson.loads(body)) == {"error", "request_id"}
        assert await closed_by_server(reader)
        assert seen == ["body broke off"] and rejects == ["malformed"]
        writer.close()


async def test_early_answer_to_a_large_body_is_read_by_the_client() -> None:
    async def handler(request: Request) -> None:
        try:
            await request.read_body(1000, 2.0)
        except BodyTooLarge:
            request.respond(413, None, [], b"too large", close=True)

    async with running(handler) as (server, _):
        reader, writer = await connect(server)
        writer.write(b"POST /p HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(20):  # keeps sending after the answer: no reset before it is read
            writer.write(b"100\r\n" + b"x" * 256 + b"\r\n")
            await writer.drain()
        status, headers, body = await read_response(reader)
        assert (status, headers["connection"], body) == (413, "close", b"too large")
        assert await closed_by_server(reader)
        writer.close()


async def test_upgrade_is_answered_as_plain_http_then_closed() -> None:
    async with running() as (server, _):
        reader, writer = await connect(server)
        writer.write(
            b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
            b"\x81\x05hello"
        )
        status, headers, _ = await read_response(reader)
        assert status == 200 and headers["connection"] == "close"
        assert await closed_by_server(reader)
        writer.close()


async def test_http_2_0_gets_505() -> None:
    async with running() as (server, rejects):
        reader, writer = await connect(server)
        writer.write(b"GET /x HTTP/2.0\r\nHost: a\r\n\r\n")
        status, _, body = await read_response(reader)
        assert status == 505 and "HTTP/2.0" in orjson.loads(body)["error"]
        assert rejects == ["malformed"]
        writer.close()


async def test_handler_failure_gets_500_and_is_counted() -> None:
    async def broken(request: Request) -> None:
        raise RuntimeError("bug")

    async with running(broken) as (server, rejects):
        reader, writer = await connect(server)
        writer.write(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
        status, _, body = await read_response(reader)
        assert status == 500 and orjson.loads(body)["error"] == "internal error"
        assert await closed_by_server(reader)
        assert rejects == ["internal_error"]
        writer.close()


async def test_client_leaving_mid_body_releases_the_handler() -> None:
    outcome: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def handler(request: Request) -> None:
        try:
            await request.read_body(1000, 30.0)
        except ConnectionResetError:
            outcome.set_result("reset")
            raise

    async with running(handler) as (server, _):
        _, writer = await connect(server)
        writer.write(b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 500\r\n\r\n" + b"x" * 10)
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.transport.abort()
        assert await asyncio.wait_for(outcome, 5) == "reset"


async def test_close_finishes_in_flight_answers_and_drops_idle_connections() -> None:
    entered = asyncio.Event()
    release = asyncio.Event()

    async def slow(request: Request) -> None:
        entered.set()
        await release.wait()
        request.respond(200, None, [], b"done")

    server = HttpServer(
        slow, header_timeout_s=2.0, keepalive_timeout_s=5.0, max_connections=10,
        max_body_bytes=lambda: 1000,
    )  # fmt: skip
    await server.start("127.0.0.1", 0)
    port = server.port
    busy_reader, busy_writer = await connect(server)
    idle_reader, idle_writer = await connect(server)
    busy_writer.write(b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n")
    await asyncio.wait_for(entered.wait(), 5)
    closing = asyncio.ensure_future(server.close(5.0))
    assert await closed_by_server(idle_reader)  # idle: closed at once
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)  # no longer listening
    release.set()
    status, headers, body = await read_response(busy_reader)
    assert (status, headers["connection"], body) == (200, "close", b"done")
    await asyncio.wait_for(closing, 10)
    busy_writer.close()
    idle_writer.close()


async def test_client_that_half_closes_after_its_request_gets_the_answer() -> None:
    async with running() as (server, _):
        reader, writer = await connect(server)
        writer.write(b"GET /a HTTP/1.1\r\nHost: a\r\n\r\nGET /b HTTP/1.1\r\nHost: a\r\n\r\n")
        writer.write_eof()
        answers = [orjson.loads((await read_response(reader))[2]) for _ in range(2)]
        assert [a["target"] for a in answers] == ["/a", "/b"]
        assert await closed_by_server(reader)
        writer.close()


async def test_a_head_that_never_ends_is_cut_at_the_size_limit() -> None:
    """A header line that keeps growing is refused once the head passes 256 KB (memory bound)."""
    async with running() as (server, rejects):
        reader, writer = await connect(server)
        writer.write(b"GET /x HTTP/1.1\r\nHost: a\r\nX-Big: ")
        await writer.drain()
        try:
            for _ in range(8):  # 512 KB of one header value, no line end
                writer.write(b"b" * 65536)
                await writer.drain()
                await asyncio.sleep(0.01)
        except ConnectionResetError:
            pass  # cut while still sending
        status, _, body = await read_response(reader)
        assert status == 400 and orjson.loads(body)["error"] == "request head too large"
        assert rejects == ["malformed"]
        writer.close()
