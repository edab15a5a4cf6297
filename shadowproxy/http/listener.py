"""The client-facing HTTP server: aiohttp's low-level server plus the guards it lacks.

aiohttp parses and frames every request (llhttp), bounds each head line, header count and
trailer, reads bodies with flow control and handles keep-alive. On top of it, each guard
small and for one reason:

- **header deadline** — aiohttp has none, so a client dripping a head byte by byte holds a
  connection for ever (slowloris); like nginx's ``client_header_timeout`` a head must
  arrive within ``header_timeout_s`` of its first byte;
- **connection cap** — connections beyond ``max_connections`` are closed at once;
- **send deadline** — a client that stops reading would hold its answer, and the primary
  connection streaming it, for ever; after ``send_timeout_s`` with a full send buffer the
  connection is aborted;
- **HTTP/1 only** — aiohttp's C parser (3.14) accepts ``RTSP/1.0`` and ``ICE/1.0`` request
  lines and reports them as HTTP/1.0, and answers ``HTTP/2.0`` in kind; a head whose first
  line does not end in ``HTTP/1.x`` gets a 505 or is closed (checked on the first bytes of
  each head after an idle connection; one pipelined behind another is the handler's to
  refuse, and it cannot tell RTSP from HTTP/1.0);
- **broken bodies** — a body that stops parsing fails the handler's read (aiohttp 3.14 leaves
  it waiting for the body timeout);
- **half-close** — aiohttp closes the connection when the client shuts down its sending side;
  the requests it already sent are answered first (RFC 9112 §9.6);
- **JSON errors** — malformed requests get ``{"error", "request_id"}`` like every other
  error answer, and are counted.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from typing import Any, cast

import orjson
import structlog
from aiohttp import StreamReader, web
from aiohttp.http import RawRequestMessage
from aiohttp.http_exceptions import BadHttpMessage, HttpProcessingError

from shadowproxy.config.settings import ServerSettings
from shadowproxy.http.headers import new_request_id

log = structlog.get_logger("shadowproxy.listener")
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")
_FIRST_LINE_PEEK = 8192  # a request line longer than this is aiohttp's to refuse

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


def error_body(message: str, request_id: str | None = None) -> bytes:
    """The JSON body of every error answer: what went wrong and the request's id."""
    return orjson.dumps({"error": message, "request_id": request_id or new_request_id()})


def _reason(exc: BaseException | None) -> str:
    """First line of a parser error, printable ASCII only, short: safe to echo and to log."""
    text = str(exc.message if isinstance(exc, HttpProcessingError) else "").strip()
    first = text.splitlines()[0] if text else "malformed request"
    return _UNPRINTABLE.sub("?", first)[:120].rstrip(":")


def _version_not_supported(message: str) -> bytes:
    """A whole 505 answer, written before aiohttp parsed anything (it would answer in the
    request's version, which the client does not speak)."""
    body = error_body(message)
    head = (
        "HTTP/1.1 505 HTTP Version Not Supported\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


def assert_c_parser() -> None:
    """Refuse to run on aiohttp's pure-Python HTTP parser: llhttp is the one we rely on."""
    from aiohttp import http_parser

    if http_parser.HttpRequestParser is http_parser.HttpRequestParserPy:
        raise RuntimeError("aiohttp's C HTTP parser (llhttp) is not available; refusing to start")


class GuardedRequestHandler(web.RequestHandler):
    """aiohttp's per-connection protocol with the guards above.

    It reads one private attribute of aiohttp's: ``_messages``, the queue of heads received
    but not yet handled (is anything still to answer after a half-close; did the parser
    queue an error behind a running body). Checked against aiohttp 3.14.5 by the tests.
    """

    def __init__(self, manager: GuardedServer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._guard = manager
        self._head_deadline: asyncio.TimerHandle | None = None
        self._send_deadline: asyncio.TimerHandle | None = None
        self._idle = True  # between requests: the next bytes begin a head
        self._client_done = False  # the client half-closed: answer what came, then close
        self._body: StreamReader | None = None  # the running request's body
        self._first_line: bytes | None = b""  # the head's bytes until its first line is whole
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        guard = self._guard  # aiohttp's Server counts this connection already
        if len(guard.connections) > guard.max_connections:
            guard.on_reject("max_connections")
            self.force_close()
            self._transport.close()
            return
        self._arm_head_deadline()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._idle:
            if self._head_deadline is None:
                self._arm_head_deadline()
            if self._first_line is not None and not self._check_first_line(data):
                return
        super().data_received(data)
        body = self._body
        if (
            body is not None
            and not body.is_eof()
            and body.exception() is None
            and self._messages
            and not isinstance(self._messages[-1][0], RawRequestMessage)
        ):
            # aiohttp (3.14) queues a parse error in the body as a next "request" and leaves
            # the running one waiting for bytes that will never come: fail it (the handler
            # answers 400 and the connection closes before the queued error is reached).
            self._guard.on_reject("malformed")
            body.set_exception(BadHttpMessage("malformed request body"))

    def eof_received(self) -> bool | None:  # type: ignore[override]  # asyncio's: bool | None
        if self._messages or (self._body is not None and self._body.is_eof()):
            # Whole requests are waiting for their answers (aiohttp's queue of received
            # heads, or the running one): keep the sending side open, close after them.
            self._client_done = True
            return True
        return None  # nothing whole to answer (or a body cut short): aiohttp closes

    def _check_first_line(self, data: bytes) -> bool:
        """False (the connection answered and closing) once the head's first line is whole
        and its protocol is not HTTP/1."""
        assert self._first_line is not None
        line = self._first_line + data if self._first_line else data  # no copy: whole line
        line = line.lstrip(b"\r\n")  # RFC 9112 §2.2: empty lines may come first
        end = line.find(b"\r\n", 0, _FIRST_LINE_PEEK)
        if end < 0:
            # Not whole yet; past the peek it is aiohttp's to refuse as too long.
            self._first_line = line if len(line) < _FIRST_LINE_PEEK else None
            return True
        self._first_line = None
        protocol = line[:end].rpartition(b" ")[2]
        if protocol.startswith(b"HTTP/1."):
            return True
        self._guard.on_reject("malformed")
        if protocol.startswith(b"HTTP/") and self._transport is not None:
            version = _UNPRINTABLE.sub("?", protocol.decode("latin-1"))[:16]
            self._transport.write(_version_not_supported(f"{version} is not supported"))
        self._close_now()
        return False

    # The handler tells the guard when a head was complete and when its answer is done.
    @property
    def draining(self) -> bool:
        return self._guard.draining

    def request_started(self, body: StreamReader) -> None:
        self._idle = False
        self._body = body
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def request_finished(
        self, request: web.BaseRequest, response: web.StreamResponse | None
    ) -> None:
        """The handler is done; ``response`` (not yet written, unless streamed) is its answer.

        After an unread body (404, 413, 408), or while the server stops, the answer is the
        connection's last and says so; bytes still coming begin no head.
        """
        self._body = None
        body_read = request.content.is_eof()
        if response is not None and not response.prepared and (not body_read or self.draining):
            response.force_close()
        if body_read:
            self._idle = True
            self._first_line = b""
        if self._client_done and not self._messages:
            self.close()  # the answer now being written is the last

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._send_deadline is None:
            self._send_deadline = self._loop.call_later(
                self._guard.send_timeout_s, self._send_expired
            )

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._send_deadline is not None:
            self._send_deadline.cancel()
            self._send_deadline = None

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """Malformed requests get a JSON 400 (the connection is closed); nothing reaches an upstream."""
        if status >= 500:
            self._guard.on_reject("internal_error")
            log.error("unhandled_exception", error=repr(exc))
        else:
            self._guard.on_reject("malformed")
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; cannot send the error")
        error = _reason(exc) if status < 500 else "internal error"
        response = web.Response(
            status=status, body=error_body(error), content_type="application/json"
        )
        response.force_close()
        return response

    def _arm_head_deadline(self) -> None:
        self._head_deadline = self._loop.call_later(
            self._guard.header_timeout_s, self._head_expired
        )

    def _head_expired(self) -> None:
        self._head_deadline = None
        if self._idle:
            self._guard.on_reject("header_timeout")
            self._close_now()

    def _send_expired(self) -> None:
        self._send_deadline = None
        self._guard.on_reject("send_timeout")
        if self._transport is not None:
            self._transport.abort()  # the handler's pending write fails; the upstream is freed

    def _disarm(self) -> None:
        for handle in (self._head_deadline, self._send_deadline):
            if handle is not None:
                handle.cancel()
        self._head_deadline = self._send_deadline = None

    def _close_now(self) -> None:
        self.force_close()
        if self._transport is not None:
            self._transport.close()


class GuardedServer(web.Server):
    def __init__(
        self,
        handler: Handler,
        *,
        header_timeout_s: float,
        send_timeout_s: float,
        max_connections: int,
        keepalive_timeout_s: float,
        on_reject: Callable[[str], None] = lambda reason: None,
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, keepalive_timeout=keepalive_timeout_s, **kwargs)
        self.header_timeout_s = header_timeout_s
        self.send_timeout_s = send_timeout_s
        self.max_connections = max_connections
        self.on_reject = on_reject
        self.keepalive_timeout_s = keepalive_timeout_s
        self.draining = False  # stopping: every answer from now on says Connection: close
        self._handler_kwargs = kwargs

    def __call__(self) -> GuardedRequestHandler:
        return GuardedRequestHandler(
            self,
            loop=asyncio.get_running_loop(),
            keepalive_timeout=self.keepalive_timeout_s,
            **self._handler_kwargs,
        )


class ProxyServer:
    """The proxy port: a ``GuardedServer`` on a TCP site, and its graceful stop."""

    def __init__(
        self,
        handler: Handler,
        *,
        header_timeout_s: float,
        send_timeout_s: float,
        keepalive_timeout_s: float,
        max_connections: int,
        shutdown_grace_s: float,
        on_reject: Callable[[str], None],
    ) -> None:
        self.server = GuardedServer(
            handler,
            header_timeout_s=header_timeout_s,
            send_timeout_s=send_timeout_s,
            max_connections=max_connections,
            on_reject=on_reject,
            keepalive_timeout_s=keepalive_timeout_s,
            # After an early answer (413, 408) read what the client still sends for at most
            # this long, so it sees the answer rather than a reset, then close.
            lingering_time=2.0,
            auto_decompress=False,  # bodies pass through as sent
            access_log=None,
        )
        self._runner = web.ServerRunner(self.server)
        self.shutdown_grace_s = shutdown_grace_s
        self.port = 0

    def apply(self, settings: ServerSettings) -> None:
        """A reload's server settings (but host and port): new deadlines and limits now,
        the keep-alive timeout for connections opened from now on."""
        server = self.server
        server.header_timeout_s = settings.header_timeout_s
        server.send_timeout_s = settings.send_timeout_s
        server.max_connections = settings.max_connections
        server.keepalive_timeout_s = settings.keepalive_timeout_s
        self.shutdown_grace_s = settings.shutdown_grace_s

    @property
    def connections(self) -> list[web.RequestHandler]:
        return self.server.connections

    async def start(self, host: str, port: int, *, reuse_port: bool = False) -> None:
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, reuse_port=reuse_port or None, backlog=1024)
        await site.start()
        for address in self._runner.addresses:
            if isinstance(address, tuple) and len(address) >= 2:
                self.port = int(address[1])
                break

    async def close(self) -> None:
        """Stop listening, let in-flight requests finish (up to the grace), close the rest."""
        self.server.draining = True
        for site in list(self._runner.sites):
            await site.stop()
        await self.server.shutdown(self.shutdown_grace_s)
        await self._runner.cleanup()
