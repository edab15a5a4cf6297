"""`--format text`: a terminal report, one block per (route, shadow)."""

from __future__ import annotations

from shadowproxy.report import fmt
from shadowproxy.report.model import Confusion, Report, RouteReport
from shadowproxy.report.render_json import iso


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Left-aligned first column, right-aligned others, two spaces apart."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        parts = [
            cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i])
            for i, cell in enumerate(cells)
        ]
        return "  ".join(parts).rstrip()

    return [line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)]


def confusion_rows(confusion: Confusion) -> tuple[list[str], list[list[str]]]:
    header = ["primary \\ shadow", *confusion.labels]
    rows = [
        [label, *(str(n) for n in row)]
        for label, row in zip(confusion.labels, confusion.matrix, strict=True)
    ]
    return header, rows


def _entry(entry: RouteReport) -> list[str]:
    agg = entry.aggregate
    lines = [
        fmt.title(entry),
        "=" * len(fmt.title(entry)),
        f"samples          {agg.samples}",
        f"agreement        {fmt.agreement_line(entry)}",
        f"shadow errors    {fmt.errors_line(entry)}",
        f"mean scores      primary {fmt.num(agg.primary_score_mean)}  "
        f"shadow {fmt.num(agg.shadow_score_mean)}  delta {fmt.num(entry.score_delta)}",
        "",
        *table(fmt.LATENCY_HEADER, fmt.latency_rows(entry)),
    ]
    if agg.confusion.labels:
        header, rows = confusion_rows(agg.confusion)
        lines += [
            "",
            "confusion (rows: primary label, columns: shadow label)",
            *table(header, rows),
        ]
    if agg.top_disagreements:
        lines += [
            "",
            "top disagreements",
            *table(
                ["request id", "time", "primary", "shadow", "input"],
                [
                    [
                        d.request_id,
                        iso(d.ts),
                        str(d.primary_label),
                        str(d.shadow_label),
                        _short(d.input),
                    ]
                    for d in agg.top_disagreements
                ],
            ),
        ]
    if agg.hourly:
        lines += [
            "",
            "agreement per hour",
            *table(
                ["hour (UTC)", "samples", "agreement"],
                [
                    [
                        iso(h.hour)[:13] + ":00",
                        str(h.samples),
                        fmt.pct(_rate(h.agreed, h.comparable)),
                    ]
                    for h in agg.hourly
                ],
            ),
        ]
    lines += [
        "",
        *table(
            ["gate", "threshold", "value", "result"],
            [
                [g.name, fmt.gate_threshold(g), fmt.gate_value(g), fmt.verdict(g)]
                for g in entry.gates
            ],
        ),
        "",
        f"decision: {entry.decision}",
        f"recommendation: {entry.recommendation}",
    ]
    return lines


def _rate(agreed: int, comparable: int) -> float | None:
    return agreed / comparable if comparable else None


def _short(text: str | None, width: int = 60) -> str:
    if text is None:
        return "-"
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def render_text(report: Report) -> str:
    hours = report.since_seconds / 3600
    lines = [
        f"shadowproxy report: last {hours:g}h, {report.backend} records, {iso(report.generated_at)}"
    ]
    if not report.routes:
        lines += ["", "no (route, shadow) pair to report: no shadow configured or recorded."]
    for entry in report.routes:
        lines += ["", *_entry(entry)]
    return "\n".join(lines) + "\n"
