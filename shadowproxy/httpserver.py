"""The client-facing HTTP/1.1 server: llhttp parsing (httptools), deadlines, one handler per request.

Built for a proxy's request path rather than for applications: a request is a few slots,
a response is one write, and per-connection deadlines are timestamps that one sweeper
task checks, so a keep-alive request arms no timer.

Hostile clients meet the limits nginx has: a request head must arrive within
``header_timeout_s`` of its first byte (slowloris), an idle keep-alive connection is
closed after ``keepalive_timeout_s``, at most ``max_connections`` are open, and anything
llhttp or the checks below find ambiguous (CL+TE, duplicate Content-Length, obs-fold, bare
LF, missing or duplicate Host, oversized or non-ASCII heads, CONNECT) gets a JSON 400 and
a closed connection before any handler runs. Pipelined requests are answered in order.
"""

from __future__ import annotations

import asyncio
import re
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from email.utils import formatdate
from typing import Any, cast
from urllib.parse import unquote

import httptools
import orjson
import structlog

from shadowproxy.headers import new_request_id
from shadowproxy.tasks import TaskGroup

log = structlog.get_logger("shadowproxy.httpserver")

MAX_LINE = 8190  # request line, like aiohttp's and nginx's default large_client_header_buffers
MAX_FIELD = 8190  # one header line
MAX_HEADERS = 128
MAX_HEAD = 256 * 1024  # bytes buffered while a head is incomplete
LINGER_S = 2.0  # after an early answer, read (and drop) what the client still sends this long
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")
_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    408: "Request Timeout",
    413: "Content Too Large",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
}
_NO_BODY_STATUS = frozenset({204, 304})


class BodyTooLarge(Exception):
    pass


class _Reject(Exception):
    """A request the server answers itself (400/505) and then closes the connection."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def assert_c_parser() -> None:
    """Refuse to run without llhttp: httptools' parser must be the compiled one."""
    module = getattr(httptools.HttpRequestParser, "__module__", "")
    compiled = getattr(sys.modules.get(module), "__file__", "") or ""
    if module != "httptools.parser.parser" or not compiled.endswith((".so", ".pyd")):
        raise RuntimeError("httptools' C HTTP parser (llhttp) is not available; refusing to start")


def error_body(message: str, request_id: str | None = None) -> bytes:
    """The JSON body of every error answer: what went wrong and the request's id."""
    return orjson.dumps({"error": message, "request_id": request_id or new_request_id()})


class _DateHeader:
    """The Date header value, formatted at most once a second."""

    __slots__ = ("_second", "_value")

    def __init__(self) -> None:
        self._second = 0
        self._value = ""

    def now(self) -> str:
        second = int(time.time())
        if second != self._second:
            self._second = second
            self._value = formatdate(second, usegmt=True)
        return self._value


_date = _DateHeader()


class Request:
    """One request as received, and the way to answer it (``respond`` or ``start``/``send``/``finish``)."""

    __slots__ = (
        "_broken",
        "_chunks",
        "_complete",
        "_conn",
        "_continue",
        "_size",
        "_too_large",
        "_waiter",
        "body_limit",
        "content_length",
        "finished",
        "headers",
        "host",
        "keep_alive",
        "method",
        "remote",
        "started",
        "status",
        "target",
        "version",
    )
    scheme = "http"

    def __init__(
        self,
        conn: _Connection,
        method: str,
        target: str,
        version: str,
        headers: list[tuple[str, str]],
        host: str | None,
        content_length: int | None,
        keep_alive: bool,
        expect_continue: bool,
    ) -> None:
        self._conn = conn
        self.method = method
        self.target = target  # the raw request target: path and query as sent
        self.version = version
        self.headers = headers
        self.host = host
        self.content_length = content_length
        self.keep_alive = keep_alive
        self.remote = conn.remote
        self.body_limit = conn.server.max_body_bytes()
        self._continue = expect_continue
        self._chunks: list[bytes] = []
        self._size = 0
        self._complete = False
        self._broken = False
        self._too_large = content_length is not None and content_length > self.body_limit
        self._waiter: asyncio.Future[None] | None = None
        self.started = False  # the response head is written
        self.finished = False  # the whole response is written
        self.status = 0

    # What was asked ---------------------------------------------------------
    @property
    def path(self) -> str:
        raw = self.target.partition("?")[0]
        return unquote(raw) if "%" in raw else raw

    def header(self, lower_name: str) -> str | None:
        for name, value in self.headers:
            if name.lower() == lower_name:
                return value
        return None

    async def read_body(self, limit: int, idle_timeout_s: float) -> bytes:
        """The whole body, at most ``limit`` bytes; each chunk must arrive within the idle timeout."""
        limit = min(limit, self.body_limit)
        if self._too_large or (self.content_length is not None and self.content_length > limit):
            raise BodyTooLarge
        if self._continue:
            self._continue = False
            self._conn.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        while not self._complete:
            if self._broken or self._conn.closed:
                raise ConnectionResetError("client left, or its body broke off")
            self._waiter = self._conn.loop.create_future()
            try:
                async with asyncio.timeout(idle_timeout_s):
                    await self._waiter
            finally:
                self._waiter = None
            if self._too_large or self._size > limit:
                raise BodyTooLarge
        return self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)

    # Fed by the connection ----------------------------------------------------
    def _body_chunk(self, chunk: bytes) -> None:
        if self._too_large:
            return
        self._size += len(chunk)
        if self._size > self.body_limit:
            self._too_large = True
            self._chunks.clear()
        else:
            self._chunks.append(chunk)
        self._wake()

    def _body_complete(self) -> None:
        self._complete = True
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _fail(self) -> None:
        self._broken = True
        self._wake()

    # Answering ----------------------------------------------------------------
    def respond(
        self,
        status: int,
        reason: str | None,
        headers: list[tuple[str, str]],
        body: bytes,
        *,
        close: bool = False,
    ) -> None:
        """The whole response in one write."""
        if close:
            self.keep_alive = False
        head = self._head(status, reason, headers, len(body), chunked=False)
        self.finished = True
        if self.method == "HEAD" or status in _NO_BODY_STATUS:
            self._conn.write(head)
        else:
            self._conn.write(head + body)

    def start(
        self,
        status: int,
        reason: str | None,
        headers: list[tuple[str, str]],
        content_length: int | None,
    ) -> None:
        """Send the head of a streamed response (chunked when the length is unknown)."""
        chunked = content_length is None and self.version == "1.1"
        if content_length is None and not chunked:
            self.keep_alive = False  # HTTP/1.0: the close ends the body
        self._conn.write(self._head(status, reason, headers, content_length, chunked=chunked))

    async def send(self, chunk: bytes) -> None:
        """One piece of a streamed body; waits while the client reads slower than we write."""
        conn = self._conn
        if conn.closed:
            raise ConnectionResetError("client closed the connection")
        if not chunk or self.method == "HEAD" or self.status in _NO_BODY_STATUS:
            return
        if self._chunked:
            conn.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
        else:
            conn.write(chunk)
        await conn.drain()

    def finish(self) -> None:
        self.finished = True
        if self._chunked and self.method != "HEAD" and self.status not in _NO_BODY_STATUS:
            self._conn.write(b"0\r\n\r\n")

    def abort(self) -> None:
        """Cut the connection: a broken answer must never look complete."""
        self.keep_alive = False
        self.finished = True
        self._conn.abort()

    @property
    def _chunked(self) -> bool:
        return self._conn.chunked

    def _head(
        self,
        status: int,
        reason: str | None,
        headers: list[tuple[str, str]],
        length: int | None,
        *,
        chunked: bool,
    ) -> bytes:
        conn = self._conn
        self.started = True
        self.status = status
        conn.chunked = chunked
        if not self._complete or conn.server.closing:
            self.keep_alive = False  # unread body: what follows cannot be trusted
        lines = [f"HTTP/1.1 {status} {reason or _REASONS.get(status, 'Unknown')}\r\n"]
        has_date = False
        for name, value in headers:
            lines.append(f"{name}: {value}\r\n")
            if not has_date and len(name) == 4 and name.lower() == "date":
                has_date = True
        if not has_date:
            lines.append(f"Date: {_date.now()}\r\n")
        if status not in _NO_BODY_STATUS and status >= 200:
            if chunked:
                lines.append("Transfer-Encoding: chunked\r\n")
            elif length is not None:
                lines.append(f"Content-Length: {length}\r\n")
        if not self.keep_alive:
            lines.append("Connection: close\r\n\r\n")
        elif self.version == "1.0":
            lines.append("Connection: keep-alive\r\n\r\n")
        else:
            lines.append("\r\n")
        return "".join(lines).encode("latin-1")


Handler = Callable[[Request], Awaitable[None]]

# What a connection is waiting for, checked by the server's sweeper.
_NONE, _HEAD, _IDLE, _LINGER = 0, 1, 2, 3


class _Connection(asyncio.Protocol):
    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.loop = server.loop
        self.transport: asyncio.Transport | None = None
        self.remote: str | None = None
        self.closed = False
        self.chunked = False
        self._parser = httptools.HttpRequestParser(self)
        self._url = b""
        self._raw_headers: list[tuple[bytes, bytes]] = []
        self._head_bytes = 0
        self._in_head = False
        self._parsing: Request | None = None  # the request whose body is arriving
        self._queue: deque[Request | _Reject] = deque()
        self._heads: list[Request] = []  # complete heads of the chunk being parsed
        self._task: asyncio.Task[None] | None = None
        self._wakeup: asyncio.Future[None] | None = None
        self._busy = False
        self._reading_paused = False
        self._stop_reading = False  # after an upgrade or a malformed head: parse nothing more
        self._half_closed = False  # the client sent EOF: answer what was asked, then close
        self._write_paused = False
        self._drain: asyncio.Future[None] | None = None
        self.deadline = 0.0
        self.waiting_for = _NONE

    # asyncio.Protocol -----------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        server = self.server
        server.connections.add(self)
        if len(server.connections) > server.max_connections:
            server.on_reject("max_connections")
            self.abort()
            return
        peer = self.transport.get_extra_info("peername")
        self.remote = peer[0] if isinstance(peer, tuple) else None
        self._expect(_HEAD, server.header_timeout_s)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        if self._parsing is not None:
            self._parsing._fail()
        for request in self._queue:
            if isinstance(request, Request):
                request._fail()
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(ConnectionResetError("client closed the connection"))
        self._wake()

    def eof_received(self) -> bool:
        # A client that half-closes after its request still gets the answer; then we close.
        self._stop_reading = True
        if self._parsing is not None:  # its body can no longer arrive
            self._parsing._fail()
            return False
        if self._busy or self._queue:
            for request in self._queue:
                if isinstance(request, Request):
                    request.keep_alive = False
            self._half_closed = True
            return True
        return False

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self._stop_reading:
            return
        if self.waiting_for == _IDLE:
            self._expect(_HEAD, self.server.header_timeout_s)
        if self._in_head:
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD:
                self._malformed(_Reject(400, "request head too large"))
                return
        reject: _Reject | None = None
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            if not isinstance(exc.__context__, _Reject):
                raise
            reject = exc.__context__
        except httptools.HttpParserUpgrade:
            # An Upgrade request is answered as a plain one (Upgrade is hop-by-hop and never
            # forwarded), then the connection closes: nothing after it is HTTP.
            self._stop_reading = True
            for request in (*self._queue, *self._heads):
                if isinstance(request, Request):
                    request.keep_alive = False
        except httptools.HttpParserError as exc:
            reject = _Reject(400, _printable(str(exc)))
        if self._heads:
            # Requests are handed on once their chunk has parsed, so a head that llhttp
            # rejects just after it is complete (an obfuscated Transfer-Encoding) runs nothing.
            heads, self._heads = self._heads, []
            for request in heads:
                if reject is None or request._complete:
                    self._dispatch(request)
        if reject is not None:
            self._malformed(reject)

    # httptools callbacks ----------------------------------------------------------
    def on_message_begin(self) -> None:
        self._url = b""
        self._raw_headers = []
        self._in_head = True
        self._head_bytes = 0
        if self.waiting_for != _HEAD:
            self._expect(_HEAD, self.server.header_timeout_s)

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > MAX_LINE:
            raise _Reject(400, "request line too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(name) + len(value) > MAX_FIELD:
            raise _Reject(400, "request header too long")
        self._raw_headers.append((name, value))
        if len(self._raw_headers) > MAX_HEADERS:
            raise _Reject(400, "too many request headers")

    def on_headers_complete(self) -> None:
        self._in_head = False
        self.waiting_for = _NONE
        parser = self._parser
        method = parser.get_method().decode("ascii")
        version = parser.get_http_version()
        if method == "CONNECT":
            raise _Reject(400, "CONNECT is not supported")
        if version not in ("1.1", "1.0"):
            raise _Reject(505, f"HTTP/{version} is not supported")
        url = self._url
        raw = self._raw_headers
        if not url.isascii() or not all(n.isascii() and v.isascii() for n, v in raw):
            raise _Reject(400, "request head contains non-ASCII bytes")
        headers = [(n.decode("ascii"), v.decode("ascii")) for n, v in raw]
        host: str | None = None
        hosts = 0
        content_length: int | None = None
        expect_continue = False
        for name, value in headers:
            if len(name) == 4 and name.lower() == "host":
                host, hosts = value, hosts + 1
            elif len(name) == 14 and name.lower() == "content-length":
                content_length = int(value)  # llhttp has checked it is one plain number
            elif len(name) == 6 and name.lower() == "expect":
                expect_continue = value.lower() == "100-continue"
        if hosts > 1:
            raise _Reject(400, "more than one Host header")
        if hosts == 0 and version == "1.1":
            raise _Reject(400, "missing Host header")
        request = Request(
            self,
            method,
            url.decode("ascii"),
            version,
            headers,
            host,
            content_length,
            parser.should_keep_alive(),
            expect_continue and version == "1.1",
        )
        self._parsing = request
        self._heads.append(request)

    def on_body(self, body: bytes) -> None:
        if self._parsing is not None:
            self._parsing._body_chunk(body)

    def on_message_complete(self) -> None:
        if self._parsing is not None:
            self._parsing._body_complete()
            self._parsing = None

    # Requests in order ------------------------------------------------------------
    def _dispatch(self, item: Request | _Reject) -> None:
        self._queue.append(item)
        # A pipelined request waits for the one before it; read no further meanwhile.
        busy = self._busy or len(self._queue) > 1
        if busy and not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()
        if self._task is None:
            self._task = self.server.spawn(self._serve())
        else:
            self._wake()

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    async def _serve(self) -> None:
        server = self.server
        queue = self._queue
        while self.open():
            if not queue:
                self._wakeup = self.loop.create_future()
                await self._wakeup
                self._wakeup = None
                continue
            item = queue.popleft()
            if self._reading_paused and not queue and self.transport is not None:
                self._reading_paused = False
                self.transport.resume_reading()
            if isinstance(item, _Reject):
                self._answer_reject(item)
                return
            self._busy = True
            try:
                await server.handler(item)
            except ConnectionResetError:
                pass  # the client left, or its body broke off (then a 400 may be queued)
            except Exception as exc:  # the handler's bug: answer 500 if we still can
                server.on_reject("internal_error")
                log.error("unhandled_exception", error=repr(exc))
                if not item.started and not self.closed:
                    item.respond(500, None, [], error_body("internal error"), close=True)
                else:
                    item.abort()
            finally:
                self._busy = False
            if not item.finished:
                if queue and isinstance(queue[0], _Reject) and not item.started:
                    self._answer_reject(queue[0])  # the body was malformed: say so
                    return
                item.abort()  # the handler returned without a whole answer
            if not self.open():
                return
            if not item.keep_alive or server.closing or (self._half_closed and not queue):
                self._close_after(item)
                return
            if not queue and not self._in_head:
                self._expect(_IDLE, server.keepalive_timeout_s)

    def _close_after(self, request: Request) -> None:
        """Close once written; an unread body is drained (and dropped) for a moment first."""
        if request._complete or self._stop_reading or self.transport is None:
            self.close()
            return
        self._queue.clear()
        self._stop_reading = True  # from here on, bytes are read and dropped
        if self._reading_paused:
            self._reading_paused = False
            self.transport.resume_reading()
        self._expect(_LINGER, LINGER_S)
        if self.transport.can_write_eof():
            self.transport.write_eof()

    def _malformed(self, reject: _Reject) -> None:
        self._stop_reading = True
        self._in_head = False
        self.waiting_for = _NONE
        if self._parsing is not None:
            self._parsing._fail()  # a body that broke off: its handler stops waiting for it
            self._parsing = None
        if self._busy or self._queue:
            self._queue.append(reject)
            self._wake()
        else:
            self._answer_reject(reject)

    def _answer_reject(self, reject: _Reject) -> None:
        self.server.on_reject("malformed")
        if self.transport is None or self.closed:
            return
        body = error_body(reject.message)
        reason = _REASONS.get(reject.status, "Bad Request")
        self.transport.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n%b" % (reject.status, reason.encode(), len(body), body)
        )
        self._stop_reading = True
        self._expect(_LINGER, LINGER_S)
        if self.transport.can_write_eof():
            self.transport.write_eof()

    # Writing and closing -------------------------------------------------------------
    def open(self) -> bool:
        return not self.closed

    def write(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(data)

    async def drain(self) -> None:
        if self._write_paused and not self.closed:
            self._drain = self.loop.create_future()
            try:
                await self._drain
            finally:
                self._drain = None

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _expect(self, what: int, seconds: float) -> None:
        self.waiting_for = what
        self.deadline = self.loop.time() + seconds

    def expire(self, now: float) -> None:
        """Called by the sweeper: the deadline of what this connection waits for has passed."""
        if self.waiting_for == _HEAD:
            if self._busy:  # the next pipelined head may wait while this answer streams
                self.deadline = now + self.server.header_timeout_s
                return
            self.server.on_reject("header_timeout")
        self.waiting_for = _NONE
        self.close()

    @property
    def idle(self) -> bool:
        return not self._busy and not self._queue and self._parsing is None


def _printable(text: str) -> str:
    first = text.strip().splitlines()[0] if text.strip() else "malformed request"
    return _UNPRINTABLE.sub("?", first)[:120].rstrip(":")


class HttpServer:
    """Listens, owns every client connection and the task that serves each, and drains on close."""

    def __init__(
        self,
        handler: Handler,
        *,
        header_timeout_s: float,
        keepalive_timeout_s: float,
        max_connections: int,
        max_body_bytes: Callable[[], int],
        on_reject: Callable[[str], None] = lambda reason: None,
        on_task_error: Callable[[str, BaseException], None] | None = None,
    ) -> None:
        self.handler = handler
        self.header_timeout_s = header_timeout_s
        self.keepalive_timeout_s = keepalive_timeout_s
        self.max_connections = max_connections
        self.max_body_bytes = max_body_bytes
        self.on_reject = on_reject
        self.loop = asyncio.get_running_loop()
        self.connections: set[_Connection] = set()
        self.closing = False
        self._connection_tasks = TaskGroup(on_error=on_task_error)  # one per connection
        self._sweeper = TaskGroup(on_error=on_task_error)
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self, host: str, port: int, *, reuse_port: bool = False) -> None:
        self._server = await self.loop.create_server(
            lambda: _Connection(self),
            host,
            port,
            reuse_port=reuse_port or None,
            backlog=1024,
        )
        self._sweeper.spawn(self._sweep(), name="http-deadlines")

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """The task that serves one connection's requests in turn."""
        return self._connection_tasks.spawn(coro, name="connection")

    async def _sweep(self) -> None:
        """Close connections whose head, idle or linger deadline has passed."""
        step = max(0.05, min(self.header_timeout_s, self.keepalive_timeout_s, LINGER_S) / 4)
        while True:
            await asyncio.sleep(step)
            now = self.loop.time()
            for conn in [c for c in self.connections if c.waiting_for and c.deadline <= now]:
                conn.expire(now)

    async def close(self, grace_s: float) -> None:
        """Stop listening, close idle connections, give busy ones ``grace_s`` to finish."""
        self.closing = True
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            if conn.idle:
                conn.close()
        await self._connection_tasks.wait(deadline_s=grace_s)
        for conn in list(self.connections):
            conn.abort()
        await self._connection_tasks.cancel_all()
        await self._sweeper.cancel_all()
        if self._server is not None:
            await self._server.wait_closed()
