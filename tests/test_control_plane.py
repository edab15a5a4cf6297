"""Reload and promotion on a running proxy, proven by traffic."""

from __future__ import annotations

import asyncio
import glob
from pathlib import Path

import aiohttp
import orjson
import pytest
import yaml
from aiohttp.test_utils import TestServer

from tests.fakemodel import fake_model
from tests.proxyharness import running_service, sample, write_config
from tests.waiting import until as wait_until

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def base(server: TestServer) -> str:
    return str(server.make_url("")).rstrip("/")


COMMENTED = """\
# Sentiment models. Keep comments: promotion must not lose them.
version: 1
server: {{host: 127.0.0.1, port: 0}}
admin:  {{host: 127.0.0.1, port: 0, watch_config: {watch}}}   # admin on loopback
storage:
  url: jsonl:///{records}
  spool_dir: {spool}
upstreams:
  v1: {{url: "{v1}", timeout_ms: 2000}}   # current production
  v2: {{url: '{v2}', timeout_ms: 2000}}
routes:
  - name: sentiment
    match: {{path_prefix: /}}
    primary: v1        # the one users see
    shadows: [v2]      # the candidate
"""


def commented_config(tmp_path: Path, v1: str, v2: str, watch: bool = False) -> Path:
    path = tmp_path / "routes.yaml"
    text = COMMENTED.format(
        records=tmp_path / "records",
        spool=tmp_path / "spool",
        v1=v1,
        v2=v2,
        watch=str(watch).lower(),
    )
    path.write_text(text)
    return path


async def who(client: aiohttp.ClientSession, port: int, path: str = "/predict") -> str:
    async with client.post(f"http://127.0.0.1:{port}{path}", data=b"{}") as r:
        assert r.status == 200, await r.text()
        return str((await r.json())["prediction"])


async def test_admin_reload_ok_and_invalid_keeps_old_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SHADOWPROXY_ADMIN_TOKEN", TOKEN)
    a, b = await fake_model({"prediction": "a"}), await fake_model({"prediction": "b"})
    config = write_config(tmp_path, {"a": base(a), "b": base(b)}, [{"name": "r", "primary": "a"}])
    async with running_service(config) as service, aiohttp.ClientSession() as client:
        admin = f"http://127.0.0.1:{service.admin_port}"
        assert await who(client, service.proxy_port) == "a"
        write_config(tmp_path, {"a": base(a), "b": base(b)}, [{"name": "r", "primary": "b"}])
        async with client.post(admin + "/admin/reload", headers=AUTH) as r:
            assert r.status == 200
            body = await r.json()
            assert body["changes"]["routes_changed"] == ["r"]
        assert await who(client, service.proxy_port) == "b"
        good_sha = service.settings.sha256
        text = config.read_text().replace("primary: b", "primary: nope")
        config.write_text(text)
        line = next(i for i, ln in enumerate(text.splitlines(), 1) if "primary: nope" in ln)
        async with client.post(admin + "/admin/reload", headers=AUTH) as r:
            assert r.status == 400
            assert (
                f"routes.yaml:{line}: routes[0].primary: unknown upstream 'nope'"
                in (await r.json())["error"]
            )
        assert await who(client, service.proxy_port) == "b"  # the old config keeps serving
        assert service.settings.sha256 == good_sha
        assert sample(service, "shadowproxy_config_reloads_total", outcome="ok") == 1
        assert sample(service, "shadowproxy_config_reloads_total", outcome="error") == 1
        assert sample(service, "shadowproxy_config_info", sha256=good_sha) == 1
        async with client.get(admin + "/admin/status", headers=AUTH) as r:
            status = await r.json()
        assert status["config"]["sha256"] == good_sha
        assert status["routes"] == [
            {"name": "r", "primary": "b", "shadows": [], "sample_rate": 1.0, "mirror_in_flight": {}}
        ]
        assert set(status["storage"]) >= {
            "backend",
            "queue_depth",
            "spool_pending",
            "written",
            "spooled",
            "dropped",
        }
    await a.close()
    await b.close()


async def test_reload_under_load_drops_no_request_and_drains_old_pools(tmp_path: Path) -> None:
    gate = asyncio.Event()
    a, b = await fake_model({"prediction": "a"}, hold=gate), await fake_model({"prediction": "b"})
    config = write_config(
        tmp_path, {"a": base(a), "b": base(b)}, [{"name": "r", "primary": "a", "shadows": ["b"]}]
    )
    async with running_service(config) as service, aiohttp.ClientSession() as client:
        slow = asyncio.ensure_future(who(client, service.proxy_port, "/slow"))  # in flight on "a"
        await wait_until(lambda: service.runtime.current.in_use >= 1)
        old_client = service.runtime.current.primaries["a"]
        failures: list[BaseException] = []
        answered: list[str] = []
        stop = asyncio.Event()

        async def load() -> None:
            while not stop.is_set():
                try:
                    answered.append(await who(client, service.proxy_port))
                except Exception as exc:  # any failure is a test failure
                    failures.append(exc)

        loaders = [asyncio.ensure_future(load()) for _ in range(4)]
        for i in range(20):
            primary, upstreams = (
                ("b", {"b": base(b)}) if i % 2 == 0 else ("a", {"a": base(a), "b": base(b)})
            )
            write_config(tmp_path, upstreams, [{"name": "r", "primary": primary}])
            await service.reload()
            count = len(answered)
            await wait_until(lambda c=count: len(answered) >= c + 5)  # type: ignore[misc]
        stop.set()
        await asyncio.gather(*loaders)
        assert failures == []
        assert {"a", "b"} <= set(answered)
        assert not old_client.closed  # the slow request still holds the first generation
        gate.set()
        assert await slow == "a"  # in-flight request finished on the old routes
        # "a" was removed and re-added 10 times: pools nobody uses any more are closed.
        write_config(tmp_path, {"b": base(b)}, [{"name": "r", "primary": "b"}])
        await service.reload()
        await wait_until(lambda: old_client.closed)
    await a.close()
    await b.close()


async def test_promote_endpoint_swaps_file_reloads_and_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SHADOWPROXY_ADMIN_TOKEN", TOKEN)
    v1, v2 = await fake_model({"prediction": "v1"}), await fake_model({"prediction": "v2"})
    config = commented_config(tmp_path, base(v1), base(v2))
    before = config.read_text()
    async with running_service(config) as service, aiohttp.ClientSession() as client:
        admin = f"http://127.0.0.1:{service.admin_port}"
        assert await who(client, service.proxy_port) == "v1"
        async with client.post(admin + "/admin/promote?route=nope", headers=AUTH) as r:
            assert r.status == 404
        async with client.post(admin + "/admin/promote?route=sentiment", headers=AUTH) as r:
            assert r.status == 200, await r.text()
            body = await r.json()
        assert (body["previous_primary"], body["new_primary"]) == ("v1", "v2")
        assert await who(client, service.proxy_port) == "v2"
        assert service.settings.route("sentiment").shadows == ("v1",)  # type: ignore[union-attr]
        assert sample(service, "shadowproxy_promotions_total", route="sentiment") == 1
        config.chmod(0o444)
        try:
            async with client.post(admin + "/admin/promote?route=sentiment", headers=AUTH) as r:
                assert r.status == 409
                assert "read-only" in (await r.json())["error"]
        finally:
            config.chmod(0o644)
        assert await who(client, service.proxy_port) == "v2"
    after = config.read_text()
    expected = before.replace("primary: v1 ", "primary: v2 ").replace(
        "shadows: [v2]", "shadows: [v1]"
    )
    assert after == expected  # byte-identical but for the two swapped values
    rows = []
    for name in glob.glob(str(tmp_path / "records" / "shadow_promotions-*.jsonl")):
        rows += [orjson.loads(line) for line in Path(name).read_bytes().splitlines() if line]
    assert rows[0]["route"] == "sentiment"
    assert (rows[0]["previous_primary"], rows[0]["new_primary"]) == ("v1", "v2")
    assert rows[0]["instance"] == "test"
    await v1.close()
    await v2.close()


async def test_file_watcher_reloads_a_changed_file(tmp_path: Path) -> None:
    v1, v2 = await fake_model({"prediction": "v1"}), await fake_model({"prediction": "v2"})
    config = commented_config(tmp_path, base(v1), base(v2), watch=True)
    async with running_service(config) as service, aiohttp.ClientSession() as client:
        assert await who(client, service.proxy_port) == "v1"
        doc = yaml.safe_load(config.read_text())
        doc["routes"][0]["primary"], doc["routes"][0]["shadows"] = "v2", ["v1"]
        replacement = tmp_path / "routes.yaml.new"
        replacement.write_text(yaml.safe_dump(doc))
        replacement.replace(config)  # as editors and ConfigMap updates do: a new inode
        await wait_until(lambda: service.settings.route("sentiment").primary == "v2", timeout=5)  # type: ignore[union-attr]
        assert await who(client, service.proxy_port) == "v2"
        assert sample(service, "shadowproxy_config_reloads_total", outcome="ok") == 1
    await v1.close()
    await v2.close()
