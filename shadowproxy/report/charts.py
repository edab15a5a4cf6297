"""Inline SVG charts for the HTML report, drawn from the numbers alone.

No external reference of any kind (fonts, scripts, stylesheets, xmlns URLs are
not needed for SVG inside HTML5), so the file opens without a network.
"""

from __future__ import annotations

from html import escape

from shadowproxy.report.model import LATENCY_EDGES_MS, Confusion, HourBucket
from shadowproxy.report.render_json import iso
from shadowproxy.report.stats import wilson_interval

PRIMARY_COLOR = "#3b6fb6"
SHADOW_COLOR = "#e07b2a"
WIDTH, HEIGHT = 640, 240
LEFT, RIGHT, TOP, BOTTOM = 48, 16, 16, 36


def _svg(
    css_class: str, title: str, body: list[str], width: int = WIDTH, height: int = HEIGHT
) -> str:
    return (
        f'<svg class="{css_class}" viewBox="0 0 {width} {height}" width="{width}" '
        f'height="{height}" role="img" aria-label="{escape(title)}">'
        f"<title>{escape(title)}</title>{''.join(body)}</svg>"
    )


def _text(x: float, y: float, text: str, anchor: str = "middle", size: int = 11) -> str:
    return (
        f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" font-size="{size}">'
        f"{escape(text)}</text>"
    )


def agreement_chart(hourly: tuple[HourBucket, ...], threshold: float) -> str:
    """Agreement per hour with its 95% Wilson band and the gate's threshold."""
    title = "Agreement per hour (95% interval band)"
    points = []
    for bucket in hourly:
        bounds = wilson_interval(bucket.agreed, bucket.comparable)
        if bounds is not None:
            points.append((bucket.hour, bucket.agreed / bucket.comparable, *bounds))
    if not points:
        return _svg("agreement-chart", title, [_text(WIDTH / 2, HEIGHT / 2, "no comparable pairs")])
    floor = min(0.9, threshold, *(low for _, _, low, _ in points))
    floor = max(0.0, floor - 0.02)
    first, last = points[0][0], points[-1][0]
    span = max(last - first, 1.0)
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x(hour: float) -> float:
        return LEFT + (plot_w / 2 if last == first else (hour - first) / span * plot_w)

    def y(value: float) -> float:
        return TOP + (1.0 - (value - floor) / (1.0 - floor)) * plot_h

    band = [f"{x(h):.1f},{y(high):.1f}" for h, _, _, high in points]
    band += [f"{x(h):.1f},{y(low):.1f}" for h, _, low, _ in reversed(points)]
    line = " ".join(f"{x(h):.1f},{y(v):.1f}" for h, v, _, _ in points)
    # One hour has no band to draw: show its interval as an error bar instead.
    whiskers = (
        [
            f'<line x1="{x(h):.1f}" x2="{x(h):.1f}" y1="{y(high):.1f}" y2="{y(low):.1f}" '
            f'stroke="{SHADOW_COLOR}" stroke-width="6" stroke-opacity="0.3"/>'
            for h, _, low, high in points
        ]
        if len(points) == 1
        else []
    )
    body = [
        *whiskers,
        f'<polygon points="{" ".join(band)}" fill="{SHADOW_COLOR}" fill-opacity="0.2"/>',
        f'<polyline points="{line}" fill="none" stroke="{SHADOW_COLOR}" stroke-width="2"/>',
        *(
            f'<circle cx="{x(h):.1f}" cy="{y(v):.1f}" r="3" fill="{SHADOW_COLOR}"/>'
            for h, v, _, _ in points
        ),
        f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y(threshold):.1f}" y2="{y(threshold):.1f}" '
        'stroke="#c0392b" stroke-dasharray="4 3"/>',
        _text(WIDTH - RIGHT, y(threshold) - 4, f"gate {threshold:.0%}", "end"),
        f'<line x1="{LEFT}" x2="{LEFT}" y1="{TOP}" y2="{TOP + plot_h}" stroke="#888"/>',
        f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{TOP + plot_h}" y2="{TOP + plot_h}" stroke="#888"/>',
    ]
    for tick in (floor, (floor + 1.0) / 2, 1.0):
        body.append(_text(LEFT - 4, y(tick) + 4, f"{tick:.0%}", "end"))
    ends = (
        ((points[0][0], "first"), (points[-1][0], "last"))
        if len(points) > 1
        else ((first, "only"),)
    )
    for label_at, hour in ends:
        stamp = iso(label_at)[5:16].replace("T", " ")
        anchor = {"first": "start", "last": "end"}.get(hour, "middle")
        body.append(_text(x(label_at), HEIGHT - 12, stamp + " UTC", anchor))
    return _svg("agreement-chart", title, body)


def _bin_label(index: int) -> str:
    if index == len(LATENCY_EDGES_MS):
        return f"≥{LATENCY_EDGES_MS[-1]:g}"
    return f"<{LATENCY_EDGES_MS[index]:g}"


def latency_chart(primary: tuple[int, ...], shadow: tuple[int, ...]) -> str:
    """Share of each side's responses per latency bin (ms, log-spaced), side by side."""
    title = "Latency distribution (share of responses per bin, ms)"
    bins = len(LATENCY_EDGES_MS) + 1
    p_total, s_total = sum(primary), sum(shadow)
    if not p_total and not s_total:
        return _svg("latency-chart", title, [_text(WIDTH / 2, HEIGHT / 2, "no responses")])
    p_share = [n / p_total if p_total else 0.0 for n in (primary or (0,) * bins)]
    s_share = [n / s_total if s_total else 0.0 for n in (shadow or (0,) * bins)]
    top = max(*p_share, *s_share) or 1.0
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    slot = plot_w / bins
    bar = slot * 0.4
    body = []
    for i in range(bins):
        for offset, share, color in (
            (0.1, p_share[i], PRIMARY_COLOR),
            (0.5, s_share[i], SHADOW_COLOR),
        ):
            height = share / top * plot_h
            body.append(
                f'<rect x="{LEFT + i * slot + offset * slot:.1f}" y="{TOP + plot_h - height:.1f}" '
                f'width="{bar:.1f}" height="{height:.1f}" fill="{color}">'
                f"<title>{escape(_bin_label(i))} ms: {share:.1%}</title></rect>"
            )
        body.append(_text(LEFT + (i + 0.5) * slot, HEIGHT - 20, _bin_label(i), size=9))
    body += [
        f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{TOP + plot_h}" y2="{TOP + plot_h}" stroke="#888"/>',
        _text(LEFT - 4, TOP + 8, f"{top:.0%}", "end"),
        f'<rect x="{LEFT + 8}" y="{TOP}" width="10" height="10" fill="{PRIMARY_COLOR}"/>',
        _text(LEFT + 22, TOP + 9, "primary", "start"),
        f'<rect x="{LEFT + 80}" y="{TOP}" width="10" height="10" fill="{SHADOW_COLOR}"/>',
        _text(LEFT + 94, TOP + 9, "shadow", "start"),
        _text(WIDTH / 2, HEIGHT - 4, "latency (ms)"),
    ]
    return _svg("latency-chart", title, body)


def confusion_chart(confusion: Confusion) -> str:
    """Cells shaded by share of the primary label's row; the diagonal is agreement."""
    title = "Confusion matrix (rows: primary label, columns: shadow label)"
    n = len(confusion.labels)
    if n == 0:
        return _svg(
            "confusion-chart", title, [_text(WIDTH / 2, 40, "no comparable pairs")], height=80
        )
    cell, margin = 44, 110
    size = margin + n * cell + 8
    body = []
    for r, (label, row) in enumerate(zip(confusion.labels, confusion.matrix, strict=True)):
        total = sum(row) or 1
        body.append(_text(margin - 6, margin + r * cell + cell / 2 + 4, label[:16], "end"))
        for c, count in enumerate(row):
            share = count / total
            color = "#2e8b57" if r == c else "#c0392b"
            body.append(
                f'<rect x="{margin + c * cell}" y="{margin + r * cell}" width="{cell - 2}" '
                f'height="{cell - 2}" fill="{color}" fill-opacity="{0.08 + 0.9 * share:.2f}">'
                f"<title>{escape(label)} → {escape(confusion.labels[c])}: {count}</title></rect>"
            )
            body.append(
                _text(
                    margin + c * cell + cell / 2 - 1, margin + r * cell + cell / 2 + 4, str(count)
                )
            )
    for c, label in enumerate(confusion.labels):
        x = margin + c * cell + cell / 2
        body.append(
            f'<text x="{x:.1f}" y="{margin - 8}" font-size="11" text-anchor="start" '
            f'transform="rotate(-45 {x:.1f} {margin - 8})">{escape(label[:16])}</text>'
        )
    return _svg("confusion-chart", title, body, width=size, height=size)
