"""Spool: order across segments, torn lines, claims between processes, crash pickup."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from shadowproxy.storage.spool import Spool
from tests.recordkit import make_record

CRASH = """
import os, signal, sys
from shadowproxy.storage.spool import Spool
from tests.recordkit import make_record
spool = Spool(sys.argv[1], instance="crashy")
spool.open()
for b in range(3):
    spool.append([make_record(b * 10 + i) for i in range(10)])
path = spool._active[0]
with open(path, "ab") as f:  # a crash in the middle of writing a line
    f.write(b'{"request_id": "req-torn", "ts": 1')
    f.flush()
os.kill(os.getpid(), signal.SIGKILL)
"""


def replay_all(spool: Spool) -> tuple[list[str], int]:
    ids: list[str] = []
    corrupt = 0
    spool.rotate()
    for path in spool.segments():
        claim = spool.claim(path)
        assert claim is not None
        segment = spool.read(claim)
        ids += [r.request_id for r in segment.records]
        corrupt += segment.corrupt
        spool.finish(claim)
    return ids, corrupt


def test_replay_in_write_order_across_segments(tmp_path: Path) -> None:
    spool = Spool(str(tmp_path), instance="a", segment_bytes=2000)
    assert spool.open() == 0
    for b in range(10):
        spool.append([make_record(b * 3 + i) for i in range(3)])
    assert spool.pending == 30
    assert len(spool.segments()) > 3  # rotated by size
    ids, corrupt = replay_all(spool)
    assert ids == [make_record(i).request_id for i in range(30)]
    assert corrupt == 0
    assert spool.pending == 0
    assert list(tmp_path.iterdir()) == []


def test_records_round_trip_exactly(tmp_path: Path) -> None:
    spool = Spool(str(tmp_path), instance="a")
    spool.open()
    record = make_record(1, agreement=None, query="q=\x00", diff=[{"path": "a", "primary": [1.5]}])
    spool.append([record])
    spool.rotate()
    claim = spool.claim(spool.segments()[0])
    assert claim is not None
    assert spool.read(claim).records == [record]
    spool.release(claim)


def test_active_segment_of_a_live_writer_is_not_claimed(tmp_path: Path) -> None:
    writer = Spool(str(tmp_path), instance="w")
    writer.open()
    writer.append([make_record(1)])
    other = Spool(str(tmp_path), instance="o")
    other.open()
    (path,) = other.segments()
    assert other.claim(path) is None  # flocked by the writer's active segment
    writer.rotate()
    claim = other.claim(path)
    assert claim is not None
    other.finish(claim)
    assert writer.segments() == []


def test_crashed_process_leftovers_picked_up_torn_line_counted(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [sys.executable, "-c", CRASH, str(tmp_path)], cwd=root, timeout=30, check=False
    )
    assert result.returncode == -signal.SIGKILL
    spool = Spool(str(tmp_path), instance="next")
    assert spool.open() >= 30
    ids, corrupt = replay_all(spool)
    assert sorted(ids) == sorted(make_record(i).request_id for i in range(30))
    assert corrupt == 1
    assert spool.pending == 0


def test_unusable_directory_raises_on_append(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    spool = Spool(str(tmp_path / "f" / "spool"), instance="a")
    try:
        spool.append([make_record(1)])
    except OSError:
        pass
    else:
        raise AssertionError("append into a non-directory must fail")
    assert not spool.writable()
