"""Number formatting shared by the human-readable renderers."""

from __future__ import annotations

from shadowproxy.report.model import GateCheck, RouteReport


def pct(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value * 100:.{digits}f}%"


def ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} ms"


def num(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def gate_value(check: GateCheck) -> str:
    if check.value is None:
        return check.note or "n/a"
    if check.name == "min_samples":
        return f"{check.value:g}"
    if "latency_ratio" in check.name:
        return f"{check.value:.2f}"
    if check.name in ("min_agreement", "max_shadow_error_rate"):
        return pct(check.value, 2)
    return f"{check.value:+.4f}"


def gate_threshold(check: GateCheck) -> str:
    if check.name == "min_samples":
        return f">= {check.threshold:g}"
    if check.name == "min_agreement":
        return f">= {pct(check.threshold, 2)} (95% CI lower bound)"
    if check.name == "max_shadow_error_rate":
        return f"<= {pct(check.threshold, 2)}"
    if check.name.startswith("max_"):
        return f"<= {check.threshold:g}"
    return f">= {check.threshold:+g}"


def verdict(check: GateCheck) -> str:
    return "PASS" if check.passed else "FAIL"


def title(entry: RouteReport) -> str:
    agg = entry.aggregate
    return f"{agg.route}: {agg.shadow} (shadow) vs {agg.primary} (primary)"


def agreement_line(entry: RouteReport) -> str:
    a = entry.agreement
    agg = entry.aggregate
    return (
        f"{pct(a.value, 2)} [95% CI {pct(a.ci_low, 2)} - {pct(a.ci_high, 2)}] "
        f"({agg.agreed}/{agg.comparable} comparable pairs)"
    )


def errors_line(entry: RouteReport) -> str:
    kinds = ", ".join(f"{k}={n}" for k, n in sorted(entry.aggregate.shadow_errors.items()))
    return f"{pct(entry.shadow_error_rate, 2)}" + (f" ({kinds})" if kinds else "")


LATENCY_HEADER = ["latency", "p50", "p90", "p99"]


def latency_rows(entry: RouteReport) -> list[list[str]]:
    """Both sides' percentiles and their ratios, one table for every format."""
    p, s = entry.aggregate.primary_latency, entry.aggregate.shadow_latency
    return [
        ["primary", ms(p.p50), ms(p.p90), ms(p.p99)],
        ["shadow", ms(s.p50), ms(s.p90), ms(s.p99)],
        ["ratio", ratio(entry.latency_ratio_p50), "", ratio(entry.latency_ratio_p99)],
    ]
