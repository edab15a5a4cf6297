"""Replay: judge a candidate on recorded traffic (``shadowproxy replay ROUTE --to URL``).

Recorded requests of the route (one per request id, bodies as stored) are re-sent
to ``--to`` at ``--rate`` requests per second with ``--concurrency`` in flight,
each answer compared with the recorded primary response under the route's
compare rule, and the pair stored with ``shadow_upstream = --name`` (default
``replay``) and ``ts`` = the time of the replay, so ``report --shadow NAME``
judges it like a live shadow. Requests whose stored body was truncated (or not
stored) and requests whose primary failed are skipped and counted.

Memory is bounded: requests are read a page at a time into a queue of a few
times ``--concurrency``, and pairs are written in batches. Resumable: requests
already stored under the name are skipped (inserts are idempotent too).
"""

from __future__ import annotations

import asyncio
import sys
import time
from contextlib import aclosing
from dataclasses import dataclass

from multidict import CIMultiDict

from shadowproxy.base.errors import StorageError, UsageError
from shadowproxy.config.load import split_base_path
from shadowproxy.config.settings import RouteSettings, Settings, UpstreamSettings
from shadowproxy.http.headers import HOP_BY_HOP, REQUEST_ID
from shadowproxy.pairs.compare import compare_responses
from shadowproxy.pairs.observation import Exchange, Observation, RequestSnapshot
from shadowproxy.pairs.record_build import TRUNCATION_MARKER, build_record
from shadowproxy.pairs.redact import REDACTED
from shadowproxy.proxy.upstream import UpstreamClient, observe
from shadowproxy.replay.source import RecordedRequest, recorded_requests
from shadowproxy.storage import open_store
from shadowproxy.storage.base import Store
from shadowproxy.storage.record import Record

DEFAULT_NAME = "replay"
BATCH = 200
_BODYLESS = frozenset({"GET", "HEAD", "DELETE", "OPTIONS"})
# Set again by the HTTP client for the body it sends, or meaningless for a new connection.
_DROP = HOP_BY_HOP | {"host", "content-length", REQUEST_ID.lower()}


@dataclass
class Progress:
    sent: int = 0
    agreed: int = 0
    errors: int = 0
    skipped: int = 0
    started: float = 0.0


class _Pacer:
    """Start times ``1/rate`` apart, whatever the concurrency."""

    def __init__(self, rate: float) -> None:
        self._interval = 1.0 / rate
        self._next = time.monotonic()
        self._lock = asyncio.Lock()

    async def wait(self) -> None:
        async with self._lock:
            slot = max(self._next, time.monotonic())
            self._next = slot + self._interval
        delay = slot - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)


def request_headers(recorded: RecordedRequest, route: RouteSettings) -> CIMultiDict[str]:
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in recorded.headers.items():
        if name.lower() not in _DROP and value != REDACTED:
            headers.add(name, value)
    headers[route.mirror.header] = "1"
    headers[REQUEST_ID] = recorded.request_id
    return headers


def _stored_body(text: str | None) -> tuple[bytes, bool]:
    if text is None:
        return b"", False
    if text.endswith(TRUNCATION_MARKER):
        return text[: -len(TRUNCATION_MARKER)].encode("utf-8"), True
    return text.encode("utf-8"), False


def replayable(recorded: RecordedRequest) -> bool:
    if recorded.primary_status is None:
        return False  # nothing to compare with
    if recorded.body is None:
        return recorded.method.upper() in _BODYLESS
    return not recorded.body.endswith(TRUNCATION_MARKER)


async def replay_one(
    recorded: RecordedRequest,
    *,
    client: UpstreamClient,
    settings: Settings,
    route: RouteSettings,
    instance: str,
) -> Record:
    body, _ = _stored_body(recorded.body)
    raw_path = recorded.path + (f"?{recorded.query}" if recorded.query else "")
    headers = request_headers(recorded, route)
    received = time.time()
    shadow = await observe(
        client,
        recorded.method,
        raw_path,
        headers.items(),
        body,
        route.mirror.max_capture_bytes,
    )
    primary_body, primary_truncated = _stored_body(recorded.primary_body)
    primary = Observation(
        upstream=recorded.primary_upstream,
        status=recorded.primary_status,
        headers=(),
        body=primary_body,
        body_truncated=primary_truncated,
        latency_ms=recorded.primary_latency_ms or 0.0,
    )
    exchange = Exchange(
        request=RequestSnapshot(
            request_id=recorded.request_id,
            ts=received,
            route=route.name,
            method=recorded.method,
            path=recorded.path,
            query=recorded.query,
            headers=tuple((str(k), v) for k, v in headers.items() if k != route.mirror.header),
            body=body,
        ),
        primary=primary,
        shadow=shadow,
        compare=route.compare,
        config_sha=settings.sha256,
    )
    comparison = compare_responses(route.compare, primary, shadow)
    return build_record(exchange, comparison, settings.storage, instance)


class _Writer:
    def __init__(self, store: Store) -> None:
        self._store = store
        self._pending: list[Record] = []

    async def add(self, record: Record) -> None:
        self._pending.append(record)
        if len(self._pending) >= BATCH:
            await self.flush()

    async def flush(self) -> None:
        batch, self._pending = self._pending, []
        if batch:
            await self._store.write(batch)


def _show(progress: Progress, name: str, limit: int | None, final: bool = False) -> None:
    if not sys.stderr.isatty():
        return
    elapsed = max(time.monotonic() - progress.started, 1e-9)
    done = f"{progress.sent}/{limit}" if limit else str(progress.sent)
    bar = ""
    if limit:
        filled = int(30 * progress.sent / limit)
        bar = "[" + "#" * filled + "." * (30 - filled) + "] "
    sys.stderr.write(
        f"\rreplay {name}: {bar}{done} sent, {progress.agreed} agree, "
        f"{progress.errors} errors, {progress.sent / elapsed:.1f} req/s" + ("\n" if final else "")
    )
    sys.stderr.flush()


async def run_replay(
    *,
    settings: Settings,
    route: RouteSettings,
    to: str,
    store_url: str,
    since_ts: float,
    limit: int | None,
    rate: float,
    concurrency: int,
    name: str,
) -> Progress:
    timeout_ms = max(
        (
            settings.upstreams[u].timeout_ms
            for u in (route.primary, *route.shadows)
            if u in settings.upstreams
        ),
        default=1000,
    )
    origin, base_path = split_base_path(to.rstrip("/"))
    client = UpstreamClient(
        UpstreamSettings(name=name, url=origin, base_path=base_path, timeout_ms=timeout_ms),
        "shadow",
        limit=concurrency,
    )
    store = open_store(store_url, instance=f"replay-{name}")
    progress = Progress(started=time.monotonic())
    queue: asyncio.Queue[RecordedRequest | None] = asyncio.Queue(maxsize=4 * concurrency)
    pacer = _Pacer(rate)
    instance = f"replay-{name}"
    try:
        await store.open()
        writer = _Writer(store)

        async def produce() -> None:
            queued = 0
            requests = recorded_requests(store_url, route.name, since_ts, name)
            async with aclosing(requests):  # closes the cursor's connection on --limit too
                async for recorded in requests:
                    if limit is not None and queued >= limit:
                        break
                    if not replayable(recorded):
                        progress.skipped += 1
                        continue
                    await queue.put(recorded)
                    queued += 1
            for _ in range(concurrency):
                await queue.put(None)

        async def work() -> None:
            while (recorded := await queue.get()) is not None:
                await pacer.wait()
                record = await replay_one(
                    recorded, client=client, settings=settings, route=route, instance=instance
                )
                progress.sent += 1
                progress.agreed += record.agreement is True
                progress.errors += record.shadow_error is not None
                await writer.add(record)
                _show(progress, name, limit)

        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(produce(), name="replay-reader")
                for i in range(concurrency):
                    group.create_task(work(), name=f"replay-worker-{i}")
        except ExceptionGroup as failed:
            # The store went away or the URL was bad: report that one error, not a tree.
            for exc in failed.exceptions:
                if isinstance(exc, StorageError | UsageError):
                    raise exc from None
            raise
        await writer.flush()
    finally:
        await client.close()
        await store.close()
    _show(progress, name, limit, final=True)
    return progress
