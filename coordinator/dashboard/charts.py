"""Line charts drawn as inline SVG by the project itself: no library, nothing fetched by the
browser. Every text that ends up in the SVG is escaped here. Each chart carries its x domain and
plot area in data attributes, for static/charts.js to turn a drag across it into a step range."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from html import escape

WIDTH = 640
HEIGHT = 260
MARGIN_LEFT = 64
MARGIN_RIGHT = 16
MARGIN_TOP = 28
MARGIN_BOTTOM = 40
NUM_TICKS = 5


@dataclass(frozen=True)
class Series:
    """One line of a chart; css_class picks its colour in the stylesheet. With smoothed points
    the points are drawn faint and the smoothed ones as the line."""

    name: str
    points: tuple[tuple[float, float], ...]
    css_class: str
    smoothed: tuple[tuple[float, float], ...] = ()


def nice_step(span: float, num_ticks: int) -> float:
    """The tick spacing of 1, 2 or 5 times a power of ten that cuts span into at most about num_ticks steps."""
    if span <= 0 or not math.isfinite(span):
        return 1.0
    raw = span / max(num_ticks, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    for factor in (1, 2, 5, 10):
        if factor * magnitude >= raw:
            return factor * magnitude
    raise AssertionError("unreachable: factor 10 always covers raw")


def nice_ticks(low: float, high: float, num_ticks: int = NUM_TICKS) -> list[float]:
    """Round tick values covering [low, high]; a single value gets a unit range around it
    (from 0 to 1 for a single 0)."""
    if high < low:
        raise ValueError(f"need low <= high, got {low} > {high}")
    if high == low:
        low, high = (low - 0.5, high + 0.5) if low else (0.0, 1.0)
    step = nice_step(high - low, num_ticks)
    first = math.floor(low / step)
    last = math.ceil(high / step)
    return [round(index * step, 12) for index in range(first, last + 1)]


def scale(value: float, domain: tuple[float, float], extent: tuple[float, float]) -> float:
    """Map value linearly from domain onto extent."""
    (d0, d1), (e0, e1) = domain, extent
    if d1 == d0:
        return (e0 + e1) / 2
    return e0 + (value - d0) * (e1 - e0) / (d1 - d0)


def format_tick(value: float) -> str:
    if value == int(value) and abs(value) < 1e15:
        return f"{int(value):,}"
    return f"{value:.6g}"


def polyline(coordinates: Sequence[tuple[float, float]], css_class: str) -> str:
    path = " ".join(f"{x:.1f},{y:.1f}" for x, y in coordinates)
    return f'<polyline class="{css_class}" fill="none" points="{path}"/>'


def line_chart_svg(
    series: Sequence[Series],
    *,
    title: str,
    x_label: str,
    y_label: str,
    format_x: Callable[[float], str] = format_tick,
    format_y: Callable[[float], str] = format_tick,
    include_y: Sequence[float] = (),
    chart_id: str = "",
) -> str:
    """An SVG line chart with axes, ticks, a legend and one circle (class "point") per data
    point, each with a <title> tooltip; the y axis covers the data and the values of include_y
    (say 0, or a reward's full range). A series with smoothed values adds a polyline of class
    "smoothed" over its faint "raw" one. With no points it says so instead."""
    points = [point for line in series for point in line.points + line.smoothed]
    id_attribute = f' id="{escape(chart_id)}"' if chart_id else ""
    opening = (
        f'<svg{id_attribute} class="chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'role="img" aria-label="{escape(title)}"'
    )
    if not points:
        return (
            f"{opening}><title>{escape(title)}</title>"
            f'<text class="empty" x="{WIDTH / 2}" y="{HEIGHT / 2}" text-anchor="middle">no data yet</text></svg>'
        )
    x_ticks = nice_ticks(min(x for x, _ in points), max(x for x, _ in points))
    y_values = [y for _, y in points] + list(include_y)
    y_ticks = nice_ticks(min(y_values), max(y_values))
    x_domain, y_domain = (x_ticks[0], x_ticks[-1]), (y_ticks[0], y_ticks[-1])
    x_extent = (MARGIN_LEFT, WIDTH - MARGIN_RIGHT)
    y_extent = (HEIGHT - MARGIN_BOTTOM, MARGIN_TOP)
    bottom, top = y_extent
    parts = [
        f'{opening} data-x-domain="{x_domain[0]!r} {x_domain[1]!r}" '
        f'data-plot="{x_extent[0]} {x_extent[1]} {top} {bottom}">',
        f"<title>{escape(title)}</title>",
    ]

    parts.append('<g class="grid">')
    for tick in y_ticks:
        y = scale(tick, y_domain, y_extent)
        parts.append(f'<line x1="{MARGIN_LEFT}" x2="{WIDTH - MARGIN_RIGHT}" y1="{y:.1f}" y2="{y:.1f}"/>')
        label = escape(format_y(tick))
        parts.append(f'<text class="tick" x="{MARGIN_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{label}</text>')
    for tick in x_ticks:
        x = scale(tick, x_domain, x_extent)
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{bottom}"/>')
        parts.append(
            f'<text class="tick" x="{x:.1f}" y="{bottom + 16}" text-anchor="middle">{escape(format_x(tick))}</text>'
        )
    parts.append("</g>")
    parts.append(
        f'<text class="axis-label" x="{(x_extent[0] + x_extent[1]) / 2}" y="{HEIGHT - 6}" '
        f'text-anchor="middle">{escape(x_label)}</text>'
    )
    parts.append(
        f'<text class="axis-label" x="14" y="{(top + bottom) / 2}" text-anchor="middle" '
        f'transform="rotate(-90 14 {(top + bottom) / 2})">{escape(y_label)}</text>'
    )
    legend_x = MARGIN_LEFT
    for line in series:
        css_class = escape(line.css_class)
        coordinates = [(scale(x, x_domain, x_extent), scale(y, y_domain, y_extent)) for x, y in line.points]
        smoothed_class = " has-smoothed" if line.smoothed else ""
        parts.append(f'<g class="series {css_class}{smoothed_class}">')
        if len(coordinates) > 1:
            parts.append(polyline(coordinates, "raw" if line.smoothed else "line"))
        if len(line.smoothed) > 1:
            smoothed = [(scale(x, x_domain, x_extent), scale(y, y_domain, y_extent)) for x, y in line.smoothed]
            parts.append(polyline(smoothed, "smoothed"))
        for (x, y), (raw_x, raw_y) in zip(coordinates, line.points, strict=True):
            tooltip = f"{line.name}: {format_y(raw_y)} at {format_x(raw_x)}"
            parts.append(
                f'<circle class="point" cx="{x:.1f}" cy="{y:.1f}" r="3" data-x="{raw_x!r}" data-y="{raw_y!r}">'
                f"<title>{escape(tooltip)}</title></circle>"
            )
        parts.append(f'<rect x="{legend_x}" y="8" width="10" height="10"/>')
        parts.append(f'<text class="legend" x="{legend_x + 14}" y="17">{escape(line.name)}</text>')
        parts.append("</g>")
        legend_x += 24 + 7 * len(line.name)
    parts.append("</svg>")
    return "".join(parts)
