"""Owned background tasks: named, referenced, exceptions logged and counted.

Bare ``asyncio.create_task`` is banned (ruff TID251): a task nobody holds can be
garbage-collected mid-flight and its exception is never retrieved.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import structlog

log = structlog.get_logger("shadowproxy.tasks")


class TaskGroup:
    """A set of named background tasks that can be cancelled together on shutdown."""

    def __init__(self, on_error: Callable[[str, BaseException], None] | None = None) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()
        self._on_error = on_error

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("background_task_failed", task=task.get_name(), error=repr(exc))
            if self._on_error is not None:
                self._on_error(task.get_name(), exc)

    async def wait(self, deadline_s: float | None) -> int:
        """Wait for the tasks to finish; return how many were still running at the deadline."""
        if not self._tasks:
            return 0
        _, pending = await asyncio.wait(set(self._tasks), timeout=deadline_s)
        return len(pending)

    async def cancel_all(self) -> int:
        """Cancel every task and wait for them; return how many were cancelled."""
        tasks = set(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        return len(tasks)


def spawn(coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
    """Create a named task for callers that keep the returned reference themselves."""
    return asyncio.create_task(coro, name=name)
