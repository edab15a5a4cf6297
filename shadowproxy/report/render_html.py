"""`--format html`: one self-contained file, inline CSS and inline SVG charts, no network."""

from __future__ import annotations

from html import escape

from shadowproxy.report import fmt
from shadowproxy.report.charts import agreement_chart, confusion_chart, latency_chart
from shadowproxy.report.model import Report, RouteReport
from shadowproxy.report.render_json import iso

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1000px; color: #222; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.2rem; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5rem 0 1rem; }
td, th { border: 1px solid #ddd; padding: 0.25rem 0.6rem; text-align: right; }
td:first-child, th:first-child { text-align: left; }
.pass { color: #2e8b57; font-weight: bold; } .fail { color: #c0392b; font-weight: bold; }
.decision { font-size: 1.1rem; padding: 0.5rem 0.8rem; border-radius: 4px; display: inline-block; }
.ready { background: #e3f4ea; } .not_ready { background: #fbe4e1; }
.insufficient_samples { background: #fdf3dc; }
.charts { display: flex; flex-wrap: wrap; gap: 1rem; } svg { background: #fafafa; }
code { font-size: 0.85rem; }
"""


def _table(header: list[str], rows: list[list[str]]) -> str:
    """Cells are already-escaped HTML."""
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _entry(entry: RouteReport) -> str:
    agg = entry.aggregate
    threshold = next(g.threshold for g in entry.gates if g.name == "min_agreement")
    gates = _table(
        ["gate", "threshold", "value", "result"],
        [
            [
                escape(g.name),
                escape(fmt.gate_threshold(g)),
                escape(fmt.gate_value(g)),
                f'<span class="{"pass" if g.passed else "fail"}">{fmt.verdict(g)}</span>',
            ]
            for g in entry.gates
        ],
    )
    latency = _table(fmt.LATENCY_HEADER, fmt.latency_rows(entry))
    disagreements = _table(
        ["request id", "time", "primary", "shadow", "input"],
        [
            [
                f"<code>{escape(d.request_id)}</code>",
                escape(iso(d.ts)),
                escape(str(d.primary_label)),
                escape(str(d.shadow_label)),
                f"<code>{escape(d.input or '-')}</code>",
            ]
            for d in agg.top_disagreements
        ],
    )
    return f"""
<section>
<h2>{escape(fmt.title(entry))}</h2>
<p class="decision {escape(entry.decision)}">{escape(entry.decision)}: {escape(entry.recommendation)}</p>
{gates}
<ul>
<li>samples: {agg.samples}</li>
<li>agreement: {escape(fmt.agreement_line(entry))}</li>
<li>shadow error rate: {escape(fmt.errors_line(entry))}</li>
<li>mean scores: primary {fmt.num(agg.primary_score_mean)}, shadow {fmt.num(agg.shadow_score_mean)},
delta {fmt.num(entry.score_delta)}</li>
</ul>
{latency}
<div class="charts">
{agreement_chart(agg.hourly, threshold)}
{latency_chart(agg.primary_histogram, agg.shadow_histogram)}
{confusion_chart(agg.confusion)}
</div>
{"<h3>Top disagreements</h3>" + disagreements if agg.top_disagreements else ""}
</section>"""


def render_html(report: Report) -> str:
    sections = (
        "".join(_entry(entry) for entry in report.routes) or "<p>No (route, shadow) pair.</p>"
    )
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>shadowproxy report</title>
<style>{_CSS}</style>
</head>
<body>
<h1>shadowproxy report</h1>
<p>Last {report.since_seconds / 3600:g}h of {escape(report.backend)} records,
generated {escape(iso(report.generated_at))}.</p>
{sections}
</body>
</html>
"""
