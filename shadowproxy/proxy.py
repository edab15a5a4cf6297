"""The request path: route, forward to the primary, stream its answer back, hand off mirrors.

Nothing here waits for a shadow. The primary's answer is captured (up to the capture
limit) as it streams past, and completes the request's ``PairJoin`` when done.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from itertools import chain

import orjson
import structlog
from aiohttp import web

from shadowproxy.headers import REQUEST_ID, end_to_end, forwarded_for, request_id_from
from shadowproxy.httpclient import Connection, UpstreamError
from shadowproxy.metrics import Metrics
from shadowproxy.mirror import MirrorDispatcher, PairJoin
from shadowproxy.observation import Observation, RequestSnapshot, failed
from shadowproxy.runtime import Generation, Runtime
from shadowproxy.settings import RouteSettings
from shadowproxy.upstream import UpstreamClient, decode_headers

log = structlog.get_logger("shadowproxy.proxy")
access_log = structlog.get_logger("shadowproxy.access")

# Answers up to this size with a Content-Length are read whole and sent in one write;
# anything else (chunked, event streams, large bodies) is streamed chunk by chunk.
_WHOLE_BODY_LIMIT = 64 * 1024
_DROP_REQUEST = frozenset(
    {
        "host",
        "content-length",
        "x-request-id",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
    }
)
_DROP_RESPONSE = frozenset({"content-length", "x-request-id"})


def _ascii_headers(raw: Iterable[tuple[bytes, bytes]]) -> bool:
    return b"".join(chain.from_iterable(raw)).isascii()


class BodyTooLarge(Exception):
    pass


def error_response(status: int, message: str, request_id: str) -> web.Response:
    response = web.Response(
        status=status,
        body=orjson.dumps({"error": message, "request_id": request_id}),
        content_type="application/json",
        headers={REQUEST_ID: request_id},
    )
    if status in (400, 408, 413):
        response.force_close()  # the rest of what this client sent cannot be trusted or is unread
    return response


def _upstream_failure(upstream: str, kind: str, request_id: str) -> web.Response:
    """The client's answer when the primary failed before any byte was forwarded."""
    code = 504 if kind == "timeout" else 502
    return error_response(code, f"primary upstream {upstream}: {kind}", request_id)


async def read_body(request: web.BaseRequest, limit: int, idle_timeout_s: float) -> bytes:
    """The whole request body, at most ``limit`` bytes; each chunk must arrive within the idle timeout."""
    declared = request.content_length
    if declared is not None and declared > limit:
        raise BodyTooLarge
    if not request.body_exists:
        return b""
    content = request.content
    if declared is not None and content.total_bytes >= declared:
        return await content.readexactly(declared)  # already buffered: no wait, no timer
    chunks: list[bytes] = []
    size = 0
    while True:
        async with asyncio.timeout(idle_timeout_s):
            chunk = await content.readany()
        if not chunk:
            break
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


class ProxyHandler:
    def __init__(
        self,
        runtime: Runtime,
        dispatcher: MirrorDispatcher,
        metrics: Metrics,
        *,
        capture_limit: Callable[[], int],
    ) -> None:
        self._runtime = runtime
        self._dispatcher = dispatcher
        self._metrics = metrics
        self._capture_limit = capture_limit

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        if not self._runtime.settings.server.access_log:
            return await self._handle(request)
        started = time.perf_counter()
        response = await self._handle(request)
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

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        request_id = request_id_from(request.headers)
        raw_path = request.raw_path
        if not raw_path.startswith("/"):
            # Absolute-form or authority-form targets: the upstream is chosen by config only.
            return error_response(400, "request target must be an absolute path", request_id)
        if not _ascii_headers(request.raw_headers):
            # aiohttp's client would silently drop the non-ASCII bytes: refuse rather than alter.
            return error_response(400, "request headers contain non-ASCII bytes", request_id)
        generation = self._runtime.acquire()
        try:
            path = request.path
            route = generation.table.match(request.method, path, request.host)
            if route is None:
                return error_response(404, f"no route matches {request.method} {path}", request_id)
            return await self._forward(request, generation, route, request_id, raw_path)
        finally:
            self._runtime.release(generation)

    async def _forward(
        self,
        request: web.BaseRequest,
        generation: Generation,
        route: RouteSettings,
        request_id: str,
        raw_path: str,
    ) -> web.StreamResponse:
        settings = generation.settings.server
        received = time.time()
        try:
            body = await read_body(request, settings.max_body_bytes, settings.body_timeout_s)
        except BodyTooLarge:
            return error_response(
                413, f"request body over {settings.max_body_bytes} bytes", request_id
            )
        except TimeoutError:
            return error_response(408, "request body not received in time", request_id)

        headers = end_to_end(request.headers.items(), _DROP_REQUEST)
        headers.append((REQUEST_ID, request_id))
        headers.append(
            (
                "X-Forwarded-For",
                forwarded_for(request.headers.get("X-Forwarded-For"), request.remote),
            )
        )
        headers.append(("X-Forwarded-Proto", request.scheme))
        if request.host:
            headers.append(("X-Forwarded-Host", request.host))

        join: PairJoin | None = None
        if route.shadows:
            snapshot = RequestSnapshot(
                request_id=request_id,
                ts=received,
                route=route.name,
                method=request.method,
                path=request.path,
                query=request.query_string,
                headers=tuple((str(k), v) for k, v in headers),  # multidict's istr → str
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
            return await self._primary(
                request, client, route, raw_path, headers, body, request_id, join
            )
        finally:
            client.release()

    async def _primary(
        self,
        request: web.BaseRequest,
        client: UpstreamClient,
        route: RouteSettings,
        raw_path: str,
        headers: list[tuple[str, str]],
        body: bytes,
        request_id: str,
        join: PairJoin | None,
    ) -> web.StreamResponse:
        started = time.perf_counter()
        capture = _Capture(self._capture_limit() if join is not None else 0)
        status: int | None = None
        response_headers: tuple[tuple[str, str], ...] = ()
        error: str | None = None
        name = client.settings.name
        timeout = client.timeout_s
        try:
            try:
                upstream = await client.pool.send(
                    request.method, raw_path, headers, body, idle_s=timeout
                )
            except UpstreamError as exc:
                error = exc.kind
                return _upstream_failure(name, error, request_id)
            try:
                if not _ascii_headers(upstream.headers):
                    error = "protocol"
                    upstream.close()  # never reuse a connection that spoke oddly
                    message = f"primary upstream {name}: non-ASCII bytes in response headers"
                    return error_response(502, message, request_id)
                status = upstream.status
                response_headers = decode_headers(upstream.headers)
                out_headers = end_to_end(response_headers, _DROP_RESPONSE)
                out_headers.append((REQUEST_ID, request_id))
                length = upstream.content_length
                if request.method != "HEAD" and length is not None and length <= _WHOLE_BODY_LIMIT:
                    try:
                        data = await upstream.read(timeout)
                    except UpstreamError as exc:
                        error = exc.kind
                        return _upstream_failure(name, error, request_id)
                    capture.add(data)
                    return web.Response(
                        status=status, reason=upstream.reason, headers=out_headers, body=data
                    )
                response, error = await _stream(request, upstream, timeout, out_headers, capture)
                return response
            finally:
                upstream.release()
        finally:
            latency_s = time.perf_counter() - started
            code_label = str(status) if status is not None and error is None else (error or "error")
            self._metrics.observe_upstream(
                route.name, route.primary, "primary", code_label, latency_s
            )
            if join is not None:
                join.primary_done(
                    Observation(
                        upstream=route.primary,
                        status=status,
                        headers=response_headers,
                        body=capture.body(),
                        body_truncated=capture.truncated,
                        latency_ms=latency_s * 1000,
                        error=error,
                    )
                )


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


async def _stream(
    request: web.BaseRequest,
    upstream: Connection,
    idle_s: float,
    headers: list[tuple[str, str]],
    capture: _Capture,
) -> tuple[web.StreamResponse, str | None]:
    """Send the upstream's answer chunk by chunk as it arrives; the error kind if it broke."""
    response = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)
    if upstream.content_length is not None:
        response.content_length = upstream.content_length
    await response.prepare(request)
    try:
        while chunk := await upstream.read_chunk(idle_s):
            capture.add(chunk)
            await response.write(chunk)
    except UpstreamError as exc:
        # The head is already sent: abort the client connection so a cut answer never looks
        # complete.
        if request.transport is not None:
            request.transport.abort()
        return response, exc.kind
    except ConnectionResetError:
        capture.truncated = True  # the client went away; the pair is still recorded
        return response, None
    await response.write_eof()
    return response, None
