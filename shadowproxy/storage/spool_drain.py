"""Replay the spool into a store: closed segments in write order, each deleted once stored.

Re-sending is safe because every store inserts idempotently on
(request_id, shadow_upstream): a segment replayed twice (a crash between the
last write and the delete) adds nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from shadowproxy.storage.base import Store
from shadowproxy.storage.batch import RecordsRejected
from shadowproxy.storage.spool import Spool

log = structlog.get_logger("shadowproxy.spool_replay")


@dataclass(slots=True)
class ReplayStats:
    corrupt: int = 0  # torn or unreadable lines skipped
    rejected: int = 0  # records the store refused for their content (lost, logged)


async def replay_spool(
    spool: Spool,
    store: Store,
    stats: ReplayStats,
    *,
    batch_size: int,
    timeout_s: float,
    on_segment: Callable[[], None] = lambda: None,
) -> None:
    """Store every closed segment (rotating the active one first).

    Raises StorageError or TimeoutError when the store fails midway; the
    segment being replayed stays in the spool for the next attempt.
    ``stats`` is updated as segments go, so it is right even after a failure.
    """
    if spool.pending == 0 and not await asyncio.to_thread(spool.segments):
        return
    await asyncio.to_thread(spool.rotate)
    for path in await asyncio.to_thread(spool.segments):
        claim = await asyncio.to_thread(spool.claim, path)
        if claim is None:
            continue  # another live process's active segment, or already replayed
        try:
            segment = await asyncio.to_thread(spool.read, claim)
            if segment.corrupt:
                stats.corrupt += segment.corrupt
                log.warning("spool_corrupt_lines", segment=path, lines=segment.corrupt)
            for start in range(0, len(segment.records), batch_size):
                try:
                    async with asyncio.timeout(timeout_s):
                        await store.write(segment.records[start : start + batch_size])
                except RecordsRejected as exc:
                    stats.rejected += len(exc.rejected)
                    log.warning("spooled_records_rejected", count=len(exc.rejected))
            await asyncio.to_thread(spool.finish, claim)
        finally:
            claim.release()  # idempotent: finish may have released it already
            on_segment()
