"""`--format json`: one object with a list ``routes``; stable keys, for CI/CD.

Numbers are unrounded; null means "not measurable" (no comparable pair, no
response on a side, no scores). Times are ISO-8601 UTC.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson

from shadowproxy.report.gates import agreement_interval
from shadowproxy.report.model import LATENCY_EDGES_MS, Percentiles, Report, RouteReport


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _percentiles(p: Percentiles) -> dict[str, float | None]:
    return {"p50": p.p50, "p90": p.p90, "p99": p.p99}


def entry_to_dict(entry: RouteReport) -> dict[str, Any]:
    agg = entry.aggregate
    hourly = []
    for bucket in agg.hourly:
        interval = agreement_interval(bucket.agreed, bucket.comparable)
        hourly.append(
            {
                "hour": iso(bucket.hour),
                "samples": bucket.samples,
                "comparable": bucket.comparable,
                "agreed": bucket.agreed,
                "agreement": interval.value,
                "ci_low": interval.ci_low,
                "ci_high": interval.ci_high,
            }
        )
    return {
        "route": agg.route,
        "primary": agg.primary,
        "shadow": agg.shadow,
        "samples": agg.samples,
        "agreement": {
            "value": entry.agreement.value,
            "ci_low": entry.agreement.ci_low,
            "ci_high": entry.agreement.ci_high,
            "comparable": agg.comparable,
            "agreed": agg.agreed,
        },
        "latency_ms": {
            "primary": _percentiles(agg.primary_latency),
            "shadow": _percentiles(agg.shadow_latency),
            "ratio": {"p50": entry.latency_ratio_p50, "p99": entry.latency_ratio_p99},
        },
        "shadow_error_rate": entry.shadow_error_rate,
        "shadow_errors": dict(sorted(agg.shadow_errors.items())),
        "primary_errors": agg.primary_errors,
        "scores": {
            "primary_mean": agg.primary_score_mean,
            "shadow_mean": agg.shadow_score_mean,
            "delta": entry.score_delta,
            "pairs": agg.scored_pairs,
        },
        "confusion": {
            "labels": list(agg.confusion.labels),
            "matrix": [list(row) for row in agg.confusion.matrix],
        },
        "top_disagreements": [
            {
                "request_id": d.request_id,
                "ts": iso(d.ts),
                "input": d.input,
                "primary_label": d.primary_label,
                "shadow_label": d.shadow_label,
            }
            for d in agg.top_disagreements
        ],
        "hourly": hourly,
        "latency_histogram": {
            "edges_ms": list(LATENCY_EDGES_MS),
            "primary": list(agg.primary_histogram),
            "shadow": list(agg.shadow_histogram),
        },
        "gates": [
            {
                "name": g.name,
                "threshold": g.threshold,
                "value": g.value,
                "passed": g.passed,
                "note": g.note,
            }
            for g in entry.gates
        ],
        "decision": entry.decision,
        "recommendation": entry.recommendation,
    }


def report_to_dict(report: Report) -> dict[str, Any]:
    return {
        "generated_at": iso(report.generated_at),
        "since_seconds": report.since_seconds,
        "config": report.config_path,
        "backend": report.backend,
        "routes": [entry_to_dict(entry) for entry in report.routes],
    }


def render_json(report: Report) -> str:
    return orjson.dumps(report_to_dict(report), option=orjson.OPT_INDENT_2).decode() + "\n"
