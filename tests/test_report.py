"""`shadowproxy report` end to end over PostgreSQL, SQLite and JSON Lines.

The seeded traffic (route sentiment, primary v1, shadow v2), 200 pairs in the window:
- i < 12: shadow timeout (no status, no label), 12 <= i < 20: shadow 500 (status_5xx);
- 20 <= i < 29: disagreement (primary pos, shadow neg);
- 29 <= i < 200: agreement, label pos/neg/neu by i % 3.
Primary latency i + 1 ms on every row; shadow latency 2 (i + 1) ms when it answered.
Scores: primary 0.8 everywhere, shadow 0.85 on the 180 comparable pairs.
Even i fall in one hour, odd i in the next. Rows of v3 (10 pairs) and rows older
than the window are there to be left out or reported apart.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path
from typing import Any

import pytest

from shadowproxy.commands.cli import main
from shadowproxy.commands.report import evaluate_gate, report_command
from shadowproxy.report.stats import wilson_interval
from tests.reportdata import Row, row, seed, seed_sqlite

BACKENDS = ["postgresql", "sqlite", "jsonl"]
HOUR = 3600.0
NOW = time.time()
BASE_HOUR = (NOW // HOUR) * HOUR - 5 * HOUR
LABELS = ("pos", "neg", "neu")


def traffic() -> list[Row]:
    rows = []
    for i in range(200):
        values: dict[str, Any] = {
            "request_id": f"req-{i:03d}",
            "ts": BASE_HOUR + (i % 2) * HOUR + 60 + i,
            "primary_latency_ms": float(i + 1),
            "shadow_latency_ms": float(2 * (i + 1)),
            "primary_score": 0.8,
            "shadow_score": 0.85,
            "request_body": '{"text": "review ' + f'{i} {"x" * 300}"}}',
        }
        if i < 12:
            values.update(shadow_status=None, shadow_latency_ms=1000.0, shadow_error="timeout")
        elif i < 20:
            values.update(shadow_status=500, shadow_error="status_5xx")
        if i < 20:
            values.update(agreement=None, shadow_label=None, shadow_score=None, shadow_body=None)
        elif i < 29:
            values.update(agreement=False, primary_label="pos", shadow_label="neg")
        else:
            label = LABELS[i % 3]
            values.update(primary_label=label, shadow_label=label)
        rows.append(row(**values))
    for i in range(10):  # a second shadow, too few samples
        rows.append(row(request_id=f"req-{i:03d}", shadow_upstream="v3", ts=BASE_HOUR + i))
    for i in range(5):  # outside a 24h window: would break every number if counted
        rows.append(
            row(
                request_id=f"old-{i}",
                ts=NOW - 48 * HOUR,
                agreement=False,
                primary_latency_ms=1e6,
                shadow_error="connect",
            )
        )
    return rows


CONFIG = """\
version: 1
storage: {{url: "{url}"}}
upstreams:
  v1: {{url: "http://127.0.0.1:9001"}}
  v2: {{url: "http://127.0.0.1:9002"}}
  v3: {{url: "http://127.0.0.1:9003"}}
routes:
  - name: sentiment
    match: {{path_prefix: /predict}}
    primary: v1
    shadows: [v2]
    compare: {{label: prediction, score: confidence}}
    gate: {gate}
"""

NOT_READY_GATE = (
    "{min_samples: 100, min_agreement: 0.9, max_latency_ratio: 2.5, "
    "min_score_delta: 0.0, max_shadow_error_rate: 0.01}"
)
READY_GATE = (
    "{min_samples: 100, min_agreement: 0.9, max_latency_ratio: 2.5, "
    "min_score_delta: 0.0, max_shadow_error_rate: 0.2}"
)


def write_config(tmp_path: Path, url: str, gate: str = NOT_READY_GATE) -> str:
    path = tmp_path / "routes.yaml"
    path.write_text(CONFIG.format(url=url, gate=gate), encoding="utf-8")
    return str(path)


async def run_report(config: str, tmp_path: Path, **options: Any) -> tuple[int, str]:
    out = tmp_path / "report.out"
    kwargs: dict[str, Any] = {
        "config_path": config,
        "database_url": None,
        "route": None,
        "shadow": None,
        "since": "24h",
        "fmt": "json",
        "output": str(out),
    }
    kwargs.update(options)
    code = await asyncio.to_thread(report_command, **kwargs)
    return code, out.read_text(encoding="utf-8") if out.exists() else ""


@pytest.fixture(params=BACKENDS)
async def seeded(request: pytest.FixtureRequest, postgres_url: str, tmp_path: Path) -> str:
    """The storage URL of the seeded traffic, once per backend."""
    return await seed(request.param, traffic(), postgres_url=postgres_url, tmp=str(tmp_path))


async def test_json_numbers(seeded: str, tmp_path: Path) -> None:
    config = write_config(tmp_path, seeded)
    code, out = await run_report(config, tmp_path, shadow="v2")
    report = json.loads(out)
    assert code == 1
    (entry,) = report["routes"]
    assert (entry["route"], entry["primary"], entry["shadow"]) == ("sentiment", "v1", "v2")
    assert entry["samples"] == 200
    low, high = wilson_interval(171, 180) or (0, 0)
    assert entry["agreement"] == {
        "value": pytest.approx(0.95),
        "ci_low": pytest.approx(low),
        "ci_high": pytest.approx(high),
        "comparable": 180,
        "agreed": 171,
    }
    # percentile_cont: primary over 1..200; shadow over 2 * (13..200) (timeouts have no response)
    latency = entry["latency_ms"]
    assert latency["primary"] == pytest.approx({"p50": 100.5, "p90": 180.1, "p99": 198.01})
    assert latency["shadow"] == pytest.approx({"p50": 213.0, "p90": 362.6, "p99": 396.26})
    assert latency["ratio"] == pytest.approx({"p50": 213.0 / 100.5, "p99": 396.26 / 198.01})
    assert entry["shadow_error_rate"] == pytest.approx(0.1)
    assert entry["shadow_errors"] == {"status_5xx": 8, "timeout": 12}
    assert entry["scores"] == pytest.approx(
        {"primary_mean": 0.8, "shadow_mean": 0.85, "delta": 0.05, "pairs": 180}
    )
    # pos and neg tie at 123 occurrences: ties break by name
    assert entry["confusion"] == {
        "labels": ["neg", "pos", "neu"],
        "matrix": [[57, 0, 0], [9, 57, 0], [0, 0, 57]],
    }
    disagreements = entry["top_disagreements"]
    assert [d["request_id"] for d in disagreements] == [
        f"req-{i:03d}" for i in (27, 25, 23, 21, 28, 26, 24, 22, 20)
    ]
    first = disagreements[0]
    assert (first["primary_label"], first["shadow_label"]) == ("pos", "neg")
    assert first["input"] == ('{"text": "review 27 ' + "x" * 300)[:200]
    hourly = entry["hourly"]
    assert [(h["samples"], h["comparable"], h["agreed"]) for h in hourly] == [
        (100, 90, 85),
        (100, 90, 86),
    ]
    assert hourly[0]["hour"] == time.strftime("%Y-%m-%dT%H:00:00Z", time.gmtime(BASE_HOUR))
    assert hourly[1]["ci_low"] == pytest.approx(wilson_interval(86, 90)[0])  # type: ignore[index]
    histogram = entry["latency_histogram"]
    assert sum(histogram["primary"]) == 200 and sum(histogram["shadow"]) == 188
    assert entry["decision"] == "not_ready"


async def test_gate_verdicts(seeded: str, tmp_path: Path) -> None:
    config = write_config(tmp_path, seeded)
    _, out = await run_report(config, tmp_path, route="sentiment", shadow="v2")
    gates = {g["name"]: g for g in json.loads(out)["routes"][0]["gates"]}
    assert list(gates) == [
        "min_samples",
        "min_agreement",
        "max_latency_ratio_p50",
        "max_latency_ratio_p99",
        "min_score_delta",
        "max_shadow_error_rate",
    ]
    assert gates["min_samples"] == {
        "name": "min_samples", "threshold": 100, "value": 200, "passed": True, "note": ""
    }  # fmt: skip
    assert gates["min_agreement"]["value"] == pytest.approx(wilson_interval(171, 180)[0])  # type: ignore[index]
    assert gates["min_agreement"]["passed"] is True  # lower bound ~0.907 >= 0.9
    assert gates["max_latency_ratio_p50"]["passed"] is True  # 2.12 <= 2.5
    assert gates["max_latency_ratio_p99"]["passed"] is True  # 2.00 <= 2.5
    assert gates["min_score_delta"]["value"] == pytest.approx(0.05)
    assert gates["min_score_delta"]["passed"] is True
    assert gates["max_shadow_error_rate"] == {
        "name": "max_shadow_error_rate", "threshold": 0.01, "value": pytest.approx(0.1),
        "passed": False, "note": "",
    }  # fmt: skip


async def test_exit_codes(seeded: str, tmp_path: Path) -> None:
    config = write_config(tmp_path, seeded)
    assert (await run_report(config, tmp_path, shadow="v2"))[0] == 1
    # every shadow of the route: configured v2 (not ready) and recorded v3 (10 samples): 3 wins
    code, out = await run_report(config, tmp_path, route="sentiment")
    entries = {e["shadow"]: e["decision"] for e in json.loads(out)["routes"]}
    assert entries == {"v2": "not_ready", "v3": "insufficient_samples"}
    assert code == 3
    config = write_config(tmp_path, seeded, READY_GATE)
    code, out = await run_report(config, tmp_path, shadow="v2")
    assert (code, json.loads(out)["routes"][0]["decision"]) == (0, "ready")
    # a window that holds none of the traffic
    assert (await run_report(config, tmp_path, shadow="v2", since="1s"))[0] == 3
    # promote --if-ready: the route's first shadow by default
    gate = {"config_path": config, "database_url": None, "route": "sentiment", "since": "24h"}
    assert await asyncio.to_thread(evaluate_gate, shadow=None, **gate) == 0
    assert await asyncio.to_thread(evaluate_gate, shadow="v2", **gate) == 0
    # v3 has records but is not a configured shadow: nothing to promote
    assert await asyncio.to_thread(evaluate_gate, shadow="v3", **gate) == 2
    config = write_config(tmp_path, seeded, NOT_READY_GATE)
    assert await asyncio.to_thread(evaluate_gate, shadow=None, **gate) == 1
    assert await asyncio.to_thread(evaluate_gate, shadow=None, **{**gate, "since": "1s"}) == 3


async def test_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], postgres_url: str
) -> None:
    url = await seed("sqlite", traffic()[:5], postgres_url=postgres_url, tmp=str(tmp_path))
    config = write_config(tmp_path, url)
    assert (await run_report(config, tmp_path, route="fraud"))[0] == 2
    err = capsys.readouterr().err
    assert "'fraud'" in err and config in err
    assert (await run_report(str(tmp_path / "missing.yaml"), tmp_path))[0] == 2
    assert "missing.yaml" in capsys.readouterr().err
    assert (await run_report(config, tmp_path, since="yesterday"))[0] == 2
    assert "yesterday" in capsys.readouterr().err
    gate = {"config_path": config, "database_url": None, "shadow": None, "since": "24h"}
    assert await asyncio.to_thread(evaluate_gate, route="fraud", **gate) == 2


async def test_database_url_overrides_config(tmp_path: Path, postgres_url: str) -> None:
    url = await seed("jsonl", traffic(), postgres_url=postgres_url, tmp=str(tmp_path))
    config = write_config(tmp_path, "sqlite:///nowhere.db")
    code, out = await run_report(config, tmp_path, shadow="v2", database_url=url)
    assert (code, json.loads(out)["routes"][0]["samples"]) == (1, 200)


async def test_text_and_markdown(tmp_path: Path, postgres_url: str) -> None:
    url = await seed("sqlite", traffic(), postgres_url=postgres_url, tmp=str(tmp_path))
    config = write_config(tmp_path, url)
    code, text = await run_report(config, tmp_path, shadow="v2", fmt="text")
    assert code == 1
    assert "sentiment: v2 (shadow) vs v1 (primary)" in text
    assert "95.00% [95% CI" in text
    assert re.search(r"max_shadow_error_rate\s.*10\.00%\s+FAIL", text)
    assert re.search(r"min_agreement\s.*PASS", text)
    assert "req-027" in text and "decision: not_ready" in text
    code, markdown = await run_report(config, tmp_path, shadow="v2", fmt="markdown")
    assert code == 1
    assert "## sentiment: v2 (shadow) vs v1 (primary)" in markdown
    assert "| max_shadow_error_rate | <= 1.00% | 10.00% | FAIL |" in markdown
    assert "| primary \\ shadow | neg | pos | neu |" in markdown


async def test_html_is_self_contained(tmp_path: Path, postgres_url: str) -> None:
    url = await seed("sqlite", traffic(), postgres_url=postgres_url, tmp=str(tmp_path))
    config = write_config(tmp_path, url)
    code, html = await run_report(config, tmp_path, fmt="html")
    assert code == 3
    assert html.startswith("<!DOCTYPE html>")
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html, re.I)
    assert "http://" not in html and "https://" not in html
    assert "@import" not in html and "<script src" not in html
    for chart in ("agreement-chart", "latency-chart", "confusion-chart"):
        assert f'class="{chart}"' in html
    assert html.count("<svg") >= 6  # three charts for each of v2 and v3


def test_cli_prints_json_to_stdout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    database = tmp_path / "records.db"
    seed_sqlite(str(database), traffic())
    config = write_config(tmp_path, f"sqlite:///{database}")
    code = main(["report", "--config", config, "--shadow", "v2", "--format", "json"])
    assert code == 1
    assert json.loads(capsys.readouterr().out)["routes"][0]["samples"] == 200
    assert main(["report", "--config", config, "--route", "nope"]) == 2
    with pytest.raises(SystemExit) as refused:  # argparse refuses an unknown format
        main(["report", "--config", config, "--format", "yaml"])
    assert refused.value.code == 2
