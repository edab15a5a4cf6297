"""Reload routes.yaml when its content changes.

Polls the sha256 of the file's bytes rather than mtimes or inotify: a Kubernetes
ConfigMap update swaps the ``..data`` symlink (the watched path never changes) and
editors replace the file; both show up as new content. A new hash must be read twice
in a row before it counts, so a file caught half-written is retried on the next tick;
a missing file is no change either. ``acknowledge`` records a hash reloaded elsewhere
(SIGHUP, the admin endpoint) so that change does not reload a second time.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from shadowproxy.base.tasks import spawn

log = structlog.get_logger("shadowproxy.watcher")


def file_sha256(path: str) -> str | None:
    """The sha256 of the file's bytes, or None while it is missing, unreadable or empty."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    return hashlib.sha256(data).hexdigest() if data else None


class ConfigWatcher:
    def __init__(
        self,
        path: str,
        on_change: Callable[[], Awaitable[None]],
        *,
        interval_s: float = 1.0,
    ) -> None:
        self.path = path
        self._on_change = on_change
        self._interval_s = interval_s
        self._seen: str | None = None  # the hash reloaded (or acknowledged) last
        self._candidate: str | None = None  # a new hash read once, waiting to be read again
        self._task: asyncio.Task[Any] | None = None

    @property
    def seen_sha256(self) -> str | None:
        return self._seen

    def acknowledge(self, sha256: str) -> None:
        """The file with this hash has been loaded; do not reload for it."""
        self._seen = sha256
        self._candidate = None

    def start(self) -> None:
        """Start polling (needs a running loop). Without an acknowledged hash, the current
        content is the baseline."""
        if self._task is not None:
            return
        if self._seen is None:
            self._seen = file_sha256(self.path)
        self._task = spawn(self._run(), name=f"config-watcher:{self.path}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # stop() itself was cancelled

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                await self.check()
            except Exception as exc:  # keep watching whatever one poll ran into
                log.exception("config_watcher_poll_failed", path=self.path, error=repr(exc))

    async def check(self) -> bool:
        """One poll; True when on_change was called."""
        current = await asyncio.to_thread(file_sha256, self.path)
        if current is None or current == self._seen:
            self._candidate = None
            return False
        if current != self._candidate:
            self._candidate = current  # maybe half-written: confirm on the next tick
            return False
        self.acknowledge(current)
        log.info("config_file_changed", path=self.path, sha256=current)
        try:
            await self._on_change()
        except Exception as exc:
            log.exception("config_reload_from_watcher_failed", path=self.path, error=repr(exc))
        return True
