"""Test harness: a real Service on loopback in front of in-process fake upstreams."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import CollectorRegistry

from shadowproxy.config.load import load_settings
from shadowproxy.control.service import Overrides, Service


def free_port() -> int:
    """A loopback port nobody listens on (for 'connection refused' upstreams)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(
    tmp_path: Path, upstreams: dict[str, str], routes: list[dict[str, Any]], **top: Any
) -> Path:
    doc: dict[str, Any] = {
        "version": 1,
        "server": {"host": "127.0.0.1", "port": 0, "shutdown_grace_s": 5},
        "admin": {"host": "127.0.0.1", "port": 0, "watch_config": False},
        "storage": {
            "url": f"jsonl:///{tmp_path / 'records'}",
            "spool_dir": str(tmp_path / "spool"),
        },
        "upstreams": {
            name: ({"url": url, "timeout_ms": 1000} if isinstance(url, str) else url)
            for name, url in upstreams.items()
        },
        "routes": routes,
    }
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(doc.get(key), dict):
            doc[key].update(value)
        else:
            doc[key] = value
    path = tmp_path / "routes.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@asynccontextmanager
async def running_service(
    config: Path, *, shed_on_overload: bool = False, **kwargs: Any
) -> AsyncIterator[Service]:
    settings = load_settings(str(config))
    service = Service(
        settings, overrides=Overrides(), registry=CollectorRegistry(), instance="test", **kwargs
    )
    if not shed_on_overload:
        # A loaded test machine must not turn "every request is mirrored" into a coin toss;
        # load shedding has its own tests (tests/test_overload.py).
        service.overload.threshold_s = 1e9
    await service.start()
    try:
        yield service
    finally:
        await asyncio.wait_for(service.stop(), 30)


def sample(service: Service, name: str, **labels: str) -> float:
    value = service.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value
