"""Invariants checked after every fault test: no task, socket or file descriptor left behind."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from urllib.parse import urlsplit, urlunsplit

import pytest
import uvloop

from tests.recordkit import Forwarder

# The client-facing server is exercised on both event loops: the stdlib one the in-process
# tests default to, and uvloop, which `shadowproxy serve` runs on (its transports differ).
_BOTH_LOOPS = {"test_listener.py", "test_clients.py"}


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    if item.path.name in _BOTH_LOOPS:
        return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
    return {"asyncio": asyncio.new_event_loop}


def _open_fds() -> dict[int, str]:
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
    return fds


@pytest.fixture(autouse=True)
async def nothing_left_behind() -> AsyncIterator[None]:
    loop = asyncio.get_running_loop()
    unhandled: list[dict[str, object]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: unhandled.append(context))
    before = _open_fds()
    tasks_before = asyncio.all_tasks()
    yield
    loop_time = loop.time()
    while True:
        leftover_tasks = asyncio.all_tasks() - tasks_before - {asyncio.current_task()}
        extra = {fd: target for fd, target in _open_fds().items() if fd not in before}
        leaked_sockets = {fd: t for fd, t in extra.items() if t.startswith("socket:")}
        if not leftover_tasks and not leaked_sockets and len(extra) <= 2:
            break
        if loop.time() - loop_time > 10:
            pytest.fail(f"left behind: tasks {leftover_tasks}, file descriptors {extra}")
        await asyncio.sleep(0.05)
    loop.set_exception_handler(previous)
    # "Task exception was never retrieved" and friends land here. One exception: asyncpg sets
    # ConnectionError('unexpected connection_lost() call') on its own internal waiter when a
    # query it was running is cancelled by our write timeout and the server then vanishes
    # (MagicStack/asyncpg#1211); nobody of ours holds that future.
    ours = [
        c for c in unhandled if "unexpected connection_lost() call" not in str(c.get("exception"))
    ]
    assert ours == [], ours


@pytest.fixture
async def forwarder(postgres_url: str) -> AsyncIterator[tuple[Forwarder, str]]:
    """A TCP forwarder in front of the test PostgreSQL, and the URL that goes through it."""
    parts = urlsplit(postgres_url)
    fwd = Forwarder(parts.hostname or "127.0.0.1", parts.port or 5432)
    await fwd.accept()
    user = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
    yield fwd, urlunsplit(parts._replace(netloc=f"{user}127.0.0.1:{fwd.port}"))
    await fwd.refuse()
