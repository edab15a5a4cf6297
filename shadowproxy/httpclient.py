"""A lean HTTP/1.1 client for upstreams: keep-alive connections parsed by llhttp (httptools).

The proxy makes two upstream calls per request. aiohttp's ClientSession builds a request
object, a response object, timers and a payload writer for each call, and that was the
largest cost in the profile; here a call is one write and one parse. This module knows
nothing about routes or records: failures are ``UpstreamError`` with one of the kinds
PRODUCT.md names (``connect``, ``timeout``, ``reset``, ``protocol``).

Nothing is ever retried: a request that may have reached the upstream is not sent twice.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Iterable
from typing import cast
from urllib.parse import urlsplit

import httptools

# Response bytes buffered before reading from the socket pauses (backpressure from a slow
# client reaches the upstream instead of piling up here).
_HIGH_WATER = 256 * 1024
_LOW_WATER = 64 * 1024
# Request bodies larger than this are written in slices, waiting for the socket to drain.
_WRITE_SLICE = 256 * 1024
# A kept-alive connection unused for longer than this is closed rather than reused: the
# upstream has probably timed it out already (aiohttp's default is the same).
_IDLE_S = 15.0


class UpstreamError(Exception):
    """An upstream call failed; ``kind`` is one of connect, timeout, reset, protocol."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind


class _Unexpected(Exception):
    """Raised inside parser callbacks; llhttp turns it into HttpParserCallbackError."""


class Connection(asyncio.Protocol):
    """One keep-alive connection carrying one exchange at a time.

    After ``ConnectionPool.send`` returns, ``status``, ``reason``, ``headers`` (raw bytes)
    and ``content_length`` describe the answer; read the body with ``read_chunk``/``read``
    and finish with ``release`` (back to the pool when the answer was complete) or ``close``.
    """

    def __init__(self, pool: ConnectionPool, loop: asyncio.AbstractEventLoop) -> None:
        self._pool = pool
        self._loop = loop
        self._parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.lost: asyncio.Future[None] = loop.create_future()
        self.idle_since = 0.0
        self._active = False
        self._head_only = False
        self._informational = False
        self._head_ready = False
        self._complete = False
        self._keep_alive = False
        self._until_eof = False
        self._error: UpstreamError | None = None
        self._reason: list[bytes] = []
        self.status = 0
        self.reason = ""
        self.headers: list[tuple[bytes, bytes]] = []
        self.content_length: int | None = None
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._reading_paused = False
        self._writing_paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._deadline: float | None = None  # loop time by which the whole exchange must end

    # -- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._pool.connections.add(self)

    def data_received(self, data: bytes) -> None:
        if not self._active:
            self._fail(UpstreamError("protocol", "bytes on an idle connection"))
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamError("protocol", "unexpected protocol upgrade"))
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError("protocol", str(exc)))

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost decides what the EOF meant

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._pool.forget(self)
        if self._active and not self._complete:
            if self._head_ready and self._until_eof and exc is None and self._error is None:
                self._complete = True  # a body delimited by the end of the connection
            elif self._error is None and self._head_ready:
                # The head promised a length or chunks the upstream never sent: a broken answer.
                self._error = UpstreamError("protocol", "connection closed inside the body")
            elif self._error is None:
                self._error = UpstreamError("reset", "connection closed before an answer")
        if not self.lost.done():
            self.lost.set_result(None)
        self._wake()

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._wake()

    # -- llhttp callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._complete or self._head_ready:
            raise _Unexpected("a second answer to one request")
        self.headers = []
        self._reason = []

    def on_status(self, status: bytes) -> None:
        self._reason.append(status)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200:
            if status == 101:
                raise _Unexpected("101 Switching Protocols was not asked for")
            self._informational = True  # e.g. 100 Continue: the real answer follows
            return
        length: int | None = None
        chunked = False
        for name, value in self.headers:
            lower = name.lower()
            if lower == b"content-length":
                if length is not None:
                    raise _Unexpected("more than one Content-Length")
                if not value.strip().isdigit():
                    raise _Unexpected("Content-Length is not a number")
                length = int(value)
            elif lower == b"transfer-encoding":
                chunked = True
        if chunked and length is not None:
            raise _Unexpected("both Content-Length and Transfer-Encoding")
        self.status = status
        self.reason = b"".join(self._reason).decode("latin-1")
        self.content_length = length
        self._keep_alive = self._parser.should_keep_alive()
        self._until_eof = length is None and not chunked and status not in (204, 304)
        self._head_ready = True
        if self._head_only:
            # llhttp cannot be told the answer is to HEAD; it would wait for a body that never
            # comes. The answer is complete; the connection is not reused.
            self._complete = True
            self._keep_alive = False
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self._complete:
            return
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered >= _HIGH_WATER and not self._reading_paused and self.transport:
            self._reading_paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        self._complete = True
        self._wake()

    # -- the exchange ---------------------------------------------------------------------

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: UpstreamError) -> None:
        if not self._complete and self._error is None:
            self._error = error
        self.close()
        self._wake()

    def _timed_out(self, waiter: asyncio.Future[None]) -> None:
        if not waiter.done():
            waiter.set_exception(UpstreamError("timeout"))

    async def _wait(self, idle_s: float | None) -> None:
        if self._deadline is not None:
            left = self._deadline - self._loop.time()
            if left <= 0:
                raise UpstreamError("timeout")
            idle_s = left if idle_s is None else min(idle_s, left)
        waiter = self._waiter = self._loop.create_future()
        timer = None if idle_s is None else self._loop.call_later(idle_s, self._timed_out, waiter)
        try:
            await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    def _stopped(self) -> bool:
        return self._head_ready or self._error is not None or self.transport is None

    async def _exchange(self, head: bytes, body: bytes, idle_s: float | None) -> None:
        transport = self.transport
        if transport is None or self._error is not None:
            raise UpstreamError("reset", "connection closed")
        self._active = True
        if len(body) <= _WRITE_SLICE:
            transport.write(head + body if body else head)
        else:
            transport.write(head)
            view = memoryview(body)
            for start in range(0, len(body), _WRITE_SLICE):
                while self._writing_paused and not self._stopped():
                    await self._wait(idle_s)
                if self._stopped():
                    break  # the upstream answered early, failed or hung up; the answer says which
                transport.write(view[start : start + _WRITE_SLICE])
        while not self._head_ready:
            if self._error is not None:
                raise self._error
            await self._wait(idle_s)

    async def read_chunk(self, idle_s: float | None) -> bytes:
        """The next piece of the body, or b"" at its end; at most ``idle_s`` of silence."""
        while True:
            if self._chunks:
                chunk = self._chunks.popleft()
                self._buffered -= len(chunk)
                if self._reading_paused and self._buffered <= _LOW_WATER and self.transport:
                    self._reading_paused = False
                    self.transport.resume_reading()
                return chunk
            if self._complete:
                return b""
            if self._error is not None:
                raise self._error
            await self._wait(idle_s)

    async def read(self, idle_s: float | None) -> bytes:
        """The whole body (the caller knows it is small: a Content-Length it checked)."""
        while not self._complete:
            if self._error is not None:
                raise self._error
            await self._wait(idle_s)
        chunks, self._chunks, self._buffered = self._chunks, deque(), 0
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def release(self) -> None:
        """The exchange is over: keep the connection if the answer was whole and clean."""
        self._active = False
        reusable = (
            self._complete
            and self._keep_alive
            and self._error is None
            and not self._chunks
            and self.transport is not None
            and not self.transport.is_closing()
        )
        self._head_ready = self._complete = False
        self._chunks.clear()
        self._buffered = 0
        if reusable:
            self.idle_since = self._loop.time()
            self._pool.keep(self)
        else:
            self.close()

    def close(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if transport.get_write_buffer_size():
            transport.abort()  # never wait for an upstream that does not read
        else:
            transport.close()


class ConnectionPool:
    """Kept-alive connections to one origin. The caller bounds how many are in use."""

    def __init__(self, url: str, *, connect_timeout: float) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.ssl: ssl.SSLContext | None = (
            ssl.create_default_context() if parts.scheme == "https" else None
        )
        self.host_header = parts.netloc.rpartition("@")[2]
        self.connect_timeout = connect_timeout
        self.connections: set[Connection] = set()
        self._idle: list[Connection] = []
        self.closed = False

    def keep(self, connection: Connection) -> None:
        if self.closed:
            connection.close()
        else:
            self._idle.append(connection)

    def forget(self, connection: Connection) -> None:
        self.connections.discard(connection)
        # A closed idle connection stays in the list until it is next looked at.

    async def _connection(self, loop: asyncio.AbstractEventLoop, connect_s: float) -> Connection:
        now = loop.time()
        while self._idle:
            connection = self._idle.pop()  # the most recently used: the least likely stale
            if connection.transport is not None and now - connection.idle_since < _IDLE_S:
                return connection
            connection.close()
        if self.closed:
            raise UpstreamError("connect", "connection pool closed")
        try:
            async with asyncio.timeout(connect_s):
                _, connection = await loop.create_connection(
                    lambda: Connection(self, loop),
                    self.host,
                    self.port,
                    ssl=self.ssl,
                    server_hostname=self.host if self.ssl else None,
                )
        except TimeoutError:
            raise UpstreamError("timeout", "connect") from None
        except OSError as exc:
            raise UpstreamError("connect", str(exc)) from None
        return connection

    def encode_head(
        self, method: str, target: str, headers: Iterable[tuple[str, str]], body_length: int
    ) -> bytes:
        lines = [f"{method} {target} HTTP/1.1\r\nHost: {self.host_header}\r\n"]
        lines += [f"{name}: {value}\r\n" for name, value in headers]
        if body_length or method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {body_length}\r\n")
        lines.append("\r\n")
        text = "".join(lines)
        # Every piece ends in exactly one CRLF (the first in two): any other CR or LF came
        # from a value and would split the request.
        expected = len(lines) + 1
        if text.count("\n") != expected or text.count("\r") != expected:
            raise UpstreamError("protocol", "CR or LF in a request header")
        return text.encode("utf-8", "surrogateescape")

    async def send(
        self,
        method: str,
        target: str,
        headers: Iterable[tuple[str, str]],
        body: bytes,
        *,
        idle_s: float | None,
        total_s: float | None = None,
    ) -> Connection:
        """Send one request and wait for the answer's head: at most ``idle_s`` of silence at
        any point, and with ``total_s`` the whole exchange, body included, within that time.

        The returned connection carries the answer; the caller must ``release`` or ``close`` it.
        """
        head = self.encode_head(method, target, headers, len(body))
        loop = asyncio.get_running_loop()
        connect_s = self.connect_timeout if total_s is None else min(self.connect_timeout, total_s)
        connection = await self._connection(loop, connect_s)
        connection._head_only = method == "HEAD"
        connection._deadline = None if total_s is None else loop.time() + total_s
        try:
            await connection._exchange(head, body, idle_s)
        except BaseException:
            connection._active = False
            connection.close()
            raise
        return connection

    async def close(self) -> None:
        self.closed = True
        self._idle.clear()
        connections = list(self.connections)
        for connection in connections:
            connection.close()
        if connections:
            await asyncio.wait([c.lost for c in connections], timeout=2.0)
