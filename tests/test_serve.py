"""`shadowproxy serve` as a user runs it: signals, workers, metrics that add up."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
from pathlib import Path

import aiohttp
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families

from tests.fakemodel import fake_model
from tests.processes import serve
from tests.proxyharness import write_config
from tests.waiting import until


def answer(name: str) -> dict[str, object]:
    return {"prediction": name, "confidence": 0.9}


def base(server: TestServer) -> str:
    return str(server.make_url("")).rstrip("/")


def sqlite_config(
    tmp_path: Path, upstreams: dict[str, str], primary: str, shadows: list[str]
) -> Path:
    return write_config(
        tmp_path,
        upstreams,
        [{"name": "r", "primary": primary, "shadows": shadows, "compare": {"label": "prediction"}}],
        storage={
            "url": f"sqlite:///{tmp_path / 'records.db'}",
            "spool_dir": str(tmp_path / "spool"),
        },
        admin={"watch_config": False},
    )


def scrape(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def rows(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        return int(conn.execute("select count(*) from shadow_log").fetchone()[0])


async def test_sigterm_finishes_in_flight_request_flushes_and_exits_zero(tmp_path: Path) -> None:
    release, arrived = asyncio.Event(), asyncio.Event()
    p, s = (
        await fake_model(answer("p"), hold=release, arrived=arrived),
        await fake_model(answer("s")),
    )
    config = sqlite_config(tmp_path, {"p": base(p), "s": base(s)}, "p", ["s"])
    with serve(config) as proc:
        await proc.ready()
        async with aiohttp.ClientSession() as client:
            for _ in range(10):
                async with client.post(proc.url + "/fast", data=b"{}") as r:
                    assert r.status == 200
            slow = asyncio.ensure_future(client.post(proc.url + "/slow", data=b"{}"))
            await asyncio.wait_for(arrived.wait(), 10)
            proc.signal(signal.SIGTERM)
            # The stop has begun (logged once the signal landed) before the request is released.
            await until(lambda: '"event": "stopping"' in proc.output(), timeout=10)
            release.set()
            response = await asyncio.wait_for(slow, 10)
            assert response.status == 200
            assert (await response.json())["prediction"] == "p"
            response.release()
        assert await proc.wait() == 0, proc.output()
        assert '"event": "stopped"' in proc.output() or '"event":"stopped"' in proc.output()
    assert rows(tmp_path / "records.db") == 11  # every pair flushed before exit
    await p.close()
    await s.close()


async def test_sighup_reloads(tmp_path: Path) -> None:
    a, b = await fake_model(answer("a")), await fake_model(answer("b"))
    config = sqlite_config(tmp_path, {"a": base(a), "b": base(b)}, "a", [])
    with serve(config) as proc:
        await proc.ready()
        async with aiohttp.ClientSession() as client:
            async with client.post(proc.url + "/x", data=b"{}") as r:
                assert (await r.json())["prediction"] == "a"
            sqlite_config(tmp_path, {"a": base(a), "b": base(b)}, "b", [])
            proc.signal(signal.SIGHUP)
            async with asyncio.timeout(10):
                while True:
                    async with client.post(proc.url + "/x", data=b"{}") as r:
                        if (await r.json())["prediction"] == "b":
                            break
                    await asyncio.sleep(0.05)
    assert "config_reloaded" in proc.output()
    await a.close()
    await b.close()


async def test_two_workers_share_the_port_and_metrics_add_up(tmp_path: Path) -> None:
    p, s = await fake_model(answer("p")), await fake_model(answer("s"))
    config = sqlite_config(tmp_path, {"p": base(p), "s": base(s)}, "p", ["s"])
    sent = 200
    with serve(config, "--workers", "2", env={"SHADOWPROXY_INSTANCE": "replica-a"}) as proc:
        await proc.ready()
        for _ in range(sent):
            # A new connection each time, so the kernel spreads them over both workers.
            async with (
                aiohttp.ClientSession() as client,
                client.post(proc.url + "/x", data=b"{}") as r,
            ):
                assert r.status == 200
        async with aiohttp.ClientSession() as client:
            async with asyncio.timeout(20):
                while True:
                    async with client.get(proc.admin + "/metrics") as r:
                        text = await r.text()
                    if scrape(text, "shadowproxy_records_total", outcome="written") >= sent:
                        break
                    await asyncio.sleep(0.1)
        primary = scrape(text, "shadowproxy_requests_total", role="primary", code="200")
        shadow = scrape(text, "shadowproxy_requests_total", role="shadow", code="200")
        comparisons = scrape(text, "shadowproxy_comparisons_total", outcome="agree") + scrape(
            text, "shadowproxy_comparisons_total", outcome="disagree"
        )
        assert (primary, shadow, comparisons) == (sent, sent, sent)
        assert scrape(text, "shadowproxy_records_total", outcome="written") == sent
        served_by = {line for line in proc.output().splitlines() if '"event": "started"' in line}
        assert len(served_by) == 2  # two workers started
    assert rows(tmp_path / "records.db") == sent
    with sqlite3.connect(tmp_path / "records.db") as conn:
        per_worker = dict(
            conn.execute("select instance, count(*) from shadow_log group by instance").fetchall()
        )
    assert len(per_worker) == 2, per_worker  # both workers served traffic on the shared port
    assert set(per_worker) == {"replica-a-w0", "replica-a-w1"}
    await p.close()
    await s.close()


async def test_admin_reload_reaches_every_worker(tmp_path: Path) -> None:
    a, b = await fake_model(answer("a")), await fake_model(answer("b"))
    config = sqlite_config(tmp_path, {"a": base(a), "b": base(b)}, "a", [])
    with serve(config, "--workers", "2", env={"SHADOWPROXY_ADMIN_TOKEN": "t0ken"}) as proc:
        await proc.ready()
        sqlite_config(tmp_path, {"a": base(a), "b": base(b)}, "b", [])
        async with aiohttp.ClientSession() as client:
            async with client.post(
                proc.admin + "/admin/reload", headers={"Authorization": "Bearer t0ken"}
            ) as r:
                assert r.status == 200
            async with asyncio.timeout(10):
                answers: list[str] = []
                while answers[-20:] != ["b"] * 20:  # 20 fresh connections in a row, any worker
                    async with (
                        aiohttp.ClientSession() as fresh,
                        fresh.post(proc.url + "/x", data=b"{}") as r,
                    ):
                        answers.append((await r.json())["prediction"])
    await a.close()
    await b.close()


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


async def _exited(pid: int) -> None:
    """Wait for any process (not only a child) to end, as an event: a pidfd turns readable."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    loop = asyncio.get_running_loop()
    ended = loop.create_future()
    loop.add_reader(fd, lambda: ended.done() or ended.set_result(None))
    try:
        await ended
    finally:
        loop.remove_reader(fd)
        os.close(fd)


async def test_workers_end_when_the_supervisor_is_killed(tmp_path: Path) -> None:
    p = await fake_model(answer("p"))
    config = sqlite_config(tmp_path, {"p": base(p)}, "p", [])
    with serve(config, "--workers", "2") as proc:
        await proc.ready()
        workers = _children(proc.proc.pid)
        assert len(workers) == 2
        proc.signal(signal.SIGKILL)  # no chance to forward anything
        async with asyncio.timeout(20):
            await asyncio.gather(*(_exited(pid) for pid in workers))
    await p.close()
