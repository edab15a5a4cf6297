"""deploy/prometheus and deploy/grafana use only the metrics the proxy exports.

Rules: `promtool check rules` and `promtool test rules` (rules.test.yml). Dashboard: every
query parses (promtool, Grafana variables substituted). Both: every `shadowproxy_*` metric,
matcher, label value and grouping label exists in PRODUCT.md's list, which must itself equal
what shadowproxy.telemetry.metrics registers. promtool is required when CI=true.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from shadowproxy.telemetry.metrics import Metrics

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "shadowproxy-dashboard.json"

# PRODUCT.md "Metrics (names are binding)": name -> labels.
METRICS: dict[str, frozenset[str]] = {
    name: frozenset(labels.split())
    for name, labels in {
        "shadowproxy_requests_total": "route upstream role code",
        "shadowproxy_upstream_latency_seconds": "route upstream role",
        "shadowproxy_comparisons_total": "route shadow outcome",
        "shadowproxy_agreement_ratio": "route shadow",
        "shadowproxy_latency_quantile_seconds": "route upstream role percentile",
        "shadowproxy_mirror_in_flight": "route shadow",
        "shadowproxy_mirror_dropped_total": "route shadow reason",
        "shadowproxy_records_total": "outcome",
        "shadowproxy_record_queue_depth": "",
        "shadowproxy_spool_pending": "",
        "shadowproxy_config_reloads_total": "outcome",
        "shadowproxy_config_info": "sha256",
        "shadowproxy_promotions_total": "route",
        "shadowproxy_background_errors_total": "task",
        "shadowproxy_connections_rejected_total": "reason",
        "shadowproxy_upstream_retries_total": "upstream role",
    }.items()
}
HISTOGRAMS = {"shadowproxy_upstream_latency_seconds"}
# Closed label values, per metric and label.
VALUES: dict[tuple[str, str], set[str]] = {
    ("shadowproxy_requests_total", "role"): {"primary", "shadow"},
    ("shadowproxy_upstream_latency_seconds", "role"): {"primary", "shadow"},
    ("shadowproxy_latency_quantile_seconds", "role"): {"primary", "shadow"},
    ("shadowproxy_latency_quantile_seconds", "percentile"): {"p50", "p90", "p99"},
    ("shadowproxy_comparisons_total", "outcome"): {"agree", "disagree", "shadow_error", "primary_error"},
    ("shadowproxy_mirror_dropped_total", "reason"): {"saturated", "body_too_large", "overload"},
    ("shadowproxy_records_total", "outcome"): {"written", "spooled", "dropped"},
    ("shadowproxy_config_reloads_total", "outcome"): {"ok", "error"},
}  # fmt: skip
# Labels Prometheus attaches to every scraped series.
TARGET_LABELS = frozenset({"job", "instance"})

METRIC = re.compile(r"(?<![\w:])(shadowproxy_[a-z_]+)(?![\w:])\s*(\{[^}]*\})?")
RECORDED = re.compile(r"(?<![\w:\"])([a-z_]+:[a-z_0-9:]+)(?![\w:])")
MATCHER = re.compile(r'([a-zA-Z_]\w*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
LABEL_REPLACE_DST = re.compile(r'label_replace\s*\([^"]*"([a-zA-Z_]\w*)"')


def resolve(name: str) -> tuple[str, frozenset[str]]:
    """A series name -> (the metric it belongs to, the labels it carries)."""
    for suffix in ("_bucket", "_sum", "_count"):
        base = name.removesuffix(suffix)
        if base != name and base in HISTOGRAMS:
            extra = {"le"} if suffix == "_bucket" else set()
            return base, METRICS[base] | extra
    assert name in METRICS, f"{name} is not a metric shadowproxy exports"
    return name, METRICS[name]


def balanced(expr: str, start: int, step: int) -> str:
    """The parenthesised group opening (step 1) or closing (step -1) at expr[start]."""
    depth, i = 0, start
    while 0 <= i < len(expr):
        depth += {"(": 1, ")": -1}.get(expr[i], 0) * step
        if depth == 0:
            return expr[min(start, i) : max(start, i) + 1]
        i += step
    raise AssertionError(f"unbalanced parentheses in {expr!r}")


def check_expr(expr: str, recorded: set[str]) -> set[str]:
    """Assert that `expr` only uses exported metrics and labels; return the metrics used."""
    used: set[str] = set()
    everything = set(TARGET_LABELS) | set(LABEL_REPLACE_DST.findall(expr))
    for name, selector in METRIC.findall(expr):
        metric, labels = resolve(name)
        used.add(metric)
        everything |= labels
        for label, op, value in MATCHER.findall(selector):
            assert label in labels | TARGET_LABELS, f"{name} has no label {label!r}: {expr}"
            allowed = VALUES.get((metric, label))
            if allowed and op in {"=", "=~"} and re.fullmatch(r"[\w|]+", value):
                assert set(value.split("|")) <= allowed, f"{name}{{{label}}}: {value!r}"
    for name in RECORDED.findall(expr):
        assert name in recorded, f"{name} is not recorded by rules.yml: {expr}"

    for match in GROUPING.finditer(expr):
        clause = match.group(1)
        grouped = {x.strip() for x in match.group(2).split(",") if x.strip()}
        scope: frozenset[str] = frozenset(everything)
        if clause in {"by", "without"}:
            after = expr[match.end() :].lstrip()
            if after.startswith("("):
                argument = balanced(expr, len(expr) - len(after), 1)
            else:  # `sum(...) by (x)`
                argument = balanced(expr, len(expr[: match.start()].rstrip()) - 1, -1)
            names = [resolve(n)[1] for n, _ in METRIC.findall(argument)]
            if names:
                created = LABEL_REPLACE_DST.findall(argument)
                scope = frozenset.intersection(*names) | TARGET_LABELS | frozenset(created)
        assert grouped <= scope, f"{clause} ({', '.join(sorted(grouped - scope))}) unknown: {expr}"
    return used


def rules() -> list[dict[str, Any]]:
    data = yaml.safe_load((PROMETHEUS / "rules.yml").read_text())
    return [rule for group in data["groups"] for rule in group["rules"]]


def recorded_names() -> set[str]:
    return {r["record"] for r in rules() if "record" in r}


def dashboard_queries() -> Iterator[str]:
    def walk(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in {"expr", "definition"} and isinstance(value, str):
                    yield value
                else:
                    yield from walk(value)
        elif isinstance(node, list):
            for item in node:
                yield from walk(item)

    yield from walk(json.loads(DASHBOARD.read_text()))


GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h",
                     "$route": ".*", "$shadow": ".*"}  # fmt: skip


def as_promql(query: str) -> str | None:
    if query.startswith("label_values("):
        return None
    for variable, value in GRAFANA_VARIABLES.items():
        query = query.replace(variable, value)
    assert "$" not in query.replace('"$1"', ""), f"unknown Grafana variable in {query}"
    return query


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("promtool is required when CI=true (make deploy-tools installs it)")
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    return path


def run(*args: str) -> None:
    out = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_binding_metric_list_is_what_the_proxy_registers() -> None:
    metrics = Metrics(CollectorRegistry())
    registered = {}
    for family in metrics.registry.collect():
        name = family.name + ("_total" if family.type == "counter" else "")
        registered[name] = family.type
    assert set(registered) == set(METRICS)
    assert {n for n, t in registered.items() if t == "histogram"} == HISTOGRAMS
    for attribute in vars(metrics).values():
        labelnames = getattr(attribute, "_labelnames", None)
        if labelnames is not None:
            name = attribute._name + ("_total" if attribute._type == "counter" else "")
            assert frozenset(labelnames) == METRICS[name], name


def test_rules_pass_promtool_check() -> None:
    run(promtool(), "check", "rules", str(PROMETHEUS / "rules.yml"))


def test_rules_pass_their_unit_tests() -> None:
    run(promtool(), "test", "rules", str(PROMETHEUS / "rules.test.yml"))


def test_compose_prometheus_config_passes_promtool(tmp_path: Path) -> None:
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    config["rule_files"] = [str(PROMETHEUS / "rules.yml")]  # where compose mounts it
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    run(promtool(), "check", "config", str(tmp_path / "prometheus.yml"))


def test_rules_use_only_exported_metrics_and_labels() -> None:
    used: set[str] = set()
    for rule in rules():
        used |= check_expr(rule["expr"], recorded_names())
    alerts = {r["alert"] for r in rules() if "alert" in r}
    expected = {"ShadowproxyAgreementBelowGate", "ShadowproxyShadowErrorRateHigh",
                "ShadowproxyMirrorDropped", "ShadowproxyRecordsDropped",
                "ShadowproxyRecordsSpooling", "ShadowproxyConfigReloadFailed",
                "ShadowproxyConfigDrift"}  # fmt: skip
    assert expected <= alerts
    for rule in rules():
        if "alert" in rule:
            assert rule["labels"]["severity"] in {"critical", "warning", "info"}
            assert rule["annotations"]["summary"]


def test_dashboard_uses_only_exported_metrics_and_labels() -> None:
    used: set[str] = set()
    for query in dashboard_queries():
        used |= check_expr(query, recorded=set())
    must_show = {"shadowproxy_agreement_ratio", "shadowproxy_latency_quantile_seconds",
                 "shadowproxy_requests_total", "shadowproxy_mirror_dropped_total",
                 "shadowproxy_record_queue_depth", "shadowproxy_spool_pending",
                 "shadowproxy_records_total", "shadowproxy_config_reloads_total"}  # fmt: skip
    assert must_show <= used


def test_dashboard_queries_parse(tmp_path: Path) -> None:
    queries = [q for q in map(as_promql, dashboard_queries()) if q]
    group = {"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}:parse", "expr": q} for i, q in enumerate(queries)
    ]}  # fmt: skip
    (tmp_path / "dashboard.rules.yml").write_text(yaml.safe_dump({"groups": [group]}))
    run(promtool(), "check", "rules", str(tmp_path / "dashboard.rules.yml"))


def test_dashboard_is_importable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels:
        assert panel["targets"] and panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "route", "shadow"} <= variables


def test_checker_catches_mistakes() -> None:
    bad = [
        "rate(shadowproxy_request_total[5m])",  # misspelt metric
        'shadowproxy_records_total{result="dropped"}',  # unknown label
        'shadowproxy_comparisons_total{outcome="agreed"}',  # unknown value
        "sum by (shadow) (rate(shadowproxy_requests_total[5m]))",  # label of another metric
        "sum(rate(shadowproxy_records_total[5m])) by (route)",
        "route:unknown:rate5m",  # unrecorded recording rule
    ]
    for expr in bad:
        with pytest.raises(AssertionError):
            check_expr(expr, recorded=set())
    check_expr(
        "histogram_quantile(0.9, sum by (le, route) (rate(shadowproxy_upstream_latency_seconds_bucket[5m])))",
        recorded=set(),
    )
