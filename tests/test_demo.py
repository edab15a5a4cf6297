"""``shadowproxy demo``: its routes.yaml, its refusals, and the whole loop against the real proxy."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from shadowproxy.config.load import parse_settings
from shadowproxy.demo import demo_command
from shadowproxy.demo.routes import CANDIDATE, PRIMARY, ROUTE, DemoRoutes, render_routes
from shadowproxy.demo.run import ENV_DIR, ENV_EXIT_AFTER_TRAFFIC, ENV_REQUESTS

LABELS = {"setosa", "versicolor", "virginica"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_demo_routes_yaml_is_valid_config(tmp_path: Path) -> None:
    routes = DemoRoutes(tmp_path, 18080, 19901, "http://127.0.0.1:1", "http://127.0.0.1:2")
    settings = parse_settings(render_routes(routes).encode(), str(routes.path))
    route = settings.route(ROUTE)
    assert route is not None
    assert (route.primary, route.shadows) == (PRIMARY, (CANDIDATE,))
    assert (route.compare.label, route.compare.score) == ("prediction", "confidence")
    assert settings.storage.url == f"sqlite:///{tmp_path}/shadowproxy-demo.db"
    assert (settings.server.port, settings.admin.port) == (18080, 19901)


def test_port_in_use_is_a_clear_usage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(ENV_DIR, str(tmp_path))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert demo_command(port=port) == 2
    err = capsys.readouterr().err
    assert f"port {port} on 127.0.0.1 is already in use" in err
    assert "demo --port" in err
    assert not (tmp_path / "routes.yaml").exists()


def test_bad_request_count_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(ENV_REQUESTS, "lots")
    assert demo_command(port=_free_port()) == 2
    assert ENV_REQUESTS in capsys.readouterr().err


@pytest.mark.slow
def test_demo_runs_the_full_loop_and_records_every_pair(tmp_path: Path) -> None:
    requests = 120
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHADOWPROXY_")}
    env |= {ENV_DIR: str(tmp_path / "demo"), ENV_REQUESTS: str(requests)}
    env[ENV_EXIT_AFTER_TRAFFIC] = "1"
    demo = subprocess.run(
        [sys.executable, "-m", "shadowproxy", "demo", "--port", str(port)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert f"sent {requests} requests" in demo.stdout
    assert f"{requests} x 200" in demo.stdout
    assert "report --config demo/routes.yaml" in demo.stdout
    assert "sqlite3 demo/shadowproxy-demo.db" in demo.stdout

    database = tmp_path / "demo" / "shadowproxy-demo.db"
    with contextlib.closing(sqlite3.connect(database)) as conn:
        rows = conn.execute(
            "SELECT route, primary_upstream, shadow_upstream, primary_status, shadow_status,"
            " primary_label, shadow_label, agreement, shadow_latency_ms FROM shadow_log"
        ).fetchall()
    assert len(rows) == requests
    for route, primary, shadow, p_status, s_status, p_label, s_label, agreement, s_ms in rows:
        assert (route, primary, shadow, p_status, s_status) == (ROUTE, PRIMARY, CANDIDATE, 200, 200)
        assert {p_label.strip('"'), s_label.strip('"')} <= LABELS
        assert agreement == (p_label == s_label)
        assert s_ms >= 10.0  # the candidate's artificial latency
    agreed = sum(row[7] for row in rows) / len(rows)
    assert 0.8 <= agreed < 1.0

    with socket.socket() as sock:  # the proxy stopped with the demo
        sock.bind(("127.0.0.1", port))

    command = ["report", "--config", "demo/routes.yaml", "--format", "json"]
    report = subprocess.run(
        [sys.executable, "-m", "shadowproxy", *command],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert report.returncode == 1, report.stdout + report.stderr  # the candidate is not ready
    (entry,) = json.loads(report.stdout)["routes"]
    assert (entry["route"], entry["shadow"], entry["samples"]) == (ROUTE, CANDIDATE, requests)
    assert entry["decision"] == "not_ready"
