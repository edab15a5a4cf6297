"""`--format markdown`: the report as GitHub-flavoured Markdown, to paste into a PR."""

from __future__ import annotations

from shadowproxy.report import fmt
from shadowproxy.report.model import Report, RouteReport
from shadowproxy.report.render_json import iso

_DECISION = {
    "ready": "✅ ready",
    "not_ready": "❌ not ready",
    "insufficient_samples": "⏳ insufficient samples",
}


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(_cell(h) for h in header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *("| " + " | ".join(_cell(c) for c in row) + " |" for row in rows),
    ]


def _entry(entry: RouteReport) -> list[str]:
    agg = entry.aggregate
    lines = [
        f"## {fmt.title(entry)}",
        "",
        f"**Decision: {_DECISION.get(entry.decision, entry.decision)}** — {entry.recommendation}",
        "",
        *table(
            ["gate", "threshold", "value", "result"],
            [
                [g.name, fmt.gate_threshold(g), fmt.gate_value(g), fmt.verdict(g)]
                for g in entry.gates
            ],
        ),
        "",
        f"- samples: {agg.samples}",
        f"- agreement: {fmt.agreement_line(entry)}",
        f"- shadow error rate: {fmt.errors_line(entry)}",
        f"- mean scores: primary {fmt.num(agg.primary_score_mean)}, "
        f"shadow {fmt.num(agg.shadow_score_mean)}, delta {fmt.num(entry.score_delta)}",
        "",
        *table(fmt.LATENCY_HEADER, fmt.latency_rows(entry)),
    ]
    if agg.confusion.labels:
        lines += [
            "",
            "Confusion (rows: primary label, columns: shadow label)",
            "",
            *table(
                ["primary \\ shadow", *agg.confusion.labels],
                [
                    [label, *(str(n) for n in row)]
                    for label, row in zip(agg.confusion.labels, agg.confusion.matrix, strict=True)
                ],
            ),
        ]
    if agg.top_disagreements:
        lines += [
            "",
            "Top disagreements",
            "",
            *table(
                ["request id", "primary", "shadow", "input"],
                [
                    [
                        f"`{d.request_id}`",
                        str(d.primary_label),
                        str(d.shadow_label),
                        "-" if d.input is None else f"`{' '.join(d.input.split())[:80]}`",
                    ]
                    for d in agg.top_disagreements
                ],
            ),
        ]
    return lines


def render_markdown(report: Report) -> str:
    lines = [
        "# shadowproxy report",
        "",
        f"Last {report.since_seconds / 3600:g}h of {report.backend} records, "
        f"generated {iso(report.generated_at)}.",
    ]
    if not report.routes:
        lines += ["", "No (route, shadow) pair to report."]
    for entry in report.routes:
        lines += ["", *_entry(entry)]
    return "\n".join(lines) + "\n"
