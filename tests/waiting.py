"""Waiting in tests: poll a condition until it holds, or fail with TimeoutError."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def until(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    """Return once ``condition()`` is true; raise TimeoutError after ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.005)
