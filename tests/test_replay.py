"""`shadowproxy replay` against a fake candidate on loopback, then `report` on the replay name.

Recorded traffic: 150 requests of route sentiment (each recorded twice, for shadows
v2 and v3), the recorded primary answering {"prediction": "pos", "confidence": 0.9}.
The candidate flips the label when the text says "flip" (every 10th request) and
fails with 500 on "boom" (requests 7, 57, 107). Requests that cannot be replayed
(truncated body, failed primary), another route and old traffic are seeded too.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from shadowproxy.commands.replay import replay_command
from shadowproxy.commands.report import report_command
from shadowproxy.pairs.record_build import TRUNCATION_MARKER
from tests.reportdata import Row, row, seed

NOW = time.time()
REQUESTS = 150


def text(i: int) -> str:
    words = [f"review {i}"]
    if i % 10 == 0:
        words.append("flip")
    if i % 50 == 7:
        words.append("boom")
    return " ".join(words)


def recorded() -> list[Row]:
    rows = []
    for i in range(REQUESTS):
        for shadow in ("v2", "v3"):
            rows.append(
                row(
                    request_id=f"req-{i:03d}",
                    ts=NOW - 3600 + i,
                    path="/predict",
                    query="lang=en",
                    request_headers={
                        "content-type": "application/json",
                        "authorization": "[REDACTED]",
                        "x-request-id": f"req-{i:03d}",
                    },
                    request_body=json.dumps({"text": text(i)}),
                    primary_body='{"prediction": "pos", "confidence": 0.9}',
                    primary_label="pos",
                    primary_score=0.9,
                    primary_latency_ms=2000.0,  # the candidate on loopback is far faster
                    shadow_upstream=shadow,
                )
            )
    rows += [
        row(request_id="cut", ts=NOW - 60, request_body='{"text": "lo' + TRUNCATION_MARKER),
        row(request_id="down", ts=NOW - 60, primary_status=None, primary_body=None),
        row(request_id="elsewhere", ts=NOW - 60, route="fraud"),
        row(request_id="old", ts=NOW - 72 * 3600),
    ]
    return rows


CONFIG = """\
version: 1
storage: {{url: "{url}"}}
upstreams:
  v1: {{url: "http://127.0.0.1:9001"}}
  v2: {{url: "http://127.0.0.1:9002"}}
routes:
  - name: sentiment
    match: {{path_prefix: /predict}}
    primary: v1
    shadows: [v2]
    compare: {{label: prediction, score: confidence}}
    gate: {{min_samples: 100, min_agreement: 0.8, max_shadow_error_rate: 0.05}}
"""


class Candidate:
    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    async def predict(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.seen.append(
            {
                "query": request.query_string,
                "headers": dict(request.headers),
                "text": body["text"],
            }
        )
        if "boom" in body["text"]:
            return web.json_response({"error": "boom"}, status=500)
        label = "neg" if "flip" in body["text"] else "pos"
        return web.json_response({"prediction": label, "confidence": 0.95})


@pytest.mark.parametrize("backend", ["sqlite", "postgresql", "jsonl"])
async def test_replay_then_report(backend: str, tmp_path: Path, postgres_url: str) -> None:
    url = await seed(backend, recorded(), postgres_url=postgres_url, tmp=str(tmp_path))
    config = tmp_path / "routes.yaml"
    config.write_text(CONFIG.format(url=url), encoding="utf-8")
    candidate = Candidate()
    app = web.Application()
    app.router.add_post("/predict", candidate.predict)
    async with TestServer(app, host="127.0.0.1", port=0) as server:
        to = str(server.make_url("/"))

        def replay(limit: int | None) -> int:
            return replay_command(
                route="sentiment",
                to=to,
                config_path=str(config),
                database_url=None,
                since="24h",
                limit=limit,
                rate=500.0,
                concurrency=4,
                name="candidate",
            )

        started = time.monotonic()
        assert await asyncio.to_thread(replay, 50) == 0
        assert time.monotonic() - started >= 49 / 500  # paced at --rate
        assert len(candidate.seen) == 50
        # resumed: the first 50 are not sent again; a third run has nothing left to do
        assert await asyncio.to_thread(replay, None) == 0
        assert await asyncio.to_thread(replay, None) == 0

    texts = sorted(request["text"] for request in candidate.seen)
    assert texts == sorted(text(i) for i in range(REQUESTS))  # each request once, in the window
    first = candidate.seen[0]
    assert first["query"] == "lang=en"
    assert first["headers"]["X-Shadow-Request"] == "1"
    assert first["headers"]["X-Request-ID"].startswith("req-")
    assert "Authorization" not in first["headers"]  # a redacted value is not replayed

    out = tmp_path / "report.json"
    code = await asyncio.to_thread(
        report_command,
        config_path=str(config),
        database_url=None,
        route="sentiment",
        shadow="candidate",
        since="24h",
        fmt="json",
        output=str(out),
    )
    (entry,) = json.loads(out.read_text(encoding="utf-8"))["routes"]
    assert (entry["shadow"], entry["primary"], entry["samples"]) == ("candidate", "v1", REQUESTS)
    # 15 flipped labels, 3 candidate failures
    assert entry["agreement"]["comparable"] == 147
    assert entry["agreement"]["agreed"] == 132
    assert entry["shadow_errors"] == {"status_5xx": 3}
    assert entry["shadow_error_rate"] == pytest.approx(3 / REQUESTS)
    assert entry["scores"]["delta"] == pytest.approx(0.05)
    assert entry["latency_ms"]["primary"]["p50"] == pytest.approx(2000.0)
    assert entry["confusion"] == {"labels": ["pos", "neg"], "matrix": [[132, 15], [0, 0]]}
    assert entry["decision"] == "ready"  # lower bound of 132/147 is ~0.84 >= 0.8
    assert code == 0


async def test_replay_usage_errors(tmp_path: Path, postgres_url: str) -> None:
    url = await seed("sqlite", recorded()[:2], postgres_url=postgres_url, tmp=str(tmp_path))
    config = tmp_path / "routes.yaml"
    config.write_text(CONFIG.format(url=url), encoding="utf-8")
    options: dict[str, Any] = {
        "config_path": str(config),
        "database_url": None,
        "since": "24h",
        "limit": None,
        "rate": 10.0,
        "concurrency": 2,
        "name": None,
    }
    assert replay_command(route="fraud", to="http://127.0.0.1:1", **options) == 2
    assert replay_command(route="sentiment", to="ftp://x", **options) == 2
    assert replay_command(route="sentiment", to="http://x", **{**options, "rate": 0.0}) == 2
    assert replay_command(route="sentiment", to="http://x", **{**options, "since": "1y"}) == 2
