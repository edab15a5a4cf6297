"""Metrics as PRODUCT.md names them, matching the traffic sent; exposition that promtool accepts."""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import string
import subprocess
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from shadowproxy.telemetry.metrics import Metrics
from tests.fakemodel import fake_model
from tests.proxyharness import running_service, sample, write_config
from tests.waiting import until as wait_until


def test_rolling_gauges_cover_the_last_window_only() -> None:
    metrics = Metrics(CollectorRegistry(), window=10)
    for _ in range(10):
        metrics.observe_comparison("r", "s", "disagree", False)
    for _ in range(10):
        metrics.observe_comparison("r", "s", "agree", True)
    metrics.observe_comparison("r", "s", "shadow_error", None)  # not comparable: not in the ratio
    for latency in range(1, 101):
        metrics.observe_upstream("r", "p", "primary", "200", latency / 1000)
    metrics.refresh_rolling()
    registry = metrics.registry
    assert (
        registry.get_sample_value("shadowproxy_agreement_ratio", {"route": "r", "shadow": "s"})
        == 1.0
    )
    labels = {"route": "r", "upstream": "p", "role": "primary"}
    # The window holds the last 10 latencies: 91..100 ms.
    assert (
        registry.get_sample_value(
            "shadowproxy_latency_quantile_seconds", {**labels, "percentile": "p50"}
        )
        == 0.096
    )
    assert (
        registry.get_sample_value(
            "shadowproxy_latency_quantile_seconds", {**labels, "percentile": "p99"}
        )
        == 0.1
    )
    assert (
        registry.get_sample_value(
            "shadowproxy_comparisons_total", {"route": "r", "shadow": "s", "outcome": "agree"}
        )
        == 10
    )


def test_config_info_keeps_one_series() -> None:
    metrics = Metrics(CollectorRegistry())
    metrics.set_config("a" * 64)
    metrics.set_config("b" * 64)
    assert (
        metrics.registry.get_sample_value("shadowproxy_config_info", {"sha256": "a" * 64}) is None
    )
    assert metrics.registry.get_sample_value("shadowproxy_config_info", {"sha256": "b" * 64}) == 1


async def test_metrics_match_traffic_and_random_paths_add_no_series(tmp_path: Path) -> None:
    p, s = await fake_model({"prediction": "a"}), await fake_model({"prediction": "b"})
    urls = {"p": str(p.make_url("")).rstrip("/"), "s": str(s.make_url("")).rstrip("/")}
    routes = [
        {
            "name": "r",
            "match": {"path_prefix": "/predict"},
            "primary": "p",
            "shadows": ["s"],
            "compare": {"label": "prediction"},
        }
    ]
    async with (
        running_service(write_config(tmp_path, urls, routes)) as service,
        aiohttp.ClientSession() as client,
    ):
        for _ in range(30):
            async with client.post(
                f"http://127.0.0.1:{service.proxy_port}/predict", data=b"{}"
            ) as r:
                assert r.status == 200
        await wait_until(
            lambda: sample(service, "shadowproxy_records_total", outcome="written") == 30
        )
        service.metrics.refresh_rolling()
        assert (
            sample(
                service,
                "shadowproxy_requests_total",
                route="r",
                upstream="p",
                role="primary",
                code="200",
            )
            == 30
        )
        assert (
            sample(
                service,
                "shadowproxy_requests_total",
                route="r",
                upstream="s",
                role="shadow",
                code="200",
            )
            == 30
        )
        assert (
            sample(
                service, "shadowproxy_comparisons_total", route="r", shadow="s", outcome="disagree"
            )
            == 30
        )
        assert sample(service, "shadowproxy_agreement_ratio", route="r", shadow="s") == 0.0
        assert (
            sample(
                service,
                "shadowproxy_upstream_latency_seconds_count",
                route="r",
                upstream="p",
                role="primary",
            )
            == 30
        )
        assert sample(service, "shadowproxy_mirror_in_flight", route="r", shadow="s") == 0

        async with client.get(f"http://127.0.0.1:{service.admin_port}/metrics") as r:
            before = await r.text()
        rng = random.Random(7)
        for _ in range(10_000):
            path = "/" + "".join(
                rng.choice(string.ascii_letters + string.digits + "-_.~") for _ in range(12)
            )
            async with client.get(f"http://127.0.0.1:{service.proxy_port}{path}") as r:
                assert r.status == 404
        async with client.get(f"http://127.0.0.1:{service.admin_port}/metrics") as r:
            after = await r.text()

        def series(text: str) -> set[str]:
            return {
                line.split(" ")[0]
                for line in text.splitlines()
                if line and not line.startswith("#")
            }

        assert series(after) == series(before)
        promtool = shutil.which("promtool")
        if promtool is None:
            if os.environ.get("CI") == "true":
                pytest.fail("promtool is missing in CI (make deploy-tools installs it)")
        else:
            check = subprocess.run(
                [promtool, "check", "metrics"],
                input=after,
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert check.returncode == 0 and check.stdout == "" and check.stderr == "", (
                check.stdout + check.stderr
            )
    await p.close()
    await s.close()


def base(server: object) -> str:
    return str(server.make_url("")).rstrip("/")  # type: ignore[attr-defined]


def _series(service: object, shadow: str) -> dict[str, float | None]:
    """The (route r, shadow) series of every metric that carries them, None where absent."""
    registry = service.registry  # type: ignore[attr-defined]
    as_shadow = {"route": "r", "upstream": shadow, "role": "shadow"}
    return {
        "requests": registry.get_sample_value(
            "shadowproxy_requests_total", {**as_shadow, "code": "200"}
        ),
        "latency": registry.get_sample_value(
            "shadowproxy_upstream_latency_seconds_count", as_shadow
        ),
        "quantile": registry.get_sample_value(
            "shadowproxy_latency_quantile_seconds", {**as_shadow, "percentile": "p50"}
        ),
        "comparisons": registry.get_sample_value(
            "shadowproxy_comparisons_total", {"route": "r", "shadow": shadow, "outcome": "agree"}
        ),
        "agreement": registry.get_sample_value(
            "shadowproxy_agreement_ratio", {"route": "r", "shadow": shadow}
        ),
        "in_flight": registry.get_sample_value(
            "shadowproxy_mirror_in_flight", {"route": "r", "shadow": shadow}
        ),
    }


async def test_series_of_a_shadow_a_reload_removed_disappear(tmp_path: Path) -> None:
    release, arrived = asyncio.Event(), asyncio.Event()
    p = await fake_model({"prediction": "a"})
    kept = await fake_model({"prediction": "a"})
    gone = await fake_model({"prediction": "a"}, hold=release, arrived=arrived)
    upstreams = {"p": base(p), "kept": base(kept), "gone": base(gone)}
    config = write_config(
        tmp_path, upstreams, [{"name": "r", "primary": "p", "shadows": ["kept", "gone"]}]
    )
    async with running_service(config) as service, aiohttp.ClientSession() as client:
        url = f"http://127.0.0.1:{service.proxy_port}"
        async with client.post(url + "/x", data=b"{}") as r:
            assert r.status == 200
        await wait_until(
            lambda: sample(service, "shadowproxy_records_total", outcome="written") == 2
        )
        async with client.post(url + "/slow", data=b"{}") as r:  # "gone" holds this mirror
            assert r.status == 200
        await asyncio.wait_for(arrived.wait(), 5)
        service.metrics.refresh_rolling()
        assert all(value is not None for value in _series(service, "gone").values())

        write_config(tmp_path, upstreams, [{"name": "r", "primary": "p", "shadows": ["kept"]}])
        await service.reload()
        service.metrics.refresh_rolling()
        assert set(_series(service, "gone").values()) == {None}
        assert all(value is not None for value in _series(service, "kept").values())

        release.set()  # the mirror in flight ends after the reload: recorded, not exported
        await wait_until(
            lambda: sample(service, "shadowproxy_records_total", outcome="written") == 4
        )
        service.metrics.refresh_rolling()
        assert set(_series(service, "gone").values()) == {None}
        assert _series(service, "kept")["in_flight"] == 0

        # Made a shadow again: exported again from its next mirror on.
        write_config(
            tmp_path, upstreams, [{"name": "r", "primary": "p", "shadows": ["kept", "gone"]}]
        )
        await service.reload()
        async with client.post(url + "/x", data=b"{}") as r:
            assert r.status == 200
        await wait_until(
            lambda: sample(service, "shadowproxy_records_total", outcome="written") == 6
        )
        assert _series(service, "gone")["comparisons"] == 1
    for server in (p, kept, gone):
        await server.close()
