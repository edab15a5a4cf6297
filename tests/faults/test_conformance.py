"""HTTP conformance of the request path, seen from outside.

Clients are raw TCP sockets on 127.0.0.1; upstreams are raw HTTP/1.1 servers that parse and
record every request they get (or small aiohttp apps). Each test names one behaviour the
proxy's request path must have: framing that cannot desynchronise a kept-alive connection,
bounded heads and trailers, transfer-codings, request targets, base paths, retries,
connection limits and the timeouts model servers need.
"""

from __future__ import annotations

import asyncio
import gzip
import itertools
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from shadowproxy.control.service import Service
from tests.fakes import RawServer, read_to_eof
from tests.proxyharness import running_service, sample, write_config
from tests.waiting import until as wait_until

READ_LIMIT = 32 * 1024 * 1024  # stream buffer limit of test clients and upstreams
OK_BODY = b'{"prediction": "a"}'
REQUEST_LINE = re.compile(rb"[A-Z]+ /\S* HTTP/1\.1")
MiB = 1024 * 1024


# Client side ----------------------------------------------------------------------------


@dataclass
class Response:
    status: int
    status_line: bytes
    headers: list[tuple[str, str]]  # names lower-cased, in order
    body: bytes
    complete: bool  # the framing said where the body ends, and all of it arrived
    chunked: bool

    def header(self, name: str) -> str | None:
        return next((v for n, v in self.headers if n == name), None)

    def names(self) -> set[str]:
        return {n for n, _ in self.headers}

    def json(self) -> Any:
        return orjson.loads(self.body)


async def _read_chunked(reader: asyncio.StreamReader) -> tuple[bytes, bool]:
    """A chunked body (trailer fields skipped); False when the connection ended inside it."""
    chunks: list[bytes] = []
    try:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0].strip(), 16)
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":
                    pass  # a trailer field: not a header
                return b"".join(chunks), True
            chunks.append(await reader.readexactly(size))
            assert await reader.readexactly(2) == b"\r\n", "broken chunk framing"
    except (asyncio.IncompleteReadError, ConnectionResetError):
        return b"".join(chunks), False


async def read_response(reader: asyncio.StreamReader, method: str = "GET") -> Response | None:
    """One response, 1xx interim answers skipped; None when the connection ended first."""
    while True:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            assert not exc.partial.strip(), f"not an HTTP response: {exc.partial[:200]!r}"
            return None
        except ConnectionResetError:
            return None
        lines = head[:-4].split(b"\r\n")
        status_line = lines[0]
        version, status_text = status_line.split(b" ", 2)[:2]
        assert version in (b"HTTP/1.1", b"HTTP/1.0"), head[:200]
        status = int(status_text)
        headers = []
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers.append((name.decode("latin-1").lower(), value.strip().decode("latin-1")))
        if not 100 <= status < 200:
            break
    codings = [v.lower() for n, v in headers if n == "transfer-encoding"]
    lengths = [v for n, v in headers if n == "content-length"]
    if method == "HEAD" or status in (204, 304):
        return Response(status, status_line, headers, b"", True, False)
    if codings:
        assert codings == ["chunked"], f"a transfer-coding the client never asked for: {codings}"
        body, complete = await _read_chunked(reader)
        return Response(status, status_line, headers, body, complete, True)
    if lengths:
        assert len(lengths) == 1, headers
        try:
            body = await reader.readexactly(int(lengths[0]))
        except asyncio.IncompleteReadError as exc:
            return Response(status, status_line, headers, exc.partial, False, False)
        except ConnectionResetError:
            return Response(status, status_line, headers, b"", False, False)
        return Response(status, status_line, headers, body, True, False)
    return Response(status, status_line, headers, await read_to_eof(reader), True, False)


@asynccontextmanager
async def connect(port: int) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=READ_LIMIT)
    try:
        yield reader, writer
    finally:
        writer.close()


async def send(writer: asyncio.StreamWriter, *pieces: bytes) -> None:
    """Write each piece and wait for it to drain; a proxy that hung up early is not an error."""
    try:
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
    except ConnectionError:
        pass


async def exchange(port: int, *pieces: bytes, timeout: float = 5.0) -> Response | None:
    """Send a request (in one or more writes) on a fresh connection; read one response."""
    method = pieces[0].split(b" ", 1)[0].decode("latin-1")
    async with connect(port) as (reader, writer), asyncio.timeout(timeout):
        await send(writer, *pieces)
        return await read_response(reader, method)


async def answered(port: int, *pieces: bytes, timeout: float = 5.0) -> Response:
    response = await exchange(port, *pieces, timeout=timeout)
    assert response is not None, "the proxy closed the connection without an answer"
    return response


def request(
    method: str,
    target: str,
    body: bytes | None = None,
    headers: bytes = b"",
    *,
    close: bool = True,
    version: str = "HTTP/1.1",
) -> bytes:
    head = f"{method} {target} {version}\r\nHost: proxy.test\r\n".encode() + headers
    if body is not None:
        head += b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body)
    if close:
        head += b"Connection: close\r\n"
    return head + b"\r\n" + (body or b"")


def post(target: str, body: bytes = b"{}", headers: bytes = b"", *, close: bool = True) -> bytes:
    return request("POST", target, body, headers, close=close)


def get(target: str, headers: bytes = b"") -> bytes:
    return request("GET", target, None, headers)


def chunked(*chunks: bytes, trailer: bytes = b"") -> bytes:
    return (
        b"".join(b"%x\r\n%b\r\n" % (len(c), c) for c in chunks if c) + b"0\r\n" + trailer + b"\r\n"
    )


def assert_error_json(response: Response, status: int) -> None:
    assert response.status == status, (response.status_line, response.body[:300])
    assert set(response.json()) == {"error", "request_id"}


# Upstream side ----------------------------------------------------------------------------


@dataclass
class Seen:
    """One request as an upstream parsed it."""

    conn: int  # which connection (1, 2, ... in the order they were accepted)
    index: int  # which request on that connection (0 is the first)
    line: bytes
    headers: list[tuple[str, str]] = field(default_factory=list)  # names lower-cased
    body: bytes = b""
    valid: bool = True

    @property
    def target(self) -> str:
        return self.line.split(b" ")[1].decode("latin-1") if self.valid else "?"

    def header(self, name: str) -> str | None:
        return next((v for n, v in self.headers if n == name), None)

    def names(self) -> set[str]:
        return {n for n, _ in self.headers}


async def _read_request_body(reader: asyncio.StreamReader, seen: Seen) -> bytes:
    coding = (seen.header("transfer-encoding") or "").lower()
    if coding:
        assert coding == "chunked", coding
        chunks = []
        while size := int((await reader.readuntil(b"\r\n")).split(b";", 1)[0].strip(), 16):
            chunks.append(await reader.readexactly(size))
            await reader.readexactly(2)
        while await reader.readuntil(b"\r\n") != b"\r\n":
            pass
        return b"".join(chunks)
    length = seen.header("content-length")
    return await reader.readexactly(int(length)) if length else b""


async def read_request(
    reader: asyncio.StreamReader,
    conn: int,
    index: int,
    *,
    body: bool = True,
    writer: asyncio.StreamWriter | None = None,
) -> Seen | None:
    """The next request on a connection; None at a clean end; ``valid=False`` for garbage.
    With ``writer``, an ``Expect: 100-continue`` is answered as a real server would."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        return Seen(conn, index, exc.partial[:120], valid=False) if exc.partial else None
    except asyncio.LimitOverrunError:
        return Seen(conn, index, b"<no end of head within the limit>", valid=False)
    lines = head[:-4].split(b"\r\n")
    if not REQUEST_LINE.fullmatch(lines[0]):
        return Seen(conn, index, lines[0][:120], valid=False)
    seen = Seen(conn, index, lines[0])
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        seen.headers.append((name.decode("latin-1").lower(), value.strip().decode("latin-1")))
    if body:
        if writer is not None and (seen.header("expect") or "").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        try:
            seen.body = await _read_request_body(reader, seen)
        except (AssertionError, ValueError, asyncio.LimitOverrunError):
            seen.valid = False
    return seen


Answer = Callable[[Seen, asyncio.StreamWriter], Awaitable[bool]]


def ok_bytes(body: bytes = OK_BODY, status: bytes = b"200 OK", extra: bytes = b"") -> bytes:
    """A complete answer with a length; ``extra`` header lines go before Content-Type."""
    return b"HTTP/1.1 %b\r\n%bContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%b" % (
        status,
        extra,
        len(body),
        body,
    )


async def answer_ok(seen: Seen, writer: asyncio.StreamWriter) -> bool:
    """200 with a length, keep-alive unless the request said close."""
    writer.write(ok_bytes())
    await writer.drain()
    return (seen.header("connection") or "").lower() != "close"


def canned(raw: bytes) -> Answer:
    """Answer every request with these bytes, sent in one write."""

    async def answer(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        writer.write(raw)
        await writer.drain()
        return True

    return answer


class Upstream(RawServer):
    """A raw HTTP/1.1 upstream: parses every request on every connection, records it in
    ``seen``, and answers with ``answer`` (which says whether the connection stays open).
    ``open``/``max_open`` count connections open at once."""

    def __init__(self, answer: Answer = answer_ok) -> None:
        super().__init__(self._serve)
        self.answer = answer
        self.seen: list[Seen] = []
        self.open = 0
        self.max_open = 0

    async def __aenter__(self) -> Upstream:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0, limit=READ_LIMIT)
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = self.connections
        self.open += 1
        self.max_open = max(self.max_open, self.open)
        try:
            for index in itertools.count():
                seen = await read_request(reader, conn, index, writer=writer)
                if seen is None:
                    return
                self.seen.append(seen)
                if not seen.valid or not await self.answer(seen, writer):
                    return
        finally:
            self.open -= 1

    def targets(self) -> list[str]:
        return [s.target for s in self.seen]


async def aiohttp_upstream(
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]], **kwargs: Any
) -> TestServer:
    app = web.Application(client_max_size=64 * MiB)
    app.router.add_route("*", "/{tail:.*}", handler)
    server = TestServer(app, host="127.0.0.1", **kwargs)
    await server.start_server()
    return server


# The proxy ----------------------------------------------------------------------------------


def route(
    name: str = "r", primary: str = "p", shadows: tuple[str, ...] = (), **extra: Any
) -> dict[str, Any]:
    return {"name": name, "primary": primary, "shadows": list(shadows), **extra}


@asynccontextmanager
async def proxy(
    tmp_path: Path, upstreams: dict[str, Any], routes: list[dict[str, Any]], **top: Any
) -> AsyncIterator[Service]:
    async with running_service(write_config(tmp_path, upstreams, routes, **top)) as service:
        yield service


def written(service: Service) -> float:
    return sample(service, "shadowproxy_records_total", outcome="written")


def records(tmp_path: Path) -> list[dict[str, Any]]:
    rows = []
    for name in sorted((tmp_path / "records").glob("shadow_log-*.jsonl")):
        rows += [orjson.loads(line) for line in name.read_bytes().splitlines() if line]
    return rows


def total(service: Service, sample_name: str) -> float:
    """The sum of a metric's samples over all label values."""
    return sum(
        s.value
        for metric in service.registry.collect()
        for s in metric.samples
        if s.name == sample_name
    )


# 1. An upstream that answered early is never reused --------------------------------------


class EarlyAnswer:
    """The first request ever gets 413 (keep-alive, with a length) before its body is read;
    the upstream then only drains that connection, keeping any byte that is not body."""

    def __init__(self) -> None:
        self.lines: dict[int, list[bytes]] = {}
        self.foreign: list[bytes] = []  # bytes after the early answer that are not the body
        self.answered_early = False
        self.server = RawServer(self._serve)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = self.server.connections
        lines = self.lines.setdefault(conn, [])
        for index in itertools.count():
            seen = await read_request(reader, conn, index, body=self.answered_early)
            if seen is None:
                return
            lines.append(seen.line)
            if not seen.valid:
                return
            if not self.answered_early:
                self.answered_early = True
                writer.write(ok_bytes(b'{"error": "too large"}', b"413 Content Too Large"))
                await writer.drain()
                while chunk := await reader.read(65536):
                    if chunk.strip(b"x"):
                        self.foreign.append(chunk[:200])
                return
            await answer_ok(seen, writer)


BIG = b"x" * (16 * MiB)
BIG_LIMITS = {"max_body_bytes": 32 * MiB}


async def test_primary_that_answers_early_is_not_reused_for_the_next_request(
    tmp_path: Path,
) -> None:
    early = EarlyAnswer()
    async with (
        early.server,
        proxy(
            tmp_path,
            {"p": {"url": early.server.url, "timeout_ms": 2000}},
            [route()],
            server=BIG_LIMITS,
        ) as service,
    ):
        first = await answered(service.proxy_port, post("/big", BIG), timeout=10)
        assert first.status == 413 and first.body == b'{"error": "too large"}'
        second = await answered(service.proxy_port, post("/next"))
        assert (second.status, second.body) == (200, OK_BODY)
    assert early.foreign == []  # nothing was sent on the connection after its early answer
    assert early.lines == {
        1: [b"POST /big HTTP/1.1"],
        2: [b"POST /next HTTP/1.1"],
    }


async def test_shadow_that_answers_early_is_not_reused_for_the_next_mirror(
    tmp_path: Path,
) -> None:
    early = EarlyAnswer()
    async with (
        Upstream() as primary,
        early.server,
        proxy(
            tmp_path,
            {"p": primary.url, "s": {"url": early.server.url, "timeout_ms": 2000}},
            [route(shadows=("s",), mirror={"max_body_bytes": 32 * MiB})],
            server=BIG_LIMITS,
        ) as service,
    ):
        first = await answered(service.proxy_port, post("/big", BIG), timeout=10)
        assert (first.status, first.body) == (200, OK_BODY)
        await wait_until(lambda: written(service) == 1, timeout=5)
        second = await answered(service.proxy_port, post("/next"))
        assert (second.status, second.body) == (200, OK_BODY)
        await wait_until(lambda: written(service) == 2, timeout=5)
    rows = {row["path"]: row for row in records(tmp_path)}
    assert (rows["/big"]["shadow_status"], rows["/big"]["shadow_error"]) == (413, None)
    assert (rows["/next"]["shadow_status"], rows["/next"]["shadow_error"]) == (200, None)
    assert early.foreign == []
    assert early.lines == {
        1: [b"POST /big HTTP/1.1"],
        2: [b"POST /next HTTP/1.1"],
    }


# 2. Request trailers ------------------------------------------------------------------------


async def test_huge_request_trailer_section_is_refused_while_others_are_served(
    tmp_path: Path,
) -> None:
    async with (
        Upstream() as primary,
        Upstream() as shadow,
        proxy(tmp_path, {"p": primary.url, "s": shadow.url}, [route(shadows=("s",))]) as service,
    ):
        port = service.proxy_port

        async def huge_trailer() -> Response | None:
            async with connect(port) as (reader, writer):
                await send(
                    writer,
                    b"POST /trailer HTTP/1.1\r\nHost: proxy.test\r\nTransfer-Encoding: chunked\r\n"
                    b"Connection: close\r\n\r\n5\r\nhello\r\n0\r\nX-Big: ",
                    *[b"a" * 65536] * 16,  # 1 MiB of one trailer field
                    b"\r\n\r\n",
                )
                return await read_response(reader, "POST")

        async with asyncio.timeout(5):
            refused, normal = await asyncio.gather(huge_trailer(), answered(port, get("/ok")))
        assert (normal.status, normal.body) == (200, OK_BODY)
        assert refused is None or 400 <= refused.status < 500, refused
        await wait_until(lambda: written(service) == 1, timeout=5)
        assert primary.targets() == ["/ok"]
        assert shadow.targets() == ["/ok"]


async def test_small_request_trailer_is_accepted_and_never_becomes_a_header(
    tmp_path: Path,
) -> None:
    async with (
        Upstream() as primary,
        Upstream() as shadow,
        proxy(tmp_path, {"p": primary.url, "s": shadow.url}, [route(shadows=("s",))]) as service,
    ):
        response = await answered(
            service.proxy_port,
            b"POST /t HTTP/1.1\r\nHost: proxy.test\r\nTransfer-Encoding: chunked\r\n"
            b"Connection: close\r\n\r\n" + chunked(b"hello", trailer=b"X-T: 1\r\n"),
        )
        assert (response.status, response.body) == (200, OK_BODY)
        await wait_until(lambda: written(service) == 1, timeout=5)
    for upstream in (primary, shadow):
        (seen,) = upstream.seen
        assert (seen.target, seen.body) == ("/t", b"hello")
        assert "x-t" not in seen.names()


# 3. Upstream response heads are bounded ------------------------------------------------------


HUGE_HEADER = ok_bytes(extra=b"X-Big: " + b"a" * MiB + b"\r\n")
MANY_HEADERS = ok_bytes(extra=b"".join(b"X-H%d: v\r\n" % i for i in range(10_000)))


@pytest.mark.parametrize("answer", [HUGE_HEADER, MANY_HEADERS], ids=["1MiB-value", "10k-headers"])
async def test_primary_with_an_oversized_response_head_gives_502(
    tmp_path: Path, answer: bytes
) -> None:
    async with (
        Upstream(canned(answer)) as primary,
        proxy(tmp_path, {"p": primary.url}, [route()]) as service,
    ):
        response = await answered(service.proxy_port, post("/x"))
        assert_error_json(response, 502)


async def test_shadow_with_an_oversized_response_head_is_a_shadow_error(tmp_path: Path) -> None:
    async with (
        Upstream() as primary,
        Upstream(canned(HUGE_HEADER)) as shadow,
        proxy(tmp_path, {"p": primary.url, "s": shadow.url}, [route(shadows=("s",))]) as service,
    ):
        response = await answered(service.proxy_port, post("/x"), timeout=3)
        assert (response.status, response.body) == (200, OK_BODY)
        await wait_until(lambda: written(service) == 1, timeout=5)
    (row,) = records(tmp_path)
    assert row["shadow_error"] is not None, row  # "protocol" expected


# 4. Response trailers --------------------------------------------------------------------


async def test_response_trailers_never_become_headers(tmp_path: Path) -> None:
    answer = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: Set-Cookie\r\n\r\n"
        b"5\r\nhello\r\n0\r\nSet-Cookie: evil=1\r\nLocation: /x\r\n\r\n"
    )
    async with (
        Upstream(canned(answer)) as primary,
        proxy(tmp_path, {"p": primary.url}, [route()]) as service,
    ):
        response = await answered(service.proxy_port, get("/x"))
    assert (response.status, response.body, response.complete) == (200, b"hello", True)
    assert "set-cookie" not in response.names()
    assert "location" not in response.names()


# 5. Transfer-codings other than chunked ------------------------------------------------------


PLAIN = b'{"prediction": "gzip-coded"}'


async def test_request_with_a_transfer_coding_other_than_chunked_is_refused(
    tmp_path: Path,
) -> None:
    async with (
        Upstream() as primary,
        Upstream() as shadow,
        proxy(tmp_path, {"p": primary.url, "s": shadow.url}, [route(shadows=("s",))]) as service,
    ):
        response = await answered(
            service.proxy_port,
            b"POST /x HTTP/1.1\r\nHost: proxy.test\r\nTransfer-Encoding: gzip, chunked\r\n"
            b"Connection: close\r\n\r\n" + chunked(gzip.compress(PLAIN)),
        )
        assert response.status in (400, 501), response.status_line
        ok = await answered(service.proxy_port, get("/after"))
        assert ok.status == 200
        await wait_until(lambda: written(service) == 1, timeout=5)
    assert primary.targets() == ["/after"]
    assert shadow.targets() == ["/after"]


async def test_response_with_a_transfer_coding_other_than_chunked_is_never_passed_on_coded(
    tmp_path: Path,
) -> None:
    coded = gzip.compress(PLAIN)
    answer = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: gzip, chunked\r\n\r\n" + chunked(coded[:10], coded[10:])
    )
    async with (
        Upstream(canned(answer)) as primary,
        proxy(tmp_path, {"p": primary.url}, [route()]) as service,
    ):
        response = await answered(service.proxy_port, get("/x"))
    if response.status == 502:
        assert_error_json(response, 502)
    else:
        assert (response.status, response.body, response.complete) == (200, PLAIN, True)
        assert response.header("content-encoding") is None


async def test_client_te_header_still_gets_a_close_delimited_answer_whole(tmp_path: Path) -> None:
    body = bytes(range(256)) * 1200  # 300 KB, sent in pieces, ended by the close

    async def close_delimited(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n")
        writer.write(b"Connection: close\r\n\r\n")
        for start in range(0, len(body), 50_000):
            writer.write(body[start : start + 50_000])
            await writer.drain()
        return False

    async with (
        Upstream(close_delimited) as primary,
        proxy(tmp_path, {"p": primary.url}, [route()]) as service,
    ):
        response = await answered(
            service.proxy_port, get("/x", b"TE: gzip\r\nConnection: TE\r\n"), timeout=5
        )
    assert (response.status, response.complete) == (200, True)
    assert response.body == body


# 6. and 7. Request lines the proxy must not forward -----------------------------------------


async def test_http_1_0_request_with_chunked_body_gets_400_and_a_close(tmp_path: Path) -> None:
    async with (
        Upstream() as primary,
        proxy(tmp_path, {"p": primary.url}, [route()]) as service,
        connect(service.proxy_port) as (reader, writer),
    ):
        await send(
            writer,
            b"POST /p HTTP/1.0\r\nHost: proxy.test\r\nConnection: keep-alive\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + chunked(b"hello"),
        )
        async with asyncio.timeout(5):
            response = await read_response(reader, "POST")
            assert response is not None
            assert_error_json(response, 400)
            assert await read_to_eof(reader) == b""  # and the connection is closed
    assert primary.seen == []


@pytest.mark.parametrize(
    "line", [b"GET /a RTSP/1.0", b"SOURCE /a ICE/1.0"], ids=["rtsp", "icecast"]
)
async def test_non_http_protocols_are_never_forwarded(tmp_path: Path, line: bytes) -> None:
    async with (
        Upstream() as primary,
        proxy(tmp_path, {"p": primary.url}, [route()]) as service,
    ):
        response = await exchange(service.proxy_port, line + b"\r\nHost: proxy.test\r\n\r\n")
        assert response is None or 400 <= response.status < 500 or response.status == 505, (
            response.status_line
        )
        ok = await answered(service.proxy_port, get("/after"))
        assert ok.status == 200
    assert primary.targets() == ["/after"]


# 8. Dot segments and encoded slashes cannot escape a route's prefix ------------------------


PREDICT_ONLY = [
    {"name": "r", "match": {"path_prefix": "/predict", "methods": ["POST"]}, "primary": "p"}
]


@pytest.mark.parametrize(
    "target",
    ["/predict/../admin", "/predict/%2e%2e/admin", "/predict%2f..%2fadmin", "/predict/./x"],
)
async def test_paths_escaping_the_route_prefix_get_400_or_404(tmp_path: Path, target: str) -> None:
    async with (
        Upstream() as primary,
        proxy(tmp_path, {"p": primary.url}, PREDICT_ONLY) as service,
    ):
        response = await answered(service.proxy_port, post(target))
        assert response.status in (400, 404), response.status_line
        ok = await answered(service.proxy_port, post("/predict/x"))
        assert (ok.status, ok.body) == (200, OK_BODY)
    assert primary.targets() == ["/predict/x"]


# 9. An upstream URL's path is a base path ----------------------------------------------------


async def test_upstream_url_path_is_a_base_path_for_primary_and_shadow(tmp_path: Path) -> None:
    async with (
        Upstream() as primary,
        Upstream() as shadow,
        proxy(
            tmp_path,
            {"p": primary.url + "/v1/base", "s": shadow.url + "/v1/base"},
            [{**route(shadows=("s",)), "match": {"path_prefix": "/predict"}}],
        ) as service,
    ):
        response = await answered(service.proxy_port, post("/predict?q=1"))
        assert (response.status, response.body) == (200, OK_BODY)
        await wait_until(lambda: written(service) == 1, timeout=5)
    assert primary.targets() == ["/v1/base/predict?q=1"]
    assert shadow.targets() == ["/v1/base/predict?q=1"]
    (row,) = records(tmp_path)
    assert (row["path"], row["query"]) == ("/predict", "q=1")


# 10. Smaller header rules ------------------------------------------------------------------


async def test_expect_header_never_reaches_an_upstream(tmp_path: Path) -> None:
    async with (
        Upstream() as primary,
        Upstream() as shadow,
        proxy(tmp_path, {"p": primary.url, "s": shadow.url}, [route(shadows=("s",))]) as service,
    ):
        response = await answered(
            service.proxy_port, post("/x", b"hello", b"Expect: 100-continue\r\n")
        )
        assert (response.status, response.body) == (200, OK_BODY)
        await wait_until(lambda: written(service) == 1, timeout=5)
    for upstream in (primary, shadow):
        (seen,) = upstream.seen
        assert seen.body == b"hello"
        assert "expect" not in seen.names()


async def test_control_bytes_in_the_reason_phrase_never_reach_the_client(tmp_path: Path) -> None:
    async with (
        Upstream(canned(b"HTTP/1.1 200 O\x01K\r\nContent-Length: 2\r\n\r\nok")) as primary,
        proxy(tmp_path, {"p": primary.url}, [route()]) as service,
    ):
        response = await answered(service.proxy_port, get("/x"))
    assert response.status in (200, 502)
    assert all(0x20 <= byte < 0x7F for byte in response.status_line), response.status_line


async def test_host_with_userinfo_or_path_is_refused_or_never_forwarded(tmp_path: Path) -> None:
    async with (
        Upstream() as primary,
        proxy(tmp_path, {"p": primary.url}, [route()]) as service,
    ):
        response = await answered(
            service.proxy_port,
            b"GET /x HTTP/1.1\r\nHost: a@evil.example/x?y\r\nConnection: close\r\n\r\n",
        )
    if response.status == 400:
        assert primary.seen == []
    else:
        assert response.status == 200
        (seen,) = primary.seen
        forwarded_host = seen.header("x-forwarded-host") or ""
        assert "@" not in forwarded_host and "/" not in forwarded_host, forwarded_host


async def test_header_names_with_underscores_are_not_forwarded(tmp_path: Path) -> None:
    async with (
        Upstream() as primary,
        Upstream() as shadow,
        proxy(tmp_path, {"p": primary.url, "s": shadow.url}, [route(shadows=("s",))]) as service,
    ):
        response = await answered(
            service.proxy_port,
            post("/x", b"hello", b"Transfer_Encoding: chunked\r\nContent_Length: 5\r\n"),
        )
        if response.status == 200:
            await wait_until(lambda: written(service) == 1, timeout=5)
        else:
            assert response.status == 400, response.status_line
    for upstream in (primary, shadow):
        assert len(upstream.seen) == (1 if response.status == 200 else 0)
        for seen in upstream.seen:
            assert seen.body == b"hello"
            assert not seen.names() & {"transfer_encoding", "content_length"}, seen.headers


# 11. A client that stops reading is cut, and frees the upstream ---------------------------


async def test_client_that_stops_reading_is_cut_after_send_timeout(tmp_path: Path) -> None:
    cut = asyncio.Event()

    async def endless_or_ok(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        if seen.target != "/stream":
            return await answer_ok(seen, writer)
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b"1000\r\n" + b"7" * 4096 + b"\r\n"
        try:
            for _ in range(100_000):  # bounded: 400 MB at most
                writer.write(chunk)
                await writer.drain()
        except ConnectionError:
            cut.set()
        return False

    upstream = {"timeout_ms": 10_000, "idle_timeout_ms": 10_000, "max_connections": 1}
    async with (
        Upstream(endless_or_ok) as primary,
        proxy(
            tmp_path,
            {"p": {"url": primary.url, **upstream}},
            [route()],
            server={"send_timeout_s": 1},
        ) as service,
        connect(service.proxy_port) as (reader, writer),
    ):
        await send(writer, request("GET", "/stream"))
        transport = cast(asyncio.Transport, writer.transport)
        transport.pause_reading()  # ...and never reads
        await asyncio.wait_for(cut.wait(), 5)  # the proxy let go of the upstream connection
        ok = await answered(service.proxy_port, get("/ok"))
        assert (ok.status, ok.body) == (200, OK_BODY)
        transport.resume_reading()
        async with asyncio.timeout(5):
            stalled = await read_response(reader)
        # Cut: a reset may discard what was still unread; what did arrive never ends cleanly.
        assert stalled is None or (stalled.status, stalled.complete) == (200, False)


# 12. A large but valid request head ----------------------------------------------------------


async def test_request_head_of_229_kb_in_three_writes_is_served(tmp_path: Path) -> None:
    values = [bytes([ord("a") + i % 26]) * 8000 for i in range(28)]
    head = (
        b"POST /big-head HTTP/1.1\r\nHost: proxy.test\r\n"
        + b"".join(b"X-Big-%02d: %b\r\n" % (i, v) for i, v in enumerate(values))
        + b"Content-Length: 5\r\nConnection: close\r\n\r\nhello"
    )
    third = len(head) // 3
    async with (
        Upstream() as primary,
        proxy(tmp_path, {"p": primary.url}, [route()]) as service,
    ):
        response = await answered(
            service.proxy_port, head[:third], head[third : 2 * third], head[2 * third :]
        )
        assert (response.status, response.body) == (200, OK_BODY)
    (seen,) = primary.seen
    assert seen.body == b"hello"
    assert [seen.header(f"x-big-{i:02d}") for i in range(28)] == [v.decode() for v in values]


# 13. Upstreams that close idle connections ----------------------------------------------------


async def test_requests_spaced_at_the_upstream_keepalive_timeout_all_succeed(
    tmp_path: Path,
) -> None:
    handled = 0

    async def handler(request: web.Request) -> web.Response:
        nonlocal handled
        await request.read()
        handled += 1
        return web.Response(body=OK_BODY, content_type="application/json")

    upstream = await aiohttp_upstream(handler, keepalive_timeout=1.0)
    try:
        url = str(upstream.make_url("")).rstrip("/")
        async with proxy(
            tmp_path, {"p": {"url": url, "timeout_ms": 2000, "keepalive_idle_ms": 500}}, [route()]
        ) as service:
            statuses = []
            for i in range(5):
                if i:
                    await asyncio.sleep(1.0)  # the racy zone: the upstream closes idle at 1.0 s
                statuses.append((await answered(service.proxy_port, post(f"/n{i}"))).status)
            assert statuses == [200] * 5
            assert handled == 5
    finally:
        await upstream.close()


# 14. Retry once, only when nothing can have been processed ----------------------------------


def per_connection(second: Callable[[Seen, asyncio.StreamWriter], Awaitable[bool]]) -> Answer:
    """First request on each connection: 200 keep-alive; later ones: ``second``."""

    async def answer(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        if seen.index == 0:
            writer.write(ok_bytes())
            await writer.drain()
            return True
        return await second(seen, writer)

    return answer


async def close_silently(seen: Seen, writer: asyncio.StreamWriter) -> bool:
    return False  # the whole request was read; the connection closes without a byte


def partial(raw: bytes) -> Answer:
    """Send the start of an answer, then close."""

    async def answer(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        writer.write(raw)
        await writer.drain()
        return False

    return answer


PARTIAL_ANSWERS = {
    "partial-head": b"HTTP/1.1 200 OK\r\nContent-",
    "partial-body": b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"partial"',
}


def attempts(upstream: Upstream, request_id: str) -> int:
    return sum(1 for s in upstream.seen if s.header("x-request-id") == request_id)


def retries(service: Service) -> float:
    return sample(service, "shadowproxy_upstream_retries_total", upstream="p", role="primary")


async def test_request_on_a_reused_connection_closed_unanswered_is_resent_once(
    tmp_path: Path,
) -> None:
    async with (
        Upstream(per_connection(close_silently)) as primary,
        proxy(tmp_path, {"p": primary.url}, [route()]) as service,
    ):
        first = await answered(service.proxy_port, post("/x", headers=b"X-Request-ID: first\r\n"))
        assert first.status == 200
        second = await answered(service.proxy_port, post("/x", headers=b"X-Request-ID: second\r\n"))
        assert (second.status, second.body) == (200, OK_BODY)
        assert retries(service) == 1
    assert attempts(primary, "first") == 1
    assert attempts(primary, "second") == 2
    assert [(s.conn, s.index) for s in primary.seen] == [(1, 0), (1, 1), (2, 0)]


@pytest.mark.parametrize("answer", list(PARTIAL_ANSWERS))
async def test_request_answered_in_part_is_never_resent(tmp_path: Path, answer: str) -> None:
    async with (
        Upstream(per_connection(partial(PARTIAL_ANSWERS[answer]))) as primary,
        proxy(tmp_path, {"p": primary.url}, [route()]) as service,
    ):
        first = await answered(service.proxy_port, post("/x", headers=b"X-Request-ID: first\r\n"))
        assert first.status == 200
        second = await answered(service.proxy_port, post("/x", headers=b"X-Request-ID: second\r\n"))
        if second.status == 200:  # the head was passed on: then the body must end broken
            assert answer == "partial-body" and not second.complete
        else:
            assert_error_json(second, 502)
        assert retries(service) == 0
    assert attempts(primary, "second") == 1


async def test_failure_on_a_new_connection_is_never_resent(tmp_path: Path) -> None:
    async with (
        Upstream(close_silently) as primary,
        proxy(tmp_path, {"p": primary.url}, [route()]) as service,
    ):
        response = await answered(
            service.proxy_port, post("/x", headers=b"X-Request-ID: fresh\r\n")
        )
        assert_error_json(response, 502)
        assert retries(service) == 0
    assert attempts(primary, "fresh") == 1


# 15. Connection limits belong to the upstream, whichever routes use it ---------------------


def held(release: asyncio.Event) -> Answer:
    async def answer(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        await release.wait()
        return await answer_ok(seen, writer)

    return answer


TWO_ROUTES = [("a", "/a"), ("b", "/b")]


async def test_shadow_connection_limit_holds_across_routes(tmp_path: Path) -> None:
    release = asyncio.Event()
    async with (
        Upstream() as primary,
        Upstream(held(release)) as shadow,
        proxy(
            tmp_path,
            {
                "p": primary.url,
                "s": {"url": shadow.url, "timeout_ms": 10_000, "max_connections": 3},
            },
            [
                {**route(name, shadows=("s",)), "match": {"path_prefix": prefix}}
                for name, prefix in TWO_ROUTES
            ],
        ) as service,
    ):
        for _, prefix in TWO_ROUTES:
            for i in range(10):
                response = await answered(service.proxy_port, post(f"{prefix}/{i}"))
                assert response.status == 200
        await wait_until(lambda: shadow.open >= 3, timeout=5)
        release.set()
        await wait_until(
            lambda: written(service) + total(service, "shadowproxy_mirror_dropped_total") == 20,
            timeout=5,
        )
    assert shadow.max_open == 3


async def test_primary_connection_limit_holds_across_routes(tmp_path: Path) -> None:
    async def slow(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(0.3)  # the upstream's own pace: a request takes 300 ms
        return await answer_ok(seen, writer)

    async with (
        Upstream(slow) as primary,
        proxy(
            tmp_path,
            {
                "p": {
                    "url": primary.url,
                    "timeout_ms": 5000,
                    "connect_timeout_ms": 5000,
                    "max_connections": 2,
                }
            },
            [{**route(name), "match": {"path_prefix": prefix}} for name, prefix in TWO_ROUTES],
        ) as service,
    ):
        async with asyncio.timeout(9):
            responses = await asyncio.gather(
                *(
                    answered(service.proxy_port, post(f"{prefix}/{i}"), timeout=9)
                    for _, prefix in TWO_ROUTES
                    for i in range(10)
                )
            )
        assert {r.status for r in responses} <= {200, 503}
        assert any(r.status == 200 for r in responses)
    assert primary.max_open == 2


# 16. Timeouts for model servers ---------------------------------------------------------------


def three_chunks(gap_s: float) -> Answer:
    async def answer(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        for i in range(3):
            if i:
                await asyncio.sleep(gap_s)
            writer.write(b"6\r\nchunk%d\r\n" % i)
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True

    return answer


async def test_stream_with_gaps_longer_than_timeout_ms_but_within_idle_timeout_is_whole(
    tmp_path: Path,
) -> None:
    async with (
        Upstream(three_chunks(1.2)) as primary,
        proxy(
            tmp_path,
            {"p": {"url": primary.url, "timeout_ms": 1000, "idle_timeout_ms": 3000}},
            [route()],
        ) as service,
    ):
        response = await answered(service.proxy_port, get("/stream"), timeout=8)
    assert (response.status, response.chunked, response.complete) == (200, True, True)
    assert response.body == b"chunk0chunk1chunk2"


async def test_stream_with_a_gap_over_idle_timeout_is_aborted(tmp_path: Path) -> None:
    async with (
        Upstream(three_chunks(1.2)) as primary,
        proxy(
            tmp_path,
            {"p": {"url": primary.url, "timeout_ms": 1000, "idle_timeout_ms": 500}},
            [route()],
        ) as service,
    ):
        response = await answered(service.proxy_port, get("/stream"), timeout=8)
    assert (response.status, response.chunked) == (200, True)
    assert not response.complete  # closed without the terminating zero chunk
    assert response.body == b"chunk0"


async def test_head_later_than_timeout_ms_gives_504(tmp_path: Path) -> None:
    async def late_head(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(2.0)
        return await answer_ok(seen, writer)

    async with (
        Upstream(late_head) as primary,
        proxy(
            tmp_path,
            {"p": {"url": primary.url, "timeout_ms": 1000, "idle_timeout_ms": 3000}},
            [route()],
        ) as service,
    ):
        started = time.monotonic()
        response = await answered(service.proxy_port, post("/x"), timeout=8)
        assert_error_json(response, 504)
        assert time.monotonic() - started < 1.9
