"""JSON Lines store: one file per UTC day and per worker process.

``shadow_log-2026-11-30-<instance>.jsonl`` holds one object per pair with the
table's keys (``ts`` as ISO-8601 UTC text); promotions go to
``shadow_promotions-<day>-<instance>.jsonl``. Each process writes only its own
files, so no locking is needed. Appends run in a worker thread and are fsynced
per batch. Idempotency is per process: keys written recently are remembered
(bounded), so a re-sent batch adds nothing; across a crash a record may appear
twice, which readers dedupe by (request_id, shadow_upstream).
"""

from __future__ import annotations

import asyncio
import glob
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict

import orjson

from shadowproxy.base.errors import StorageUnavailable
from shadowproxy.storage.base import PromotionRecord
from shadowproxy.storage.codec import iso_ts, record_to_table_dict
from shadowproxy.storage.record import Record

RECENT_KEYS = 200_000


class JsonlStore:
    backend = "jsonl"

    def __init__(self, directory: str, *, instance: str) -> None:
        self.directory = directory
        self.location = os.path.abspath(directory)
        self.instance = instance.replace(os.sep, "_")
        self._recent: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._lock = threading.Lock()

    def log_path(self, day: str, kind: str = "shadow_log") -> str:
        return os.path.join(self.directory, f"{kind}-{day}-{self.instance}.jsonl")

    async def open(self) -> None:
        try:
            await asyncio.to_thread(os.makedirs, self.directory, exist_ok=True)
        except OSError as exc:
            raise StorageUnavailable(f"JSON Lines directory {self.directory}: {exc}") from exc

    async def write(self, records: Sequence[Record]) -> None:
        await asyncio.to_thread(self._write_sync, list(records))

    def _write_sync(self, records: list[Record]) -> None:
        with self._lock:
            by_day: dict[str, list[bytes]] = {}
            keys = []
            for r in records:
                key = (r.request_id, r.shadow_upstream)
                if key in self._recent:
                    continue
                self._recent[key] = None
                keys.append(key)
                row = record_to_table_dict(r)
                by_day.setdefault(row["ts"][:10], []).append(orjson.dumps(row, default=str))
            try:
                for day, lines in by_day.items():
                    _append(self.log_path(day), lines)
            except OSError as exc:
                for key in keys:  # not durably written: a retry must write them
                    self._recent.pop(key, None)
                raise StorageUnavailable(f"JSON Lines {self.directory}: {exc}") from exc
            while len(self._recent) > RECENT_KEYS:
                self._recent.popitem(last=False)

    async def record_promotion(self, promotion: PromotionRecord) -> bool:
        """Appended to this instance's file: JSON Lines is one host's store, not deduplicated."""
        row = asdict(promotion)
        row["ts"] = iso_ts(promotion.ts)
        path = self.log_path(row["ts"][:10], "shadow_promotions")
        try:
            await asyncio.to_thread(_append, path, [orjson.dumps(row)])
        except OSError as exc:
            raise StorageUnavailable(f"JSON Lines {self.directory}: {exc}") from exc
        return True

    async def delete_older_than(self, cutoff_ts: float, batch_size: int) -> int:
        """Delete whole day files (any instance) whose day ends before the cutoff's day.

        Returns the number of records in the deleted files; ``batch_size`` bounds
        nothing here, a file is the unit.
        """
        return await asyncio.to_thread(self._delete_sync, iso_ts(cutoff_ts)[:10])

    def _delete_sync(self, cutoff_day: str) -> int:
        deleted = 0
        for path in glob.glob(os.path.join(self.directory, "shadow_log-*.jsonl")):
            day = os.path.basename(path)[len("shadow_log-") :][:10]
            if day < cutoff_day:
                with open(path, "rb") as f:
                    deleted += sum(1 for _ in f)
                os.unlink(path)
        return deleted

    async def close(self) -> None:
        return None


def _append(path: str, lines: list[bytes]) -> None:
    """Append lines and fsync. A torn last line from a crash is closed off first."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        prefix = b""
        if size:
            with open(path, "rb") as f:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    prefix = b"\n"
        data = prefix + b"\n".join(lines) + b"\n"
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
