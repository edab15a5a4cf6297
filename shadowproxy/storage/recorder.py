"""The recorder: takes finished records off the request path and gets them stored.

    submit() ──► buffer (queue_max) ──► writer task ──► store.write(batch)
        │ full                              │ store down / slow
        ▼                                   ▼
    overflow ──► spooler task ──────────► spool (disk) ──► drainer task ──► store
        │ full                              │ unusable               (when the store is back)
        ▼                                   ▼
     dropped                             dropped

``submit`` never blocks and never raises. Each record is counted once, by where
it went first: ``written``, ``spooled`` or ``dropped``; records replayed from the
spool are not counted again. Once the buffer is empty,
written + spooled + dropped == submitted.

The drainer owns recovery: while the store is down it probes with backoff;
once it is up it replays the spool in order (idempotent inserts make re-sent
records harmless) until ``spool_pending`` is 0. One log line per state change
(storage down/up, spool unusable/usable), never per record.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import structlog

from shadowproxy.base.errors import StorageError
from shadowproxy.base.tasks import TaskGroup
from shadowproxy.config.settings import StorageSettings
from shadowproxy.storage.base import PromotionRecord, Store
from shadowproxy.storage.batch import RecordsRejected
from shadowproxy.storage.record import Record
from shadowproxy.storage.spool import Spool
from shadowproxy.storage.spool_drain import ReplayStats, replay_spool
from shadowproxy.telemetry.metrics import Metrics

log = structlog.get_logger("shadowproxy.recorder")

RETENTION_BATCH = 5000
RETENTION_FIRST_DELAY_S = 60.0
MAX_BACKOFF_S = 5.0
OPEN_TIMEOUT_S = 30.0  # connecting and migrating may take longer than one write


class Recorder:
    def __init__(
        self,
        store: Store,
        settings: StorageSettings,
        metrics: Metrics,
        *,
        instance: str,
        spool: Spool | None = None,
        write_timeout_s: float = 10.0,
        retention_interval_s: float = 3600.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._settings = settings
        self._metrics = metrics
        self._spool = spool or Spool(settings.spool_dir, instance=instance)
        self._write_timeout = write_timeout_s
        self._retention_interval = retention_interval_s
        self._clock = clock
        self._batch_size = max(1, settings.batch_size)
        self._flush_s = settings.flush_interval_ms / 1000
        self._buffer: deque[Record] = deque()
        self._overflow: deque[Record] = deque()
        self._overflow_max = max(1000, self._batch_size * 10)
        self._inflight: list[Record] = []  # the writer's batch
        self._spooling: list[Record] = []  # the spooler's batch
        self._wake_writer = asyncio.Event()
        self._batch_ready = asyncio.Event()
        self._wake_spooler = asyncio.Event()
        self._wake_drainer = asyncio.Event()
        self._tasks = TaskGroup(on_error=self._task_failed)
        self._writer: asyncio.Task[Any] | None = None
        self._spooler: asyncio.Task[Any] | None = None
        self._closing = False
        self._stopped = False  # after close: submit drops
        self.store_ok = False
        self._logged_state: bool | None = None  # store state last logged
        self.spool_ok = True
        self._pending_promotions: list[PromotionRecord] = []
        self.counts = {"submitted": 0, "written": 0, "spooled": 0, "dropped": 0}
        self._replay_stats = ReplayStats()

    # -- public API -------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the spool and the store; a store that is down is retried in the background."""
        try:
            pending = await asyncio.to_thread(self._spool.open)
            if pending:
                log.info("spool_leftover", records=pending, directory=self._spool.directory)
            self.spool_ok = await asyncio.to_thread(self._spool.writable)
        except OSError as exc:
            self._set_spool_ok(False, exc)
        self._metrics.spool_pending.set(self._spool.pending)
        try:
            async with asyncio.timeout(max(self._write_timeout, OPEN_TIMEOUT_S)):
                await self._store.open()
            self._mark_up()
        except (StorageError, TimeoutError) as exc:
            self._mark_down(exc)
        self._writer = self._tasks.spawn(self._write_loop(), "recorder-writer")
        self._spooler = self._tasks.spawn(self._spool_loop(), "recorder-spooler")
        self._tasks.spawn(self._drain_loop(), "recorder-drainer")
        self._tasks.spawn(self._retention_loop(), "recorder-retention")

    def apply(self, settings: StorageSettings) -> None:
        """A reload's storage settings: all but ``url`` and ``spool_dir`` (a restart) apply now."""
        self._settings = settings
        self._batch_size = max(1, settings.batch_size)
        self._flush_s = settings.flush_interval_ms / 1000
        self._overflow_max = max(1000, self._batch_size * 10)
        self._batch_ready.set()  # a writer waiting on the old flush interval looks again

    def submit(self, record: Record) -> None:
        """Queue a record for storage. Never blocks, never raises."""
        self.counts["submitted"] += 1
        if self._stopped:
            self._count("dropped", 1)
        elif len(self._buffer) < self._settings.queue_max:
            self._buffer.append(record)
            self._wake_writer.set()
            if len(self._buffer) >= self._batch_size:
                self._batch_ready.set()
            self._metrics.record_queue_depth.set(len(self._buffer))
        elif len(self._overflow) < self._overflow_max:
            self._overflow.append(record)
            self._wake_spooler.set()
        else:
            self._count("dropped", 1)

    @property
    def ready(self) -> bool:
        """Records can go somewhere durable: the store is writable or spooling works."""
        return self.store_ok or self.spool_ok

    def status(self) -> dict[str, Any]:
        return {
            "backend": self._store.backend,
            "queue_depth": len(self._buffer),
            "spool_pending": self._spool.pending,
            "written": self.counts["written"],
            "spooled": self.counts["spooled"],
            "dropped": self.counts["dropped"],
            "submitted": self.counts["submitted"],
            "store_ok": self.store_ok,
            "spool_ok": self.spool_ok,
            "spool_corrupt": self._replay_stats.corrupt,
            "spool_rejected": self._replay_stats.rejected,
        }

    async def record_promotion(self, promotion: PromotionRecord) -> bool:
        """Store a promotion; while the store is down it is kept and written once it is back.

        Returns True when this call stored it, False when another replica already had or
        when it was deferred."""
        try:
            async with asyncio.timeout(self._write_timeout):
                return await self._store.record_promotion(promotion)
        except (StorageError, TimeoutError) as exc:
            self._pending_promotions.append(promotion)
            log.warning("promotion_record_deferred", route=promotion.route, error=repr(exc))
            self._mark_down(exc)
            return False

    async def close(self, timeout: float) -> None:  # noqa: ASYNC109 - one budget split across phases
        """Flush the buffer to the store (or the spool, if the store cannot take it in time),
        stop every task, close the spool and the store."""
        if self._closing:
            return
        self._closing = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        for event in (self._wake_writer, self._batch_ready, self._wake_spooler):
            event.set()
        leftover: list[Record] = []
        for task, inflight in ((self._writer, self._inflight), (self._spooler, self._spooling)):
            if task is None:
                continue
            done, _ = await asyncio.wait({task}, timeout=max(0.0, (deadline - loop.time()) * 0.7))
            if not done:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                leftover.extend(inflight)  # its batch was not counted: spool it below
        leftover.extend(self._buffer)
        leftover.extend(self._overflow)
        self._buffer.clear()
        self._overflow.clear()
        self._stopped = True
        if leftover:
            await self._spool_batch(leftover)
        cancelled = await self._tasks.cancel_all()
        await asyncio.to_thread(self._spool.close)
        try:
            async with asyncio.timeout(max(0.1, deadline - loop.time())):
                await self._store.close()
        except (StorageError, TimeoutError, OSError) as exc:
            log.warning("store_close_failed", error=repr(exc))
        self._metrics.record_queue_depth.set(0)
        log.info("recorder_closed", cancelled_tasks=cancelled, **self.status())

    # -- writer: buffer -> store ------------------------------------------------------------

    async def _write_loop(self) -> None:
        while True:
            if not self._buffer:
                if self._closing:
                    return
                self._wake_writer.clear()
                await self._wake_writer.wait()
                continue
            if len(self._buffer) < self._batch_size and not self._closing:
                self._batch_ready.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._batch_ready.wait(), self._flush_s)
            take = min(self._batch_size, len(self._buffer))
            self._inflight = [self._buffer.popleft() for _ in range(take)]
            self._metrics.record_queue_depth.set(len(self._buffer))
            await self._store_batch(self._inflight)
            self._inflight = []

    async def _store_batch(self, batch: list[Record]) -> None:
        if self.store_ok:
            try:
                async with asyncio.timeout(self._write_timeout):
                    await self._store.write(batch)
                self._count("written", len(batch))
                return
            except RecordsRejected as exc:
                self._count("written", exc.stored)
                self._count("dropped", len(exc.rejected))
                log.warning("records_rejected", count=len(exc.rejected), error=str(exc)[:300])
                return
            except (StorageError, TimeoutError) as exc:
                self._mark_down(exc)
            except Exception as exc:  # a backend bug must not lose the batch
                log.exception("store_write_failed")
                self._metrics.background_errors_total.labels(task="recorder-writer").inc()
                self._mark_down(exc)
        await self._spool_batch(batch)

    # -- spooler: overflow -> spool ---------------------------------------------------------

    async def _spool_loop(self) -> None:
        while True:
            if not self._overflow:
                if self._closing:
                    return
                self._wake_spooler.clear()
                await self._wake_spooler.wait()
                continue
            take = min(self._batch_size, len(self._overflow))
            self._spooling = [self._overflow.popleft() for _ in range(take)]
            await self._spool_batch(self._spooling)
            self._spooling = []

    async def _spool_batch(self, batch: Sequence[Record]) -> None:
        try:
            await asyncio.to_thread(self._spool.append, batch)
        except OSError as exc:
            self._set_spool_ok(False, exc)
            self._count("dropped", len(batch))
            return
        self._set_spool_ok(True, None)
        self._count("spooled", len(batch))
        self._metrics.spool_pending.set(self._spool.pending)
        self._wake_drainer.set()

    # -- drainer: probe the store while down, replay the spool when up ----------------------

    async def _drain_loop(self) -> None:
        backoff = 0.05
        while True:
            if not self.store_ok:
                if not await self._probe():
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, MAX_BACKOFF_S)
                    continue
                backoff = 0.05
                self._mark_up()
            self._wake_drainer.clear()
            try:
                await self._replay()
                await self._flush_promotions()
            except (StorageError, TimeoutError) as exc:
                self._mark_down(exc)
                continue
            except Exception:  # spool file trouble or a bug: keep the drainer alive
                log.exception("spool_replay_failed")
                self._metrics.background_errors_total.labels(task="recorder-drainer").inc()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
                continue
            if self._spool.pending == 0 or not self.store_ok:
                await self._wake_drainer.wait()

    async def _probe(self) -> bool:
        """Can the store take writes again? A no-op delete is the protocol's cheapest round trip."""
        try:
            async with asyncio.timeout(max(self._write_timeout, OPEN_TIMEOUT_S)):
                await self._store.open()
            async with asyncio.timeout(self._write_timeout):
                await self._store.delete_older_than(0.0, 1)
        except (StorageError, TimeoutError, OSError):
            return False
        return True

    async def _replay(self) -> None:
        await replay_spool(
            self._spool,
            self._store,
            self._replay_stats,
            batch_size=self._batch_size,
            timeout_s=self._write_timeout,
            on_segment=lambda: self._metrics.spool_pending.set(self._spool.pending),
        )

    async def _flush_promotions(self) -> None:
        while self._pending_promotions:
            promotion = self._pending_promotions[0]
            async with asyncio.timeout(self._write_timeout):
                await self._store.record_promotion(promotion)
            self._pending_promotions.pop(0)

    # -- retention --------------------------------------------------------------------------

    async def _retention_loop(self) -> None:
        # The first pass waits a little: start-up belongs to the spool replay.
        await asyncio.sleep(min(self._retention_interval, RETENTION_FIRST_DELAY_S))
        while True:
            if self.store_ok and self._settings.retention_days > 0:
                await self.enforce_retention()
            await asyncio.sleep(self._retention_interval)

    async def enforce_retention(self) -> int:
        """Delete records older than retention_days in batches; return how many."""
        cutoff = self._clock() - self._settings.retention_days * 86400
        total = 0
        try:
            while True:
                async with asyncio.timeout(self._write_timeout):
                    deleted = await self._store.delete_older_than(cutoff, RETENTION_BATCH)
                total += deleted
                if deleted < RETENTION_BATCH:
                    break
                await asyncio.sleep(0)  # let the writer in between batches
        except (StorageError, TimeoutError) as exc:
            log.warning("retention_failed", error=repr(exc))
        if total:
            log.info("retention_deleted", records=total, days=self._settings.retention_days)
        return total

    # -- state and accounting ---------------------------------------------------------------

    def _count(self, outcome: str, n: int) -> None:
        if n:
            self.counts[outcome] += n
            self._metrics.records_total.labels(outcome=outcome).inc(n)

    def _mark_down(self, exc: BaseException) -> None:
        if self._logged_state is not False:
            log.warning("storage_down", backend=self._store.backend, error=repr(exc)[:300])
        self._logged_state = self.store_ok = False
        self._wake_drainer.set()

    def _mark_up(self) -> None:
        if self._logged_state is not True:
            log.info("storage_up", backend=self._store.backend, location=self._store.location)
        self._logged_state = self.store_ok = True

    def _set_spool_ok(self, ok: bool, exc: BaseException | None) -> None:
        if ok != self.spool_ok:
            if ok:
                log.info("spool_usable", directory=self._spool.directory)
            else:
                log.error("spool_unusable", directory=self._spool.directory, error=repr(exc))
        self.spool_ok = ok

    def _task_failed(self, name: str, exc: BaseException) -> None:
        self._metrics.background_errors_total.labels(task=name).inc()
