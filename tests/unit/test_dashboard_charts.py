"""The dashboard's SVG charts: tick choice, scaling, escaping, smoothing."""

import math
import random
import xml.etree.ElementTree as ElementTree

import pytest

from coordinator.dashboard.charts import Series, line_chart_svg, nice_step, nice_ticks, scale
from coordinator.dashboard.views import smooth_ema, smooth_present

SVG = "{http://www.w3.org/2000/svg}"


def naive_nice_step(span: float, num_ticks: int) -> float:
    """The smallest of 1, 2, 5 x 10^k (k from -12 to 12) at least span / num_ticks."""
    candidates = sorted(f * 10.0**k for k in range(-12, 13) for f in (1, 2, 5))
    return next(c for c in candidates if c >= span / num_ticks * (1 - 1e-12))


@pytest.mark.parametrize("span", [0.003, 0.7, 1.0, 3.3, 10.0, 47.0, 999.0, 12345.0, 2.5e9])
def test_nice_step_matches_the_naive_search(span):
    assert math.isclose(nice_step(span, 5), naive_nice_step(span, 5), rel_tol=1e-9)


def test_nice_ticks_cover_the_range_with_round_values():
    assert nice_ticks(0.0, 1.0) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert nice_ticks(3.0, 47.0) == [0.0, 10.0, 20.0, 30.0, 40.0, 50.0]
    assert nice_ticks(2.0, 2.0) == [1.4, 1.6, 1.8, 2.0, 2.2, 2.4, 2.6]
    assert nice_ticks(0.0, 0.0) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    with pytest.raises(ValueError):
        nice_ticks(1.0, 0.0)


def test_scale_maps_linearly_and_flips_for_the_y_axis():
    assert scale(5.0, (0.0, 10.0), (100.0, 200.0)) == 150.0
    assert scale(0.0, (0.0, 10.0), (220.0, 20.0)) == 220.0
    assert scale(3.0, (3.0, 3.0), (0.0, 10.0)) == 5.0


def test_chart_has_one_point_per_value_and_escapes_text():
    svg = line_chart_svg(
        [Series("<b>reward</b>", ((1, 0.1), (2, 0.4), (3, 0.3)), "train"), Series("eval", ((2, 0.2),), "eval")],
        title='reward "&" <script>',
        x_label="step <x>",
        y_label="y",
        chart_id="reward-chart",
    )
    root = ElementTree.fromstring(svg)
    assert root.get("id") == "reward-chart"
    assert len(root.findall(f".//{SVG}circle[@class='point']")) == 4
    assert root.find(f"{SVG}title").text == 'reward "&" <script>'
    assert "<script>" not in svg and "<b>" not in svg
    assert len(root.findall(f".//{SVG}polyline")) == 1, "a single point draws no line"


def test_include_y_widens_the_y_axis():
    root = ElementTree.fromstring(
        line_chart_svg(
            [Series("r", ((1, 0.2), (2, 0.3)), "train")], title="t", x_label="x", y_label="y", include_y=(0.0, 1.0)
        )
    )
    labels = [text.text for text in root.findall(f".//{SVG}text[@class='tick']")]
    assert labels[0] == "0" and "1" in labels


def test_empty_chart_says_so():
    root = ElementTree.fromstring(line_chart_svg([], title="t", x_label="x", y_label="y"))
    assert root.find(f"{SVG}text").text == "no data yet"


def naive_smooth(values: list[float], weight: float) -> list[float]:
    """Each smoothed value as its explicit weighted mean: value j of the first i + 1 weighs
    weight ** (i - j), the weights normalised to sum to 1."""
    smoothed = []
    for i in range(len(values)):
        weights = [weight ** (i - j) for j in range(i + 1)]
        smoothed.append(sum(w * v for w, v in zip(weights, values[: i + 1], strict=True)) / sum(weights))
    return smoothed


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("weight", [0.0, 0.3, 0.6, 0.9, 0.99])
def test_smoothing_matches_the_explicit_weighted_mean(seed, weight):
    rng = random.Random(seed)
    values = [rng.uniform(-1, 2) for _ in range(rng.randrange(1, 300))]
    assert smooth_ema(values, weight) == pytest.approx(naive_smooth(values, weight), rel=1e-9, abs=1e-12)


def test_smoothing_keeps_a_constant_and_without_weight_the_values():
    assert smooth_ema([0.25] * 50, 0.9) == pytest.approx([0.25] * 50)
    assert smooth_ema([3.0, -1.0, 7.5], 0.0) == [3.0, -1.0, 7.5]
    assert smooth_ema([], 0.5) == []
    assert smooth_present([None, 1.0, None, 3.0], 0.5) == [None, 1.0, None, pytest.approx(7 / 3)]
    for weight in (-0.1, 1.0, float("nan")):
        with pytest.raises(ValueError, match="smoothing weight"):
            smooth_ema([1.0], weight)


def test_a_smoothed_series_draws_its_points_faint_under_the_smoothed_line():
    points = ((0, 0.0), (1, 1.0), (2, 0.0), (3, 1.0))
    root = ElementTree.fromstring(
        line_chart_svg(
            [Series("r", points, "train", ((0, 0.0), (2, 0.5), (3, 1.2)))],
            title="t",
            x_label="x",
            y_label="y",
            chart_id="c",
        )
    )
    assert [line.get("class") for line in root.findall(f".//{SVG}polyline")] == ["raw", "smoothed"]
    assert len(root.findall(f".//{SVG}circle[@class='point']")) == 4, "points only for the raw values"
    raw, smoothed = (line.get("points").split() for line in root.findall(f".//{SVG}polyline"))
    assert len(raw) == 4 and len(smoothed) == 3 and smoothed[0] == raw[0] and smoothed[1] != raw[2]
    assert root.get("data-x-domain") == "0.0 3.0" and root.get("data-plot") == "64 624 28 220"
    labels = [text.text for text in root.findall(f".//{SVG}text[@class='tick']")]
    assert labels[:4] == ["0", "0.5", "1", "1.5"], "the y axis covers the smoothed values too"
