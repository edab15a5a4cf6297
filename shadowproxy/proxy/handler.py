"""The request path: check, route, forward to the primary, stream its answer back, hand off
mirrors.

Nothing here waits for a shadow. The primary's answer is captured (up to the capture
limit) as it streams past, and completes the request's ``PairJoin`` when done.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from itertools import chain

import aiohttp
import structlog
from aiohttp import web

from shadowproxy.base.error_kinds import TransportErrorKind
from shadowproxy.config.settings import RouteSettings
from shadowproxy.http.headers import (
    REQUEST_ID,
    end_to_end,
    forwarded_for,
    printable_reason,
    request_id_from,
    request_refusal,
)
from shadowproxy.http.listener import GuardedRequestHandler, error_body
from shadowproxy.pairs.observation import Observation, RequestSnapshot, failed
from shadowproxy.proxy.mirror import MirrorDispatcher, PairJoin
from shadowproxy.proxy.request_body import (
    BodyBudget,
    BodyBudgetExhausted,
    BodyMalformed,
    BodyTooLarge,
    read_body,
)
from shadowproxy.proxy.runtime import Generation, Runtime
from shadowproxy.proxy.upstream import UpstreamClient, UpstreamError, decode_headers, read_chunk
from shadowproxy.telemetry.metrics import Metrics

log = structlog.get_logger("shadowproxy.proxy")
access_log = structlog.get_logger("shadowproxy.access")

# Answers up to this size with a Content-Length are read whole and sent in one write;
# anything else (chunked, event streams, large bodies) is streamed chunk by chunk.
_WHOLE_BODY_LIMIT = 64 * 1024
_DROP_REQUEST = frozenset(
    {
        "host",
        "content-length",
        "expect",  # answered here (100 Continue) before the body was read
        "x-request-id",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
    }
)
_DROP_RESPONSE = frozenset({"content-length", "x-request-id"})
_JSON = "application/json"


def _ascii_headers(raw: Iterable[tuple[bytes, bytes]]) -> bool:
    return b"".join(chain.from_iterable(raw)).isascii()


def error_response(status: int, message: str, request_id: str) -> web.Response:
    """A JSON error answer; after 400, 408 and 413 the connection is closed, since the rest of
    what this client sent cannot be trusted or is unread."""
    response = web.Response(
        status=status,
        body=error_body(message, request_id),
        content_type=_JSON,
        headers={REQUEST_ID: request_id},
    )
    if status in (400, 408, 413, 501, 505):
        response.force_close()
    return response


def _upstream_failure(upstream: str, kind: str, request_id: str) -> web.Response:
    """The client's answer when the primary failed before any byte was forwarded."""
    code = 504 if kind == "timeout" else 502
    return error_response(code, f"primary upstream {upstream}: {kind}", request_id)


def _forwarded_headers(
    request: web.BaseRequest, request_id: str, host: str
) -> list[tuple[str, str]]:
    """The client's end-to-end headers plus ours. Names with '_' are dropped (as nginx does):
    ``Content_Length`` must not become a second Content-Length behind a CGI-style server."""
    headers = [
        (str(name), value)  # multidict's istr → str (records are JSON)
        for name, value in end_to_end(request.headers.items(), _DROP_REQUEST)
        if "_" not in name
    ]
    headers.append((REQUEST_ID, request_id))
    headers.append(
        ("X-Forwarded-For", forwarded_for(request.headers.get("X-Forwarded-For"), request.remote))
    )
    headers.append(("X-Forwarded-Proto", request.scheme))
    if host:
        headers.append(("X-Forwarded-Host", host))
    return headers


class ProxyHandler:
    def __init__(
        self,
        runtime: Runtime,
        dispatcher: MirrorDispatcher,
        metrics: Metrics,
        budget: BodyBudget,
    ) -> None:
        self._runtime = runtime
        self._dispatcher = dispatcher
        self._metrics = metrics
        self._budget = budget

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        protocol = request.protocol
        guard = protocol if isinstance(protocol, GuardedRequestHandler) else None
        if guard is not None:
            guard.request_started(request.content)
        response: web.StreamResponse | None = None
        try:
            started = time.perf_counter()
            response = await self._handle(request)
            if not self._runtime.settings.server.access_log:
                return response
            access_log.info(
                "request",
                method=request.method,
                path=request.path,
                status=response.status,
                ms=round((time.perf_counter() - started) * 1000, 3),
                request_id=response.headers.get(REQUEST_ID),
                remote=request.remote,
            )
            return response
        finally:
            if guard is not None:
                guard.request_finished(request, response)

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        request_id = request_id_from(request.headers.get(REQUEST_ID))
        refusal = request_refusal(
            request.method,
            request.version,
            request.raw_path,
            request.path,
            request.headers,
            request.raw_headers,
        )
        if refusal is not None:
            status, message = refusal
            return error_response(status, message, request_id)
        generation = self._runtime.acquire()
        try:
            path = request.path
            route = generation.table.match(request.method, path, request.host)
            if route is None:
                return error_response(404, f"no route matches {request.method} {path}", request_id)
            return await self._forward(request, generation, route, request_id)
        finally:
            self._runtime.release(generation)

    async def _forward(
        self,
        request: web.BaseRequest,
        generation: Generation,
        route: RouteSettings,
        request_id: str,
    ) -> web.StreamResponse:
        settings = generation.settings.server
        received = time.time()
        budget = self._budget
        try:
            body = await read_body(
                request, settings.max_body_bytes, settings.body_timeout_s, budget
            )
        except BodyTooLarge:
            message = f"request body over {settings.max_body_bytes} bytes"
            return error_response(413, message, request_id)
        except TimeoutError:
            return error_response(408, "request body not received in time", request_id)
        except BodyMalformed:
            return error_response(400, "malformed request body", request_id)
        except BodyBudgetExhausted:
            message = (
                f"request bodies held by the proxy would exceed {budget.limit} bytes"
                " (server.max_buffered_body_bytes); retry"
            )
            return error_response(503, message, request_id)
        try:
            return await self._send(request, generation, route, request_id, received, body)
        finally:
            budget.give(len(body))

    async def _send(
        self,
        request: web.BaseRequest,
        generation: Generation,
        route: RouteSettings,
        request_id: str,
        received: float,
        body: bytes,
    ) -> web.StreamResponse:
        headers = _forwarded_headers(request, request_id, request.headers.get("Host", ""))
        join: PairJoin | None = None
        if route.shadows:
            raw_path, _, query = request.raw_path.partition("?")
            snapshot = RequestSnapshot(
                request_id=request_id,
                ts=received,
                route=route.name,
                method=request.method,
                path=raw_path,  # as sent: what a mirror or a replay must send again
                query=query,
                headers=tuple(headers),
                body=body,
            )
            join = self._dispatcher.dispatch(generation, route, snapshot, headers)
        client = generation.primaries[route.primary]
        if not await client.acquire():
            if join is not None:
                join.primary_done(failed(route.primary, "pool_exhausted"))
            self._metrics.observe_upstream(
                route.name, route.primary, "primary", "pool_exhausted", None
            )
            message = f"primary upstream {route.primary}: connection pool exhausted"
            return error_response(503, message, request_id)
        try:
            capture = route.mirror.max_capture_bytes if join else 0
            call = _PrimaryCall(request, client, request_id, capture)
            try:
                return await call.run(headers, body)
            finally:
                self._metrics.observe_upstream(
                    route.name, route.primary, "primary", call.code_label(), call.latency_s
                )
                if join is not None:
                    join.primary_done(call.observation(route.primary))
        finally:
            client.release()


class _PrimaryCall:
    """One call to the primary and the answer relayed to the client, observed on the way."""

    __slots__ = (
        "capture",
        "client",
        "error",
        "latency_s",
        "request",
        "request_id",
        "response_headers",
        "started",
        "status",
    )

    def __init__(
        self, request: web.BaseRequest, client: UpstreamClient, request_id: str, capture: int
    ) -> None:
        self.request = request
        self.client = client
        self.request_id = request_id
        self.capture = _Capture(capture)
        self.started = time.perf_counter()
        self.latency_s = 0.0
        self.status: int | None = None
        self.response_headers: tuple[tuple[str, str], ...] = ()
        self.error: TransportErrorKind | None = None

    def code_label(self) -> str:
        if self.status is not None and self.error is None:
            return str(self.status)
        return self.error or "error"

    def observation(self, upstream: str) -> Observation:
        return Observation(
            upstream=upstream,
            status=self.status,
            headers=self.response_headers,
            body=self.capture.body(),
            body_truncated=self.capture.truncated,
            latency_ms=self.latency_s * 1000,
            error=self.error,
        )

    def _failed(self, kind: TransportErrorKind) -> web.Response:
        self.error = kind
        return _upstream_failure(self.client.settings.name, kind, self.request_id)

    async def run(self, headers: list[tuple[str, str]], body: bytes) -> web.StreamResponse:
        request = self.request
        try:
            try:
                upstream = await self.client.send(request.method, request.raw_path, headers, body)
            except UpstreamError as exc:
                return self._failed(exc.kind)
            try:
                return await self._relay(upstream)
            finally:
                upstream.release()
        finally:
            self.latency_s = time.perf_counter() - self.started

    async def _relay(self, upstream: aiohttp.ClientResponse) -> web.StreamResponse:
        if not _ascii_headers(upstream.raw_headers):
            upstream.close()  # never reuse a connection that spoke oddly
            self.error = "protocol"
            name = self.client.settings.name
            message = f"primary upstream {name}: non-ASCII bytes in response headers"
            return error_response(502, message, self.request_id)
        self.status = upstream.status
        self.response_headers = decode_headers(upstream.raw_headers)
        out_headers = end_to_end(self.response_headers, _DROP_RESPONSE)
        out_headers.append((REQUEST_ID, self.request_id))
        reason = printable_reason(upstream.reason)
        length = upstream.content_length
        if self.request.method != "HEAD" and length is not None and length <= _WHOLE_BODY_LIMIT:
            try:
                data = await _read_whole(upstream, self.client.idle_s)
            except UpstreamError as exc:
                self.status = None
                return self._failed(exc.kind)
            self.capture.add(data)
            return web.Response(status=self.status, reason=reason, headers=out_headers, body=data)
        return await self._stream(upstream, reason, out_headers)

    async def _stream(
        self, upstream: aiohttp.ClientResponse, reason: str | None, headers: list[tuple[str, str]]
    ) -> web.StreamResponse:
        """Send the upstream's answer chunk by chunk as it arrives."""
        response = web.StreamResponse(status=upstream.status, reason=reason, headers=headers)
        request = self.request
        if upstream.content_length is not None:
            response.content_length = upstream.content_length
        elif request.version == aiohttp.HttpVersion10:
            # Delimited by the close for an HTTP/1.0 client; aiohttp (3.14) would otherwise
            # keep a keep-alive connection open and the answer would never end.
            response.force_close()
        try:
            await response.prepare(request)
            while chunk := await read_chunk(upstream, self.client.idle_s):
                self.capture.add(chunk)
                await response.write(chunk)
        except UpstreamError as exc:
            # The head is already sent: abort the client connection so a cut answer never looks
            # complete.
            self.error = exc.kind
            _abort(request)
            upstream.close()
        except ConnectionError:
            self.capture.truncated = True  # the client went away; the pair is still recorded
            _abort(request)
            upstream.close()
        return response


async def _read_whole(upstream: aiohttp.ClientResponse, idle_s: float) -> bytes:
    chunks: list[bytes] = []
    while chunk := await read_chunk(upstream, idle_s):
        chunks.append(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _abort(request: web.BaseRequest) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()


class _Capture:
    """The first ``limit`` bytes of a body as it goes past (what the comparison gets)."""

    __slots__ = ("_chunks", "_room", "truncated")

    def __init__(self, limit: int) -> None:
        self._chunks: list[bytes] = []
        self._room = limit
        self.truncated = False

    def add(self, chunk: bytes) -> None:
        if len(chunk) > self._room:
            chunk, self.truncated = chunk[: self._room], True
        if chunk:
            self._chunks.append(chunk)
            self._room -= len(chunk)

    def body(self) -> bytes:
        return b"".join(self._chunks)
