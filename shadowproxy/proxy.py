"""The request path: route, forward to the primary, stream its answer back, hand off mirrors.

Nothing here waits for a shadow. The primary's answer is captured (up to the capture
limit) as it streams past, and completes the request's ``PairJoin`` when done.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import structlog

from shadowproxy.headers import REQUEST_ID, end_to_end, forwarded_for, request_id_from
from shadowproxy.httpclient import Connection, UpstreamError
from shadowproxy.httpserver import BodyTooLarge, Request, error_body
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
_JSON = "application/json"


def _ascii_headers(raw: list[tuple[bytes, bytes]]) -> bool:
    return b"".join([name + value for name, value in raw]).isascii()


def error_response(request: Request, status: int, message: str, request_id: str) -> None:
    """A JSON error answer; after 400, 408 and 413 the connection is closed, since the rest of
    what this client sent cannot be trusted or is unread."""
    request.respond(
        status,
        None,
        [("Content-Type", _JSON), (REQUEST_ID, request_id)],
        error_body(message, request_id),
        close=status in (400, 408, 413),
    )


def _upstream_failure(request: Request, upstream: str, kind: str, request_id: str) -> None:
    """The client's answer when the primary failed before any byte was forwarded."""
    code = 504 if kind == "timeout" else 502
    error_response(request, code, f"primary upstream {upstream}: {kind}", request_id)


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

    async def __call__(self, request: Request) -> None:
        if not self._runtime.settings.server.access_log:
            await self._handle(request)
            return
        started = time.perf_counter()
        request_id = await self._handle(request)
        access_log.info(
            "request",
            method=request.method,
            path=request.path,
            status=request.status,
            ms=round((time.perf_counter() - started) * 1000, 3),
            request_id=request_id,
            remote=request.remote,
        )

    async def _handle(self, request: Request) -> str:
        """Answer one request; returns its request id."""
        request_id = request_id_from(request.header("x-request-id"))
        if not request.target.startswith("/"):
            # Absolute-form or authority-form targets: the upstream is chosen by config only.
            error_response(request, 400, "request target must be an absolute path", request_id)
            return request_id
        generation = self._runtime.acquire()
        try:
            path = request.path
            route = generation.table.match(request.method, path, request.host or "")
            if route is None:
                message = f"no route matches {request.method} {path}"
                error_response(request, 404, message, request_id)
            else:
                await self._forward(request, generation, route, request_id)
        finally:
            self._runtime.release(generation)
        return request_id

    async def _forward(
        self,
        request: Request,
        generation: Generation,
        route: RouteSettings,
        request_id: str,
    ) -> None:
        settings = generation.settings.server
        received = time.time()
        try:
            body = await request.read_body(settings.max_body_bytes, settings.body_timeout_s)
        except BodyTooLarge:
            message = f"request body over {settings.max_body_bytes} bytes"
            error_response(request, 413, message, request_id)
            return
        except TimeoutError:
            error_response(request, 408, "request body not received in time", request_id)
            return
        except ConnectionResetError:
            return  # the client left (or its body broke off) before the request was whole

        headers = end_to_end(request.headers, _DROP_REQUEST)
        headers.append((REQUEST_ID, request_id))
        headers.append(
            (
                "X-Forwarded-For",
                forwarded_for(request.header("x-forwarded-for"), request.remote),
            )
        )
        headers.append(("X-Forwarded-Proto", request.scheme))
        if request.host:
            headers.append(("X-Forwarded-Host", request.host))

        join: PairJoin | None = None
        if route.shadows:
            raw_path, _, query = request.target.partition("?")
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
            error_response(request, 503, message, request_id)
            return
        try:
            await self._primary(request, client, route, headers, body, request_id, join)
        finally:
            client.release()

    async def _primary(
        self,
        request: Request,
        client: UpstreamClient,
        route: RouteSettings,
        headers: list[tuple[str, str]],
        body: bytes,
        request_id: str,
        join: PairJoin | None,
    ) -> None:
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
                    request.method, request.target, headers, body, idle_s=timeout
                )
            except UpstreamError as exc:
                error = exc.kind
                _upstream_failure(request, name, error, request_id)
                return
            try:
                if not _ascii_headers(upstream.headers):
                    error = "protocol"
                    upstream.close()  # never reuse a connection that spoke oddly
                    message = f"primary upstream {name}: non-ASCII bytes in response headers"
                    error_response(request, 502, message, request_id)
                    return
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
                        _upstream_failure(request, name, error, request_id)
                        return
                    capture.add(data)
                    request.respond(status, upstream.reason, out_headers, data)
                    return
                error = await _stream(request, upstream, timeout, out_headers, capture)
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
    request: Request,
    upstream: Connection,
    idle_s: float,
    headers: list[tuple[str, str]],
    capture: _Capture,
) -> str | None:
    """Send the upstream's answer chunk by chunk as it arrives; the error kind if it broke."""
    request.start(upstream.status, upstream.reason, headers, upstream.content_length)
    try:
        while chunk := await upstream.read_chunk(idle_s):
            capture.add(chunk)
            await request.send(chunk)
    except UpstreamError as exc:
        # The head is already sent: abort the client connection so a cut answer never looks
        # complete.
        request.abort()
        return exc.kind
    except ConnectionResetError:
        capture.truncated = True  # the client went away; the pair is still recorded
        request.abort()
        return None
    request.finish()
    return None
