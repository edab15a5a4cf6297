"""Upstreams as the proxy sees them: one aiohttp ``ClientSession`` per (upstream, role), and
one-shot observations of an upstream's answer.

aiohttp does the HTTP (framing, head limits, trailers, which connection may be reused).
What a model server's proxy needs on top of it, each small and named here:

- ``timeout_ms`` bounds the wait for the response head and ``idle_timeout_ms`` each gap
  between body reads (aiohttp's ``sock_read`` is one number for both), so an LLM stream
  lives as long as it keeps sending;
- a request whose *reused* connection died before any response byte is sent once more on a
  fresh connection (aiohttp resends only idempotent methods): the upstream closed an idle
  connection just as we wrote on it, so it never saw the request;
- a pool slot per request, bounded, so requests beyond the pool get a 503, not a queue.

Each (upstream, role) gets its own pool so a saturated shadow can never take connections
the primary needs; every route that uses the upstream in that role shares the pool and its
``max_connections``. aiohttp errors become the kinds PRODUCT.md names at this boundary.
"""

from __future__ import annotations

import asyncio
import time
import warnings
import weakref
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from typing import Any

import aiohttp
from aiohttp import ClientRequest
from aiohttp.connector import Connection
from aiohttp.tracing import Trace
from yarl import URL

from shadowproxy.base.error_kinds import TransportErrorKind
from shadowproxy.config.settings import UpstreamSettings
from shadowproxy.pairs.observation import Observation, failed

# aiohttp would otherwise add headers the client never sent (and ask for gzip on its behalf).
_SKIP_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")
# RFC 9110 §9.2.2; aiohttp itself resends these once when a connection dies before the answer.
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})


class UpstreamError(Exception):
    """An upstream call failed; ``kind`` is one of connect, timeout, reset, protocol."""

    def __init__(self, kind: TransportErrorKind, detail: str = "") -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind: TransportErrorKind = kind


def error_kind(exc: BaseException) -> TransportErrorKind:
    if isinstance(exc, TimeoutError | aiohttp.ServerTimeoutError):
        return "timeout"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return "connect"
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError | OSError):
        return "reset"
    return "protocol"


def _payload(body: bytes) -> bytes | aiohttp.BytesPayload | None:
    """What to hand aiohttp as the body. Over 1 MiB aiohttp warns that bytes "might lock the
    event loop": the transport takes them in one write and drains, which is what we want
    (a BytesIO would be read through a thread pool instead)."""
    if len(body) <= 1024 * 1024:
        return body or None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        return aiohttp.BytesPayload(body, content_type="")


def _unanswered(exc: aiohttp.ClientError) -> bool:
    """True when the upstream dropped the connection before any byte of an answer: a
    ``ServerDisconnectedError`` carries the partial message when bytes had arrived."""
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return isinstance(exc.message, str)
    return True  # a reset or broken pipe while the request was written


class _Attempt:
    """What aiohttp did for one request: how many connections it took, the last one reused."""

    __slots__ = ("connections", "reused")

    def __init__(self) -> None:
        self.connections = 0
        self.reused = False


# The request being sent in this task (aiohttp asks its connector within the caller's task).
_attempt: ContextVar[_Attempt | None] = ContextVar("shadowproxy_upstream_attempt", default=None)


class _ReuseAwareConnector(aiohttp.TCPConnector):
    """A TCPConnector that tells the request in flight whether its connection was a pooled
    one (aiohttp says so only to trace hooks, which cost every request several awaits)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._used: weakref.WeakSet[object] = weakref.WeakSet()

    async def connect(
        self,
        req: ClientRequest,
        traces: list[Trace],
        timeout: aiohttp.ClientTimeout,  # noqa: ASYNC109 - aiohttp's signature
    ) -> Connection:
        while True:  # each stale one leaves the pool; a new connection is never stale
            connection = await super().connect(req, traces, timeout)
            protocol = connection.protocol
            reused = protocol in self._used
            if reused and protocol is not None and protocol.should_close:
                # Bytes arrived on it while it sat idle (aiohttp would hand them to the next
                # request as its answer), or it was marked unusable: drop it, take another.
                connection.close()
                continue
            break
        attempt = _attempt.get()
        if attempt is not None:
            attempt.connections += 1
            attempt.reused = reused
        if protocol is not None:
            self._used.add(protocol)
        return connection


def _session(settings: UpstreamSettings, limit: int, *, fresh: bool) -> aiohttp.ClientSession:
    if fresh:
        connector = aiohttp.TCPConnector(limit=limit, force_close=True)
    else:
        connector = _ReuseAwareConnector(
            limit=limit,
            limit_per_host=0,
            keepalive_timeout=settings.keepalive_idle_ms / 1000,
            ttl_dns_cache=60,
        )
    connect_s = settings.connect_timeout_ms / 1000
    return aiohttp.ClientSession(
        connector=connector,
        # Deadlines are ours (head, then each body gap); aiohttp's bound only the connect.
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=connect_s, connect=connect_s),
        auto_decompress=False,
        skip_auto_headers=_SKIP_AUTO_HEADERS,
        cookie_jar=aiohttp.DummyCookieJar(),
    )


class UpstreamClient:
    """One upstream's keep-alive pool for one role (``primary`` or ``shadow``)."""

    def __init__(
        self,
        settings: UpstreamSettings,
        role: str,
        *,
        limit: int,
        on_retry: Callable[[], None] = lambda: None,
    ) -> None:
        self.settings = settings
        self.role = role
        self.limit = limit
        self.timeout_s = settings.timeout_ms / 1000
        self.idle_s = settings.idle_timeout_ms / 1000
        self.on_retry = on_retry
        self._base = settings.url + settings.base_path
        self.session = _session(settings, limit, fresh=False)
        self._fresh: aiohttp.ClientSession | None = None  # made on the first resend
        # Requests beyond the pool wait here, at most `limit` of them and at most the
        # connect timeout; past that the proxy answers 503 instead of queueing without end.
        self._slots = asyncio.Semaphore(limit)
        self.waiting = 0

    @property
    def closed(self) -> bool:
        return self.session.closed

    async def acquire(self) -> bool:
        """A pool slot for one request, or False when the pool stays exhausted."""
        if not self._slots.locked():
            await self._slots.acquire()
            return True
        if self.waiting >= self.limit:
            return False
        self.waiting += 1
        try:
            async with asyncio.timeout(self.settings.connect_timeout_ms / 1000):
                await self._slots.acquire()
            return True
        except TimeoutError:
            return False
        finally:
            self.waiting -= 1

    def release(self) -> None:
        self._slots.release()

    def url(self, target: str) -> URL:
        """The upstream URL for a request target (path and query as the client sent them)."""
        return URL(self._base + target, encoded=True)

    async def send(
        self, method: str, target: str, headers: Iterable[tuple[str, str]], body: bytes
    ) -> aiohttp.ClientResponse:
        """Send one request; the response once its head arrived within ``timeout_ms``.

        The caller reads the body (``read_chunk``) and must ``release()`` or ``close()`` it.
        """
        url = self.url(target)
        header_list = list(headers)
        attempt = _Attempt()
        token = _attempt.set(attempt)
        try:
            async with asyncio.timeout(self.timeout_s):
                try:
                    response = await self.session.request(
                        method,
                        url,
                        headers=header_list,
                        data=_payload(body),
                        allow_redirects=False,
                    )
                except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
                    # aiohttp already resent an idempotent request once; resend the others
                    # only when a reused connection died unanswered (the upstream closed it
                    # as we wrote: it never saw the request).
                    if not attempt.reused or method in _IDEMPOTENT or not _unanswered(exc):
                        raise
                    self.on_retry()
                    if self._fresh is None:
                        self._fresh = _session(self.settings, self.limit, fresh=True)
                    response = await self._fresh.request(
                        method, url, headers=header_list, data=_payload(body), allow_redirects=False
                    )
                    return _checked(response)
                if attempt.connections > 1:
                    self.on_retry()  # aiohttp resent it (idempotent method)
                return _checked(response)
        except TimeoutError:
            raise UpstreamError("timeout") from None
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            raise UpstreamError(error_kind(exc), str(exc)) from exc
        finally:
            _attempt.reset(token)

    async def close(self) -> None:
        await self.session.close()
        if self._fresh is not None:
            await self._fresh.close()


def _checked(response: aiohttp.ClientResponse) -> aiohttp.ClientResponse:
    """Refuse an answer whose body aiohttp cannot hand over as the upstream meant it: a
    transfer-coding other than chunked (aiohttp strips ``chunked`` only, and passing coded
    bytes on would mislabel them)."""
    if response.status < 200:
        # aiohttp skips 100 and 103; a 101 (or any other 1xx) was never asked for.
        response.close()
        raise UpstreamError("protocol", f"unexpected {response.status} answer")
    coding = response.headers.get("Transfer-Encoding")
    if coding is not None and coding.strip().lower() != "chunked":
        response.close()
        raise UpstreamError("protocol", f"unsupported transfer-coding {coding!r}")
    return response


async def read_chunk(response: aiohttp.ClientResponse, idle_s: float) -> bytes:
    """The next body bytes (b"" at the end), waiting at most ``idle_s`` for them."""
    content = response.content
    try:
        if content.is_eof():  # the whole body is here already (most small answers): no timer
            return content.read_nowait()
        async with asyncio.timeout(idle_s):
            return await content.readany()
    except TimeoutError:
        raise UpstreamError("timeout") from None
    except (aiohttp.ClientError, OSError) as exc:
        raise UpstreamError(error_kind(exc), str(exc)) from exc


async def observe(
    client: UpstreamClient,
    method: str,
    target: str,
    headers: Iterable[tuple[str, str]],
    body: bytes,
    capture_limit: int,
) -> Observation:
    """Send one request and capture the answer (body up to ``capture_limit``). Never raises
    except on cancellation."""
    started = time.perf_counter()
    name = client.settings.name
    try:
        response = await client.send(method, target, headers, body)
        try:
            chunks: list[bytes] = []
            room = capture_limit
            truncated = False
            while chunk := await read_chunk(response, client.idle_s):
                if len(chunk) > room:
                    chunks.append(chunk[:room])
                    truncated = True
                    break  # stop reading; the connection is closed, not reused
                chunks.append(chunk)
                room -= len(chunk)
            return Observation(
                upstream=name,
                status=response.status,
                headers=decode_headers(response.raw_headers),
                body=chunks[0] if len(chunks) == 1 else b"".join(chunks),
                body_truncated=truncated,
                latency_ms=(time.perf_counter() - started) * 1000,
            )
        finally:
            if response.content.is_eof():
                response.release()
            else:
                response.close()
    except UpstreamError as exc:
        return failed(name, exc.kind, (time.perf_counter() - started) * 1000)


def decode_headers(raw: Iterable[tuple[bytes, bytes]]) -> tuple[tuple[str, str], ...]:
    return tuple((name.decode("latin-1"), value.decode("latin-1")) for name, value in raw)
