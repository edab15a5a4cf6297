"""The client-facing HTTP server: aiohttp's, plus the deadlines aiohttp lacks.

aiohttp has no deadline for receiving a request head, so a client dripping one header
byte at a time holds a connection for as long as it likes (slowloris). Like nginx's
``client_header_timeout``, every request head must arrive within ``header_timeout_s`` of
its first byte (of the connection, for the first request); connections beyond
``max_connections`` are closed at once. Body idle time is bounded by the proxy handler.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Callable
from typing import Any

import orjson
import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler

log = structlog.get_logger("shadowproxy.listener")
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")


def _reason(exc: BaseException | None) -> str:
    """First line of a parser error, printable ASCII only, short: safe to echo and to log."""
    text = exc.message if isinstance(exc, HttpProcessingError) else ""
    first = str(text).strip().splitlines()[0] if str(text).strip() else "malformed request"
    return _UNPRINTABLE.sub("?", first)[:120].rstrip(":")


def assert_c_parser() -> None:
    """Refuse to run on aiohttp's pure-Python HTTP parser: llhttp is the strict one."""
    from aiohttp import http_parser

    if http_parser.HttpRequestParser is http_parser.HttpRequestParserPy:
        raise RuntimeError("aiohttp's C HTTP parser (llhttp) is not available; refusing to start")


class GuardedRequestHandler(RequestHandler):
    def __init__(
        self,
        manager: GuardedServer,
        *,
        loop: asyncio.AbstractEventLoop,
        header_timeout_s: float,
        **kwargs: Any,
    ) -> None:
        super().__init__(manager, loop=loop, **kwargs)
        self._guard = manager
        self._header_timeout_s = header_timeout_s
        self._deadline: asyncio.TimerHandle | None = None
        self._armed_at_count = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if len(self._guard.connections) > self._guard.max_connections:
            self._guard.on_reject("max_connections")
            self.force_close()
            transport.close()
            return
        self._arm()

    def data_received(self, data: bytes) -> None:
        before = self._request_count
        super().data_received(data)
        if self._request_count > before:
            self._disarm()  # a whole request head arrived
        elif self._deadline is None and not self._request_in_progress:
            self._arm()  # the first bytes of a new request head

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
            status=status,
            body=orjson.dumps({"error": error, "request_id": uuid.uuid4().hex}),
            content_type="application/json",
        )
        response.force_close()
        return response

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._armed_at_count = self._request_count
        self._deadline = self._loop.call_later(self._header_timeout_s, self._expire)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        self._deadline = None
        if self._request_count == self._armed_at_count and not self._request_in_progress:
            self._guard.on_reject("header_timeout")
            self.force_close()
            if self.transport is not None:
                self.transport.close()


class GuardedServer(web.Server):
    def __init__(
        self,
        handler: Any,
        *,
        header_timeout_s: float,
        max_connections: int,
        on_reject: Callable[[str], None] = lambda reason: None,
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, **kwargs)
        self.header_timeout_s = header_timeout_s
        self.max_connections = max_connections
        self.on_reject = on_reject

    def __call__(self) -> RequestHandler:
        return GuardedRequestHandler(
            self, loop=self._loop, header_timeout_s=self.header_timeout_s, **self._kwargs
        )
