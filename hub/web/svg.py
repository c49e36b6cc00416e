"""Server-rendered SVG charts: a time-series line chart, a histogram with a threshold, and a
reference-versus-current distribution. No chart library, no script: the browser draws them as
they arrive, each point and bar carries a <title> for its tooltip, and text is escaped.

Colours come from presentation attributes (allowed by the dashboard's
Content-Security-Policy, which forbids inline styles); fonts and sizes from style.css.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from markupsafe import Markup, escape

# series colours: none of them red, which means "anomaly" on every page
PALETTE = ("#2459c4", "#1f8a4c", "#a86400", "#7b3fb5", "#0e8a8a", "#55606e", "#3a8fd6", "#8c5a2b",
           "#6b7d1a", "#4b3fa8")
OK_COLOUR, ANOMALY_COLOUR, THRESHOLD_COLOUR = "#9fb3d9", "#c0362c", "#1d2430"
REFERENCE_COLOUR, CURRENT_COLOUR = "#b9c1cf", "#2459c4"

M_LEFT, M_RIGHT, M_TOP, M_BOTTOM = 52, 16, 14, 34


@dataclass(frozen=True, slots=True)
class Box:
    """A chart's viewBox; the CSS scales it to the page, so text is sized for the usual width."""

    w: int
    h: int

    @property
    def plot_w(self) -> int:
        return self.w - M_LEFT - M_RIGHT

    @property
    def plot_h(self) -> int:
        return self.h - M_TOP - M_BOTTOM


WIDE = Box(1100, 300)  # a chart across the page
SMALL = Box(520, 240)  # one of a grid of charts


@dataclass(frozen=True, slots=True)
class Line:
    label: str
    points: Sequence[tuple[datetime, float, str]]  # (time, value, tooltip)
    rank: int = 0  # picks its colour: give a thing the same rank on every chart and it keeps its colour

    @property
    def colour(self) -> str:
        return PALETTE[self.rank % len(PALETTE)]


def _fmt(value: float) -> str:
    return f"{value:.1f}".rstrip("0").rstrip(".") if abs(value) < 1e6 else f"{value:.3g}"


def _nice_step(span: float, ticks: int = 5) -> float:
    raw = span / max(ticks, 1)
    magnitude = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1
    for mult in (1, 2, 2.5, 5, 10):
        if raw <= mult * magnitude:
            return mult * magnitude
    return 10 * magnitude


def _svg(box: Box, body: list[str], label: str, cls: str) -> Markup:
    head = (
        f'<svg class="chart {escape(cls)}" viewBox="0 0 {box.w} {box.h}" role="img" '
        f'aria-label="{escape(label)}">'
    )
    return Markup(head + "".join(body) + "</svg>")


def _y_axis(
    box: Box, y_max: float, fmt: str, y: Callable[[float], float], whole: bool = False
) -> list[str]:
    """Grid lines and labels from 0 to y_max; `whole`: counts, so steps of at least 1."""
    out = []
    step = _nice_step(y_max)
    if whole:
        step = max(1.0, math.ceil(step))
    value = 0.0
    while value <= y_max * 1.0001:
        py = y(value)
        out.append(
            f'<line class="grid" x1="{M_LEFT}" x2="{box.w - M_RIGHT}" y1="{py:.1f}" y2="{py:.1f}"/>'
            f'<text class="tick" x="{M_LEFT - 6}" y="{py + 4:.1f}" text-anchor="end">'
            f"{escape(fmt.format(value))}</text>"
        )
        value += step
    return out


def line_chart(
    lines: Sequence[Line],
    start: datetime,
    end: datetime,
    *,
    y_label: str,
    percent: bool = False,
    box: Box = WIDE,
) -> Markup:
    """Lines over time from `start` to `end`; y from 0 to the largest value (or 100 % scale)."""
    t0, t1 = start.timestamp(), end.timestamp()
    values = [v for line in lines for _, v, _ in line.points]
    y_max = max(values, default=0.0)
    y_max = (min(1.0, max(0.05, y_max * 1.15)) if percent else max(1.0, y_max * 1.1)) or 1.0
    plot_w, plot_h = box.plot_w, box.plot_h

    def x(t: float) -> float:
        return M_LEFT + (t - t0) / max(t1 - t0, 1) * plot_w

    def y(v: float) -> float:
        return M_TOP + plot_h - v / y_max * plot_h

    body = _y_axis(box, y_max, "{:.0%}" if percent else "{:g}", y)
    span = t1 - t0
    fmt = "%H:%M" if span <= 2 * 86400 else "%d %b"
    for i in range(7):
        t = t0 + span * i / 6
        body.append(
            f'<text class="tick" x="{x(t):.1f}" y="{box.h - M_BOTTOM + 16}" text-anchor="middle">'
            f"{datetime.fromtimestamp(t, UTC).strftime(fmt)}</text>"
        )
    body.append(
        f'<text class="axis" x="12" y="{M_TOP + plot_h / 2:.0f}" '
        f'transform="rotate(-90 12 {M_TOP + plot_h / 2:.0f})" text-anchor="middle">'
        f"{escape(y_label)}</text>"
    )
    for line in lines:
        colour = line.colour
        pts = [(x(t.timestamp()), y(v), tip) for t, v, tip in line.points]
        if len(pts) > 1:
            path = " ".join(f"{'M' if j == 0 else 'L'}{px:.1f},{py:.1f}" for j, (px, py, _) in enumerate(pts))
            body.append(f'<path class="series" d="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        for px, py, tip in pts:
            body.append(
                f'<circle cx="{px:.1f}" cy="{py:.1f}" r="3" fill="{colour}">'
                f"<title>{escape(line.label)}: {escape(tip)}</title></circle>"
            )
    if not lines:
        body.append(
            f'<text class="empty" x="{box.w / 2}" y="{box.h / 2}" text-anchor="middle">'
            "no results in this window</text>"
        )
    return _svg(box, body, y_label, "lines")


def legend(lines: Sequence[Line]) -> Markup:
    """An HTML legend matching `line_chart`'s colours."""
    items = "".join(
        f'<li><svg width="14" height="14" aria-hidden="true"><rect width="14" height="14" rx="3" '
        f'fill="{line.colour}"/></svg>{escape(line.label)}</li>'
        for line in lines
    )
    return Markup(f'<ul class="legend">{items}</ul>')


def _x_ticks(box: Box, lo: float, hi: float, x: Callable[[float], float]) -> list[str]:
    out = []
    step = _nice_step(hi - lo, 6)
    value = math.ceil(lo / step) * step
    while value <= hi:
        out.append(
            f'<text class="tick" x="{x(value):.1f}" y="{box.h - M_BOTTOM + 16}" text-anchor="middle">'
            f"{_fmt(value)}</text>"
        )
        value += step
    return out


def histogram(
    lo: float, width: float, ok: Sequence[int], anomaly: Sequence[int], threshold: float | None, *, label: str
) -> Markup:
    """Stacked bars per score bin (ok below, anomaly above) and the threshold as a line."""
    box = SMALL
    bins = len(ok)
    hi = lo + width * bins
    y_max = max((a + b for a, b in zip(ok, anomaly, strict=True)), default=0) * 1.1 or 1
    plot_w, plot_h = box.plot_w, box.plot_h

    def x(v: float) -> float:
        return M_LEFT + (v - lo) / (hi - lo) * plot_w

    def y(v: float) -> float:
        return M_TOP + plot_h - v / y_max * plot_h

    body = _y_axis(box, y_max, "{:.0f}", y, whole=True) + _x_ticks(box, lo, hi, x)
    bar_w = plot_w / bins
    for i, (n_ok, n_bad) in enumerate(zip(ok, anomaly, strict=True)):
        left, right = lo + i * width, lo + (i + 1) * width
        px = M_LEFT + i * bar_w + 0.5
        tip = f"score {_fmt(left)}-{_fmt(right)}: {n_ok} ok, {n_bad} anomaly"
        if n_ok:
            body.append(
                f'<rect class="bar ok" x="{px:.1f}" y="{y(n_ok):.1f}" width="{bar_w - 1:.1f}" '
                f'height="{y(0) - y(n_ok):.1f}" fill="{OK_COLOUR}"><title>{escape(tip)}</title></rect>'
            )
        if n_bad:
            body.append(
                f'<rect class="bar anomaly" x="{px:.1f}" y="{y(n_ok + n_bad):.1f}" width="{bar_w - 1:.1f}" '
                f'height="{y(n_ok) - y(n_ok + n_bad):.1f}" fill="{ANOMALY_COLOUR}"><title>{escape(tip)}</title></rect>'
            )
    if threshold is not None and lo <= threshold <= hi:
        tx = x(threshold)
        body.append(
            f'<line class="threshold" x1="{tx:.1f}" x2="{tx:.1f}" y1="{M_TOP}" y2="{M_TOP + plot_h}" '
            f'stroke="{THRESHOLD_COLOUR}" stroke-width="2" stroke-dasharray="6 4"/>'
            f'<text class="marker" x="{tx + 5:.1f}" y="{M_TOP + 12}">threshold {_fmt(threshold)}</text>'
        )
    body.append(f'<text class="axis" x="{box.w - M_RIGHT}" y="{box.h - 4}" text-anchor="end">raw score</text>')
    return _svg(box, body, label, "histogram")


def distributions(
    lo: float, width: float, reference: Sequence[int], current: Sequence[int], *, label: str
) -> Markup:
    """Two score distributions as shares of their totals: the reference filled, the current as a line."""
    box = SMALL
    bins = len(reference)
    hi = lo + width * bins
    n_ref, n_cur = sum(reference) or 1, sum(current) or 1
    ref = [r / n_ref for r in reference]
    cur = [c / n_cur for c in current]
    y_max = max([*ref, *cur, 0.01]) * 1.15
    plot_w, plot_h = box.plot_w, box.plot_h

    def x(v: float) -> float:
        return M_LEFT + (v - lo) / (hi - lo) * plot_w

    def y(v: float) -> float:
        return M_TOP + plot_h - v / y_max * plot_h

    body = _y_axis(box, y_max, "{:.0%}", y) + _x_ticks(box, lo, hi, x)
    step_w = plot_w / bins
    area = [f"M{M_LEFT},{y(0):.1f}"]
    for i, share in enumerate(ref):
        area.append(f"L{M_LEFT + i * step_w:.1f},{y(share):.1f} L{M_LEFT + (i + 1) * step_w:.1f},{y(share):.1f}")
    area.append(f"L{M_LEFT + plot_w:.1f},{y(0):.1f} Z")
    body.append(
        f'<path class="reference" d="{" ".join(area)}" fill="{REFERENCE_COLOUR}" fill-opacity="0.7">'
        f"<title>reference: {sum(reference)} results</title></path>"
    )
    line = " ".join(
        f"{'M' if i == 0 else 'L'}{M_LEFT + i * step_w:.1f},{y(share):.1f} "
        f"L{M_LEFT + (i + 1) * step_w:.1f},{y(share):.1f}"
        for i, share in enumerate(cur)
    )
    body.append(
        f'<path class="current" d="{line}" fill="none" stroke="{CURRENT_COLOUR}" stroke-width="2">'
        f"<title>this window: {sum(current)} results</title></path>"
    )
    body.append(f'<text class="axis" x="{box.w - M_RIGHT}" y="{box.h - 4}" text-anchor="end">raw score</text>')
    return _svg(box, body, label, "distributions")
