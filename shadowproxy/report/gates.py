"""Judge one (route, shadow) aggregate against the route's gate. Pure.

Decisions: ``insufficient_samples`` when there are fewer pairs than ``min_samples``
(whatever else the numbers say: too little evidence to decide either way);
otherwise ``ready`` when every check passes, else ``not_ready``.

The checks:
- ``min_samples``: pairs in the window.
- ``min_agreement``: the LOWER bound of the 95% Wilson interval of agreement over
  comparable pairs, so a small lucky sample cannot pass. No comparable pair fails.
- ``max_latency_ratio_p50`` / ``_p99``: shadow / primary latency percentile; both must hold.
  Unmeasurable (no shadow responses) fails.
- ``min_score_delta``: shadow mean score - primary mean score. Routes without scores
  have nothing to compare: the check passes with value null and note "n/a".
- ``max_shadow_error_rate``: pairs with a shadow error / pairs.
"""

from __future__ import annotations

from shadowproxy.config.settings import GateSettings
from shadowproxy.report.model import (
    INSUFFICIENT,
    NOT_READY,
    READY,
    Aggregate,
    GateCheck,
    Interval,
    RouteReport,
)
from shadowproxy.report.stats import ratio, wilson_interval


def agreement_interval(agreed: int, comparable: int) -> Interval:
    bounds = wilson_interval(agreed, comparable)
    if bounds is None:
        return Interval(value=None, ci_low=None, ci_high=None)
    return Interval(value=agreed / comparable, ci_low=bounds[0], ci_high=bounds[1])


def _at_most(name: str, threshold: float, value: float | None) -> GateCheck:
    if value is None:
        return GateCheck(name, threshold, None, False, "not measurable")
    return GateCheck(name, threshold, value, value <= threshold)


def _at_least(name: str, threshold: float, value: float | None) -> GateCheck:
    if value is None:
        return GateCheck(name, threshold, None, False, "not measurable")
    return GateCheck(name, threshold, value, value >= threshold)


def judge(agg: Aggregate, gate: GateSettings) -> RouteReport:
    agreement = agreement_interval(agg.agreed, agg.comparable)
    ratio_p50 = ratio(agg.shadow_latency.p50, agg.primary_latency.p50)
    ratio_p99 = ratio(agg.shadow_latency.p99, agg.primary_latency.p99)
    error_rate = agg.shadow_error_count / agg.samples if agg.samples else None
    delta = (
        agg.shadow_score_mean - agg.primary_score_mean
        if agg.shadow_score_mean is not None and agg.primary_score_mean is not None
        else None
    )
    if delta is None:
        score_check = GateCheck("min_score_delta", gate.min_score_delta, None, True, "n/a")
    else:
        score_check = _at_least("min_score_delta", gate.min_score_delta, delta)
    checks = (
        GateCheck("min_samples", gate.min_samples, agg.samples, agg.samples >= gate.min_samples),
        _at_least("min_agreement", gate.min_agreement, agreement.ci_low),
        _at_most("max_latency_ratio_p50", gate.max_latency_ratio, ratio_p50),
        _at_most("max_latency_ratio_p99", gate.max_latency_ratio, ratio_p99),
        score_check,
        _at_most("max_shadow_error_rate", gate.max_shadow_error_rate, error_rate),
    )
    if agg.samples < gate.min_samples:
        decision = INSUFFICIENT
    elif all(check.passed for check in checks):
        decision = READY
    else:
        decision = NOT_READY
    return RouteReport(
        aggregate=agg,
        agreement=agreement,
        latency_ratio_p50=ratio_p50,
        latency_ratio_p99=ratio_p99,
        shadow_error_rate=error_rate,
        score_delta=delta,
        gates=checks,
        decision=decision,
        recommendation=recommend(agg, decision, checks),
    )


def recommend(agg: Aggregate, decision: str, checks: tuple[GateCheck, ...]) -> str:
    name = f"{agg.shadow!r} on route {agg.route!r}"
    if decision == READY:
        return f"Promote {name}: every gate check passed."
    if decision == INSUFFICIENT:
        need = next(c.threshold for c in checks if c.name == "min_samples")
        return f"Keep shadowing {name}: {agg.samples} of {need:g} samples needed to decide."
    failed = ", ".join(c.name for c in checks if not c.passed)
    return f"Do not promote {name}: failed {failed}."
