"""The gate, judged on plain aggregates (no database)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from shadowproxy.config.settings import GateSettings
from shadowproxy.report.gates import judge
from shadowproxy.report.model import Aggregate, Percentiles

GATE = GateSettings(
    min_samples=100,
    min_agreement=0.95,
    max_latency_ratio=1.2,
    min_score_delta=0.0,
    max_shadow_error_rate=0.01,
)
FAST = Percentiles(10.0, 15.0, 20.0)


def aggregate(**values: object) -> Aggregate:
    base: dict[str, object] = {
        "route": "r",
        "shadow": "s",
        "primary": "p",
        "samples": 1000,
        "comparable": 1000,
        "agreed": 1000,
        "primary_latency": FAST,
        "shadow_latency": FAST,
    }
    base.update(values)
    return Aggregate(**base)  # type: ignore[arg-type]


def verdicts(agg: Aggregate, gate: GateSettings = GATE) -> dict[str, bool]:
    return {check.name: check.passed for check in judge(agg, gate).gates}


def test_all_pass_is_ready_and_scores_absent_are_na() -> None:
    report = judge(aggregate(), GATE)
    assert report.decision == "ready"
    score = next(c for c in report.gates if c.name == "min_score_delta")
    assert (score.value, score.passed, score.note) == (None, True, "n/a")
    assert "Promote 's' on route 'r'" in report.recommendation


def test_agreement_uses_the_lower_bound() -> None:
    # 100 of 100 agree: the point estimate is 1.0 but the lower bound ~0.963 < 0.97
    agg = aggregate(samples=100, comparable=100, agreed=100)
    assert verdicts(agg, GateSettings(min_agreement=0.97))["min_agreement"] is False
    assert verdicts(agg, GateSettings(min_agreement=0.96))["min_agreement"] is True


def test_latency_ratio_must_hold_at_p50_and_p99() -> None:
    slow_tail = aggregate(shadow_latency=Percentiles(10.0, 15.0, 30.0))
    assert verdicts(slow_tail)["max_latency_ratio_p50"] is True
    assert verdicts(slow_tail)["max_latency_ratio_p99"] is False
    assert judge(slow_tail, GATE).decision == "not_ready"
    silent = aggregate(shadow_latency=Percentiles())  # no shadow response at all
    assert verdicts(silent)["max_latency_ratio_p50"] is False


def test_score_delta_and_error_rate() -> None:
    worse = aggregate(primary_score_mean=0.9, shadow_score_mean=0.85, scored_pairs=1000)
    report = judge(worse, GATE)
    assert report.score_delta is not None and abs(report.score_delta + 0.05) < 1e-12
    assert verdicts(worse)["min_score_delta"] is False
    failing = aggregate(comparable=980, agreed=980, shadow_errors={"timeout": 20})
    assert judge(failing, GATE).shadow_error_rate == 0.02
    assert verdicts(failing)["max_shadow_error_rate"] is False


def test_nothing_comparable_fails_agreement() -> None:
    broken = aggregate(comparable=0, agreed=0, shadow_errors={"connect": 1000})
    report = judge(broken, GATE)
    assert report.agreement.value is None
    assert verdicts(broken)["min_agreement"] is False
    assert report.decision == "not_ready"  # enough samples: a broken shadow is a verdict


@given(st.integers(0, 300), st.floats(0.0, 1.0))
def test_decision_rules(samples: int, agree_share: float) -> None:
    agreed = round(samples * agree_share)
    report = judge(aggregate(samples=samples, comparable=samples, agreed=agreed), GATE)
    if samples < GATE.min_samples:
        assert report.decision == "insufficient_samples"
    elif all(check.passed for check in report.gates):
        assert report.decision == "ready"
    else:
        assert report.decision == "not_ready"
