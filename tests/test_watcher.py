from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from shadowproxy.config.watcher import ConfigWatcher, file_sha256

V1 = b"routes:\n  - name: r\n    primary: a\n"
V2 = b"routes:\n  - name: r\n    primary: b\n"
V3 = b"routes:\n  - name: r\n    primary: c\n"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Calls:
    """on_change that records each call and lets a test wait for the next one."""

    def __init__(self, fail: bool = False) -> None:
        self.count = 0
        self.fail = fail
        self.queue: asyncio.Queue[int] = asyncio.Queue()

    async def __call__(self) -> None:
        self.count += 1
        self.queue.put_nowait(self.count)
        if self.fail:
            raise RuntimeError("reload exploded")

    async def next(self) -> int:
        return await asyncio.wait_for(self.queue.get(), timeout=5)


def put(path: Path, data: bytes) -> None:
    path.write_bytes(data)


def remove(path: Path) -> None:
    path.unlink()


def replace_file(path: Path, data: bytes) -> None:
    """What editors and `kubectl cp` do: write elsewhere, rename over."""
    tmp = path.with_name(path.name + ".swp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "routes.yaml"
    path.write_bytes(V1)
    return path


@pytest.fixture
async def running(config: Path) -> AsyncIterator[tuple[ConfigWatcher, Calls]]:
    calls = Calls()
    watcher = ConfigWatcher(str(config), calls, interval_s=0.01)
    watcher.start()
    yield watcher, calls
    await watcher.stop()


async def test_changed_content_triggers_one_reload(
    config: Path, running: tuple[ConfigWatcher, Calls]
) -> None:
    watcher, calls = running
    replace_file(config, V2)
    assert await calls.next() == 1
    assert watcher.seen_sha256 == sha(V2)
    replace_file(config, V3)
    assert await calls.next() == 2


async def test_in_place_write_triggers_reload(
    config: Path, running: tuple[ConfigWatcher, Calls]
) -> None:
    _, calls = running
    put(config, V2)
    assert await calls.next() == 1


async def test_configmap_data_symlink_swap(tmp_path: Path) -> None:
    # The kubelet's layout: routes.yaml -> ..data/routes.yaml, ..data -> ..<timestamp>
    old = tmp_path / "..2026_11_30_01_00_00.1"
    old.mkdir()
    (old / "routes.yaml").write_bytes(V1)
    (tmp_path / "..data").symlink_to(old.name)
    (tmp_path / "routes.yaml").symlink_to("..data/routes.yaml")

    calls = Calls()
    watcher = ConfigWatcher(str(tmp_path / "routes.yaml"), calls, interval_s=0.01)
    watcher.start()
    try:
        new = tmp_path / "..2026_11_30_01_05_00.2"
        new.mkdir()
        (new / "routes.yaml").write_bytes(V2)
        (tmp_path / "..data_tmp").symlink_to(new.name)
        os.replace(tmp_path / "..data_tmp", tmp_path / "..data")  # atomic swap
        assert await calls.next() == 1
        assert watcher.seen_sha256 == sha(V2)
    finally:
        await watcher.stop()


async def test_failing_on_change_is_logged_and_watching_goes_on(config: Path) -> None:
    calls = Calls(fail=True)
    watcher = ConfigWatcher(str(config), calls, interval_s=0.01)
    with capture_logs() as logs:
        watcher.start()
        try:
            replace_file(config, V2)
            assert await calls.next() == 1
            replace_file(config, V3)
            assert await calls.next() == 2
        finally:
            await watcher.stop()
    failures = [e for e in logs if e["event"] == "config_reload_from_watcher_failed"]
    assert len(failures) == 2
    assert "reload exploded" in failures[0]["error"]


# The decisions of one poll, driven tick by tick through check(): no timing involved.


def manual(config: Path) -> tuple[ConfigWatcher, Calls]:
    calls = Calls()
    watcher = ConfigWatcher(str(config), calls, interval_s=3600)
    watcher.acknowledge(sha(config.read_bytes()))
    return watcher, calls


async def test_same_bytes_rewritten_is_no_change(config: Path) -> None:
    watcher, calls = manual(config)
    replace_file(config, V1)
    assert not await watcher.check()
    assert not await watcher.check()
    assert calls.count == 0


async def test_a_change_must_be_read_twice(config: Path) -> None:
    watcher, calls = manual(config)
    put(config, V2[:10])  # caught half-written
    assert not await watcher.check()
    put(config, V2)  # finished before the next tick
    assert not await watcher.check()
    assert await watcher.check()
    assert calls.count == 1
    assert not await watcher.check()


async def test_missing_or_empty_file_is_no_change(config: Path) -> None:
    watcher, calls = manual(config)
    remove(config)
    assert not await watcher.check()
    assert not await watcher.check()
    put(config, b"")
    assert not await watcher.check()
    assert not await watcher.check()
    put(config, V1)  # back as it was
    assert not await watcher.check()
    assert not await watcher.check()
    assert calls.count == 0


async def test_acknowledged_reload_is_not_repeated(config: Path) -> None:
    watcher, calls = manual(config)
    put(config, V2)
    assert not await watcher.check()  # candidate seen once
    watcher.acknowledge(sha(V2))  # e.g. SIGHUP reloaded it meanwhile
    assert not await watcher.check()
    assert not await watcher.check()
    assert calls.count == 0


async def test_start_takes_current_content_as_baseline(config: Path) -> None:
    calls = Calls()
    watcher = ConfigWatcher(str(config), calls, interval_s=3600)
    watcher.start()
    try:
        assert watcher.seen_sha256 == sha(V1)
        assert not await watcher.check()
        assert not await watcher.check()
    finally:
        await watcher.stop()


async def test_start_keeps_an_acknowledged_baseline(config: Path) -> None:
    # Loaded V0, file already changed to V1 before the watcher started: reload it.
    calls = Calls()
    watcher = ConfigWatcher(str(config), calls, interval_s=3600)
    watcher.acknowledge(sha(b"v0"))
    watcher.start()
    try:
        assert not await watcher.check()
        assert await watcher.check()
    finally:
        await watcher.stop()


async def test_start_and_stop_are_idempotent(config: Path) -> None:
    watcher = ConfigWatcher(str(config), Calls(), interval_s=0.01)
    await watcher.stop()
    watcher.start()
    watcher.start()
    await watcher.stop()
    await watcher.stop()


def test_file_sha256(tmp_path: Path) -> None:
    sha_of: Callable[[str], str | None] = file_sha256
    (tmp_path / "f").write_bytes(V1)
    assert sha_of(str(tmp_path / "f")) == sha(V1)
    assert sha_of(str(tmp_path / "missing")) is None
    assert sha_of(str(tmp_path)) is None  # a directory
