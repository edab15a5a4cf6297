"""Upstreams as the proxy sees them: one bounded pool per (upstream, role), and one-shot
observations of an upstream's answer.

Each (upstream, role) gets its own pool so a saturated shadow can never take connections
the primary needs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable

from shadowproxy.httpclient import ConnectionPool, UpstreamError
from shadowproxy.observation import Observation, failed
from shadowproxy.settings import UpstreamSettings


class UpstreamClient:
    """One upstream's keep-alive pool for one role (``primary`` or ``shadow``).

    A primary's answer may stream for as long as it keeps sending: only silence longer than
    ``timeout_ms`` ends it. A shadow's whole call is bounded by ``timeout_ms``. Both are
    ``timeout_s``.
    """

    def __init__(self, settings: UpstreamSettings, role: str, *, limit: int) -> None:
        self.settings = settings
        self.role = role
        self.limit = limit
        self.timeout_s = settings.timeout_ms / 1000
        self.pool = ConnectionPool(settings.url, connect_timeout=settings.connect_timeout_ms / 1000)
        # Requests beyond the pool wait here, at most `limit` of them and at most the
        # connect timeout; past that the proxy answers 503 instead of queueing without end.
        self._slots = asyncio.Semaphore(limit)
        self.waiting = 0

    @property
    def closed(self) -> bool:
        return self.pool.closed

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

    async def close(self) -> None:
        await self.pool.close()


async def observe(
    client: UpstreamClient,
    method: str,
    raw_path: str,
    headers: Iterable[tuple[str, str]],
    body: bytes,
    capture_limit: int,
) -> Observation:
    """Send one request and capture the answer (body up to ``capture_limit``), all within
    the upstream's timeout. Never raises except on cancellation."""
    started = time.perf_counter()
    name = client.settings.name
    try:
        connection = await client.pool.send(
            method, raw_path, headers, body, idle_s=None, total_s=client.timeout_s
        )
        try:
            chunks: list[bytes] = []
            room = capture_limit
            truncated = False
            while chunk := await connection.read_chunk(None):
                if len(chunk) > room:
                    chunks.append(chunk[:room])
                    truncated = True
                    break  # stop reading; the connection is closed, not reused
                chunks.append(chunk)
                room -= len(chunk)
            return Observation(
                upstream=name,
                status=connection.status,
                headers=decode_headers(connection.headers),
                body=chunks[0] if len(chunks) == 1 else b"".join(chunks),
                body_truncated=truncated,
                latency_ms=(time.perf_counter() - started) * 1000,
            )
        finally:
            connection.release()
    except UpstreamError as exc:
        return failed(name, exc.kind, (time.perf_counter() - started) * 1000)


def decode_headers(raw: list[tuple[bytes, bytes]]) -> tuple[tuple[str, str], ...]:
    return tuple((name.decode("latin-1"), value.decode("latin-1")) for name, value in raw)
