"""The client's request body: read whole, bounded per request and for the whole process.

Bodies are held in memory (a mirror and a resend need them whole). ``server.max_body_bytes``
bounds one body; ``BodyBudget`` (``server.max_buffered_body_bytes``) bounds all of them
together, so thousands of clients each uploading ``max_body_bytes`` cannot take thousands of
times that: past the budget a request gets 503 before its body is read, and aiohttp's flow
control leaves the rest in the client's socket.
"""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class BodyTooLarge(Exception):
    pass


class BodyMalformed(Exception):
    pass


class BodyBudgetExhausted(Exception):
    pass


class BodyBudget:
    """Request-body bytes this process holds at once, at most ``limit``."""

    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, size: int) -> None:
        if self.used + size > self.limit:
            raise BodyBudgetExhausted
        self.used += size

    def give(self, size: int) -> None:
        self.used -= size


async def read_body(
    request: web.BaseRequest, limit: int, idle_timeout_s: float, budget: BodyBudget
) -> bytes:
    """The whole request body, at most ``limit`` bytes, taken from ``budget`` (the caller
    gives ``len(body)`` back when done with it); each chunk must arrive within the idle
    timeout. ``Expect: 100-continue`` is answered here, once the request is worth its body."""
    declared = request.content_length
    if declared is not None and declared > limit:
        raise BodyTooLarge
    if not request.body_exists:
        return b""
    held = declared or 0
    budget.take(held)  # a declared length is reserved before a byte is read
    try:
        body = await _read(request, limit, idle_timeout_s, budget, declared is None)
    except BaseException:
        budget.give(held)
        raise
    if declared is not None:
        budget.give(held - len(body))  # what was reserved but did not come (normally 0)
    return body


async def _read(
    request: web.BaseRequest,
    limit: int,
    idle_timeout_s: float,
    budget: BodyBudget,
    chunked: bool,
) -> bytes:
    if request.version == aiohttp.HttpVersion11 and "Expect" in request.headers:
        await request.writer.write(_CONTINUE)
    content = request.content
    if content.is_eof():  # the whole body came with the head: no timer
        data = content.read_nowait()
        if len(data) > limit:
            raise BodyTooLarge
        if chunked:
            budget.take(len(data))
        return data
    chunks: list[bytes] = []
    size = 0
    try:
        while True:
            try:
                async with asyncio.timeout(idle_timeout_s):
                    chunk = await content.readany()
            except HttpProcessingError as exc:  # failed by the listener: the body stopped parsing
                raise BodyMalformed from exc
            if not chunk:
                break
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge
            if chunked:
                budget.take(len(chunk))  # no length was declared: taken as it arrives
            chunks.append(chunk)
    except BaseException:
        if chunked:
            budget.give(sum(len(c) for c in chunks))
        raise
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)
