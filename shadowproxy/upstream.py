"""Connection pools to upstreams and one-shot observations of an upstream's answer.

Each (upstream, role) gets its own pool so a saturated shadow can never take
connections the primary needs. aiohttp errors are translated here, at the boundary,
into the error kinds PRODUCT.md names.
"""

from __future__ import annotations

import asyncio
import io
import time

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from shadowproxy.observation import Observation
from shadowproxy.settings import UpstreamSettings

# aiohttp would otherwise add headers the client never sent (and ask for gzip on its behalf).
_SKIP_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")


class UpstreamClient:
    """One upstream's keep-alive pool for one role (``primary`` or ``shadow``)."""

    def __init__(self, settings: UpstreamSettings, role: str, *, limit: int) -> None:
        self.settings = settings
        self.role = role
        self.base = settings.url
        self.limit = limit
        # Requests beyond the pool wait here, at most `limit` of them and at most the
        # connect timeout; past that the proxy answers 503 instead of queueing without end.
        self._slots = asyncio.Semaphore(limit)
        self.waiting = 0
        connector = aiohttp.TCPConnector(limit=limit, limit_per_host=0, ttl_dns_cache=60)
        if role == "primary":
            # No total deadline: a streamed answer may legitimately last long; a silent
            # upstream is caught by the read deadline.
            timeout = aiohttp.ClientTimeout(
                total=None,
                connect=settings.connect_timeout_ms / 1000,
                sock_read=settings.timeout_ms / 1000,
            )
        else:
            timeout = aiohttp.ClientTimeout(
                total=settings.timeout_ms / 1000, connect=settings.connect_timeout_ms / 1000
            )
        self.session = aiohttp.ClientSession(
            connector=connector,
            timeout=timeout,
            auto_decompress=False,
            skip_auto_headers=_SKIP_AUTO_HEADERS,
            cookie_jar=aiohttp.DummyCookieJar(),
        )

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

    def url(self, raw_path: str) -> URL:
        """The upstream URL for a request target; only the configured origin is ever used."""
        return URL(self.base + raw_path, encoded=True)

    async def close(self) -> None:
        await self.session.close()


_LARGE_BODY = 1024 * 1024


def request_payload(body: bytes) -> bytes | io.BytesIO | None:
    """What to hand aiohttp as the body: large ones as a stream so writing them yields to the loop."""
    if not body:
        return None
    return io.BytesIO(body) if len(body) > _LARGE_BODY else body


def error_kind(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError | aiohttp.ServerTimeoutError):
        return "timeout"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return "connect"
    if isinstance(exc, aiohttp.ServerDisconnectedError | ConnectionResetError):
        return "reset"
    if isinstance(exc, aiohttp.ClientOSError):
        return "reset"
    return "protocol"


async def observe(
    client: UpstreamClient,
    method: str,
    raw_path: str,
    headers: CIMultiDict[str],
    body: bytes,
    capture_limit: int,
) -> Observation:
    """Send one request and capture the answer (body up to ``capture_limit``). Never raises
    except on cancellation."""
    started = time.perf_counter()
    try:
        async with client.session.request(
            method,
            client.url(raw_path),
            headers=headers,
            data=request_payload(body),
            allow_redirects=False,
        ) as response:
            chunks: list[bytes] = []
            size = 0
            truncated = False
            async for chunk in response.content.iter_any():
                size += len(chunk)
                if size > capture_limit:
                    chunks.append(chunk[: capture_limit - (size - len(chunk))])
                    truncated = True
                    response.close()  # stop reading; the connection is not reused
                    break
                chunks.append(chunk)
            return Observation(
                upstream=client.settings.name,
                status=response.status,
                headers=tuple((str(k), v) for k, v in response.headers.items()),
                body=b"".join(chunks),
                body_truncated=truncated,
                latency_ms=(time.perf_counter() - started) * 1000,
            )
    except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as exc:
        return Observation(
            upstream=client.settings.name,
            status=None,
            headers=(),
            body=b"",
            body_truncated=False,
            latency_ms=(time.perf_counter() - started) * 1000,
            error=error_kind(exc),
        )
