"""The spool: where records wait, on disk, while the store is unusable.

Segments are append-only JSON Lines files in ``storage.spool_dir`` named
``<time_ns>-<seq>-<instance>.spool`` so that name order is write order. Each
append is one batch followed by fsync; a failed append is truncated away, so a
batch is either wholly in the spool or not at all. A segment rotates at
``segment_bytes``. The writer holds an exclusive flock on its active segment;
a replayer claims a closed segment with a non-blocking flock, so several
worker processes can share one directory and a crashed process's segments
are picked up by whoever starts next. A segment is deleted only after all its
records were stored. A torn last line (crash mid-write) is skipped and counted.

All methods block (file I/O): call them from a worker thread.
"""

from __future__ import annotations

import fcntl
import glob
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import orjson

from shadowproxy.storage.codec import record_from_dict, record_to_json_line
from shadowproxy.storage.record import Record

SUFFIX = ".spool"


class Claim:
    """A closed segment this process holds the lock of, being replayed.

    ``release`` is idempotent and thread-safe: a replay cancelled while ``finish``
    runs in a worker thread may release the claim again from the event loop.
    """

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self.fd = fd
        self._lock = threading.Lock()

    def release(self) -> None:
        with self._lock:
            fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


@dataclass(frozen=True, slots=True)
class Segment:
    records: list[Record]
    corrupt: int  # lines skipped: torn by a crash or not a record


class Spool:
    def __init__(self, directory: str, *, instance: str, segment_bytes: int = 8 << 20) -> None:
        self.directory = directory
        self.instance = instance.replace(os.sep, "_")
        self.segment_bytes = segment_bytes
        self._lock = threading.Lock()
        self._active: tuple[str, int] | None = None  # (path, fd), flocked
        self._seq = 0
        self._known: dict[str, int] = {}  # segment path -> records in it (pending)
        self._count_lock = threading.Lock()  # guards _known only: never held across I/O

    @property
    def pending(self) -> int:
        """Records in the spool not yet acknowledged by the store (as far as this process knows)."""
        with self._count_lock:
            return sum(self._known.values())

    def open(self) -> int:
        """Create the directory, count the records left by earlier runs; return pending."""
        os.makedirs(self.directory, exist_ok=True)
        for path in self.segments():
            claim = self.claim(path)
            if claim is None:
                continue  # another live process's active segment
            try:
                with open(claim.fd, "rb", closefd=False) as f:
                    lines = sum(1 for _ in f)
                self._count(path, lines)
            finally:
                self.release(claim)
        return self.pending

    def writable(self) -> bool:
        return os.path.isdir(self.directory) and os.access(self.directory, os.W_OK | os.X_OK)

    def append(self, records: Sequence[Record]) -> None:
        """Append one batch durably (fsync). Raises OSError; then nothing of it was kept."""
        if not records:
            return
        data = b"".join(record_to_json_line(r) for r in records)
        with self._lock:
            path, fd = self._active_segment()
            start = os.lseek(fd, 0, os.SEEK_END)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            except OSError:
                try:
                    os.ftruncate(fd, start)
                finally:
                    self._close_active()
                raise
            with self._count_lock:
                self._known[path] = self._known.get(path, 0) + len(records)
            if start + len(data) >= self.segment_bytes:
                self._close_active()

    def rotate(self) -> None:
        """Close the active segment so a replay can take it."""
        with self._lock:
            self._close_active()

    def close(self) -> None:
        self.rotate()

    def segments(self) -> list[str]:
        """Segment files in write order, except this process's active one."""
        active = self._active[0] if self._active else None
        paths = sorted(glob.glob(os.path.join(self.directory, "*" + SUFFIX)))
        return [p for p in paths if p != active]

    def claim(self, path: str) -> Claim | None:
        """Lock a segment for replay; None when another process holds it or it is gone."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        if os.fstat(fd).st_nlink == 0:  # replayed and deleted by someone else meanwhile
            os.close(fd)
            return None
        return Claim(path, fd)

    def read(self, claim: Claim) -> Segment:
        records: list[Record] = []
        corrupt = 0
        with open(claim.fd, "rb", closefd=False) as f:
            f.seek(0)
            for line in f:
                try:
                    records.append(record_from_dict(orjson.loads(line)))
                except (orjson.JSONDecodeError, KeyError, TypeError):
                    corrupt += 1
        self._count(claim.path, len(records))
        return Segment(records, corrupt)

    def finish(self, claim: Claim) -> None:
        """Every record of the segment is stored: delete it."""
        try:
            os.unlink(claim.path)
        finally:
            self._count(claim.path, None)
            self.release(claim)

    @staticmethod
    def release(claim: Claim) -> None:
        claim.release()

    def _count(self, path: str, records: int | None) -> None:
        with self._count_lock:
            if records is None:
                self._known.pop(path, None)
            else:
                self._known[path] = records

    def _active_segment(self) -> tuple[str, int]:
        if self._active is None:
            self._seq += 1
            name = f"{time.time_ns():020d}-{self._seq:06d}-{self.instance}{SUFFIX}"
            path = os.path.join(self.directory, name)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
            _fsync_dir(self.directory)
            self._active = (path, fd)
        return self._active

    def _close_active(self) -> None:
        if self._active is not None:
            os.close(self._active[1])
            self._active = None


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
