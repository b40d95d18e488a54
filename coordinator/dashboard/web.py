"""The coordinator's HTTP app: policy blobs, the public read-only dashboard, its JSON API
under /api/v1 (described at /openapi.json), Prometheus /metrics and /health.

Route handlers that read the store are plain functions, so FastAPI runs them in its thread
pool and the event loop (shared with the gRPC server) never waits on the database. Pages are
Jinja templates with autoescaping on, so node-supplied text always arrives as text; the
Content-Security-Policy allows no inline script as a second line of defence."""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, HTTPException, Query
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from markupsafe import Markup
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry
from sqlalchemy.exc import SQLAlchemyError

from coordinator.blob_http import blob_routes
from coordinator.core import Coordinator
from coordinator.dashboard.charts import Series, line_chart_svg
from coordinator.dashboard.prometheus import metrics_registry, render_metrics
from coordinator.dashboard.views import (
    LAST_STEP,
    MAX_SMOOTHING,
    MAX_TRAINING_POINTS,
    MAX_VERSIONS_PER_PAGE,
    MIN_TRAINING_POINTS,
    NUM_TRAINING_POINTS,
    NUM_VERSIONS_PER_PAGE,
    DashboardData,
    NodeDetailView,
    NodeRow,
    OverviewView,
    TrainingPoint,
    UnknownNodePageError,
    VersionView,
)

PACKAGE_DIR = Path(__file__).parent
MAX_NODE_ID_CHARS = 128
MAX_CONTROL_CHARS = 32  # the longest value the chart controls take
DEFAULT_SMOOTHING = 0.9  # weight on the past: a window of about 10 steps
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def format_time(ms: int) -> str:
    if ms <= 0:
        return "never"
    moment = datetime.datetime.fromtimestamp(ms / 1000, tz=datetime.UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def format_iso(ms: int) -> str:
    return datetime.datetime.fromtimestamp(ms / 1000, tz=datetime.UTC).isoformat(timespec="seconds")


def format_ago(ms: int, now_ms: int) -> str:
    if ms <= 0:
        return "never"
    seconds = max(0, (now_ms - ms) // 1000)
    if seconds < 120:
        return f"{seconds} s ago"
    if seconds < 7200:
        return f"{seconds // 60} min ago"
    if seconds < 172800:
        return f"{seconds // 3600} h ago"
    return f"{seconds // 86400} d ago"


def format_quantity(value: float | None) -> str:
    """1234567 -> '1.23 M'; small values keep three significant digits."""
    if value is None:
        return "–"
    for threshold, suffix in ((1e15, " P"), (1e12, " T"), (1e9, " G"), (1e6, " M"), (1e3, " k")):
        if abs(value) >= threshold:
            return f"{value / threshold:.3g}{suffix}"
    return f"{value:.3g}" if value != int(value) else f"{int(value)}"


def format_bytes(num_bytes: int) -> str:
    for threshold, suffix in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if num_bytes >= threshold:
            return f"{num_bytes / threshold:.2f} {suffix}"
    return f"{num_bytes} B"


def format_percent(fraction: float | None) -> str:
    return "–" if fraction is None else f"{100 * fraction:.1f}%"


def format_number(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


@dataclass(frozen=True)
class ChartRequest:
    """What the overview's chart controls ask for: the steps since..until (None: from the run's
    start, to its end) and the smoothing weight; problems says which inputs were ignored, and why."""

    since: int | None = None
    until: int | None = None
    smoothing: float = DEFAULT_SMOOTHING
    problems: tuple[str, ...] = ()


def parse_step(text: str, name: str) -> int | None:
    """None for an empty field, else the step number it holds; ValueError naming the field."""
    if not text.strip():
        return None
    try:
        step = int(text)
    except ValueError:
        raise ValueError(f"{name} {text!r} is not a whole number") from None
    if not 0 <= step <= LAST_STEP:
        raise ValueError(f"{name} {step} is not a step number (0 or more)")
    return step


def parse_smoothing(text: str) -> float:
    if not text.strip():
        return DEFAULT_SMOOTHING
    try:
        weight = float(text)
    except ValueError:
        raise ValueError(f"smoothing {text!r} is not a number") from None
    if not 0 <= weight <= MAX_SMOOTHING:
        raise ValueError(f"smoothing {text} is not from 0 to {MAX_SMOOTHING}")
    return weight


def chart_request(since: str, until: str, smoothing: str) -> ChartRequest:
    """The controls' values as typed (query parameters); what does not parse is ignored and said."""
    problems = []
    try:
        first, last = parse_step(since, "from step"), parse_step(until, "to step")
        if first is not None and last is not None and last < first:
            raise ValueError(f"to step {last} comes before from step {first}")
    except ValueError as error:
        problems.append(f"{error}: showing the whole run")
        first = last = None
    try:
        weight = parse_smoothing(smoothing)
    except ValueError as error:
        problems.append(f"{error}: smoothing {DEFAULT_SMOOTHING} instead")
        weight = DEFAULT_SMOOTHING
    return ChartRequest(first, last, weight, tuple(problems))


def reward_chart(points: list[TrainingPoint], smoothing: float = 0.0) -> str:
    """The train reward (smoothed when smoothing is not 0) and the held-out reward (never
    smoothed: each point already averages a whole evaluation)."""
    series = [
        Series(
            "reward (train)",
            tuple((p.step, p.reward_mean) for p in points if p.reward_mean is not None),
            "train",
            tuple((p.step, p.reward_mean_smoothed) for p in points if p.reward_mean_smoothed is not None)
            if smoothing
            else (),
        ),
        Series("reward (eval)", tuple((p.step, p.eval_reward) for p in points if p.eval_reward is not None), "eval"),
    ]
    return line_chart_svg(
        [s for s in series if s.points] or series[:1],
        title="Reward over trainer steps",
        x_label="trainer step",
        y_label="mean reward",
        include_y=(0.0, 1.0),
        chart_id="reward-chart",
    )


def throughput_chart(points: list[TrainingPoint], smoothing: float = 0.0) -> str:
    """Tokens per second of the steps that trained (a step skipped for lack of signal has none)."""
    series = Series(
        "trainer tokens/s",
        tuple((p.step, p.tokens_per_second) for p in points if p.tokens_per_second is not None and not p.skipped),
        "tps",
        tuple((p.step, p.tokens_per_second_smoothed) for p in points if p.tokens_per_second_smoothed is not None)
        if smoothing
        else (),
    )
    return line_chart_svg(
        [series],
        title="Trainer throughput",
        x_label="trainer step",
        y_label="tokens/s",
        include_y=(0.0,),
        chart_id="throughput-chart",
    )


def time_unit(span_ms: int) -> tuple[int, str]:
    """Milliseconds per unit and the unit's name, for an axis spanning span_ms."""
    if span_ms < 2 * 60_000:
        return 1000, "seconds"
    if span_ms < 2 * 3_600_000:
        return 60_000, "minutes"
    return 3_600_000, "hours"


def contribution_chart(detail: NodeDetailView) -> str:
    """Cumulative tokens at the end of each bucket, from 0 at registration."""
    if not detail.contribution:
        return line_chart_svg([], title="Contribution over time", x_label="", y_label="", chart_id="contribution-chart")
    origin = detail.registered_ms
    unit_ms, unit = time_unit(detail.contribution[-1].end_ms - origin)
    series = Series(
        "tokens contributed (not voided)",
        ((0.0, 0),) + tuple(((p.end_ms - origin) / unit_ms, p.cumulative_tokens) for p in detail.contribution),
        "contribution",
    )
    return line_chart_svg(
        [series],
        title="Contribution over time",
        x_label=f"{unit} since registration",
        y_label="tokens (cumulative)",
        include_y=(0.0,),
        chart_id="contribution-chart",
    )


def template_environment() -> Environment:
    environment = Environment(
        loader=FileSystemLoader(PACKAGE_DIR / "templates"), autoescape=True, undefined=StrictUndefined
    )
    environment.filters.update(
        time=format_time,
        iso=format_iso,
        quantity=format_quantity,
        bytes=format_bytes,
        percent=format_percent,
        number=format_number,
        pretty_json=lambda value: json.dumps(value, indent=2, sort_keys=True),
    )
    return environment


def create_http_app(app: Coordinator) -> FastAPI:
    data = DashboardData(app)
    templates = template_environment()
    http = FastAPI(
        title="rollproof coordinator",
        summary="Public, read-only view of a rollproof run: overview, leaderboard, nodes, policy versions.",
        version="1",
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    http.router.routes.extend(blob_routes(app.policy.blobs))
    http.mount("/static", StaticFiles(directory=PACKAGE_DIR / "static"), name="static")

    def page(template_name: str, status_code: int = 200, **context: Any) -> HTMLResponse:
        overview = data.overview()
        html = templates.get_template(template_name).render(
            run=overview.run, overview=overview, now_ms=overview.updated_ms, ago=format_ago, **context
        )
        return HTMLResponse(html, status_code=status_code, headers=SECURITY_HEADERS)

    _add_api_routes(http, data)
    _add_operation_routes(http, app, metrics_registry(app))
    _add_page_routes(http, data, page)
    return http


def _find_node(data: DashboardData, node_id: str) -> NodeDetailView:
    if len(node_id) > MAX_NODE_ID_CHARS:
        raise HTTPException(404, "no such node")
    try:
        return data.node(node_id)
    except UnknownNodePageError as error:
        raise HTTPException(404, str(error)) from None


def _add_api_routes(http: FastAPI, data: DashboardData) -> None:
    @http.get("/api/v1/overview", response_model=OverviewView, tags=["api"])
    def api_overview() -> OverviewView:
        """Run, trainer step, policy version, node and rollout counts, throughput, latest reward."""
        return data.overview()

    @http.get("/api/v1/training", response_model=list[TrainingPoint], tags=["api"])
    def api_training(
        since: Annotated[int, Query(ge=0, description="first step")] = 0,
        until: Annotated[int, Query(ge=0, le=LAST_STEP, description="last step")] = LAST_STEP,
        points: Annotated[
            int, Query(ge=MIN_TRAINING_POINTS, le=MAX_TRAINING_POINTS, description="at most this many steps")
        ] = NUM_TRAINING_POINTS,
        smoothing: Annotated[
            float, Query(ge=0, le=MAX_SMOOTHING, description="weight of the past in the *_smoothed values")
        ] = 0.0,
    ) -> list[TrainingPoint]:
        """The trainer's per-step metrics (the reward curve) from step `since` to `until`, oldest
        first; over more steps than `points`, the ones holding each stretch's lowest and highest
        rewards. The *_smoothed values are an exponential moving average (as TensorBoard's) over
        the steps from `since`."""
        return data.training(since=since, until=until, num_points=points, smoothing=smoothing)

    @http.get("/api/v1/nodes", response_model=list[NodeRow], tags=["api"])
    def api_nodes() -> list[NodeRow]:
        """The leaderboard: nodes ranked by verified (settled) contribution."""
        return data.leaderboard()

    @http.get("/api/v1/nodes/{node_id}", response_model=NodeDetailView, tags=["api"])
    def api_node(node_id: str) -> NodeDetailView:
        """One node: submissions, rejections with evidence, contribution over time, credit."""
        return _find_node(data, node_id)

    @http.get("/api/v1/versions", response_model=list[VersionView], tags=["api"])
    def api_versions(
        before: Annotated[int | None, Query(ge=1, le=LAST_STEP, description="only versions below this one")] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_VERSIONS_PER_PAGE, description="at most this many")] = (
            NUM_VERSIONS_PER_PAGE
        ),
    ) -> list[VersionView]:
        """Published policy versions, newest first, with update sizes and holders; for the page
        after this one, pass the last version listed as `before`."""
        return data.versions(before=before, limit=limit).versions


def _add_operation_routes(http: FastAPI, app: Coordinator, registry: CollectorRegistry) -> None:
    @http.get("/metrics", tags=["operations"], response_class=Response)
    def metrics() -> Response:
        """Prometheus text exposition of the run's counters."""
        return Response(render_metrics(registry), media_type=CONTENT_TYPE_LATEST)

    @http.get("/health", tags=["operations"])
    def health() -> JSONResponse:
        """200 when the store answers."""
        try:
            version = app.latest_policy_version()
        except SQLAlchemyError as error:
            return JSONResponse({"status": "unavailable", "error": type(error).__name__}, status_code=503)
        return JSONResponse({"status": "ok", "store": app.store.backend, "latest_policy_version": version})


def _add_page_routes(http: FastAPI, data: DashboardData, page: Callable[..., HTMLResponse]) -> None:
    @http.get("/", response_class=HTMLResponse, include_in_schema=False)
    def overview_page(
        since: Annotated[str, Query(max_length=MAX_CONTROL_CHARS)] = "",
        until: Annotated[str, Query(max_length=MAX_CONTROL_CHARS)] = "",
        smoothing: Annotated[str, Query(max_length=MAX_CONTROL_CHARS)] = "",
    ) -> HTMLResponse:
        chart = chart_request(since, until, smoothing)
        points = data.training(
            since=chart.since or 0,
            until=LAST_STEP if chart.until is None else chart.until,
            smoothing=chart.smoothing,
        )
        return page(
            "overview.html",
            chart=chart,
            reward_svg=Markup(reward_chart(points, chart.smoothing)),
            throughput_svg=Markup(throughput_chart(points, chart.smoothing)),
            nodes=data.leaderboard()[:5],
        )

    @http.get("/leaderboard", response_class=HTMLResponse, include_in_schema=False)
    def leaderboard_page() -> HTMLResponse:
        return page("leaderboard.html", nodes=data.leaderboard())

    @http.get("/nodes/{node_id}", response_class=HTMLResponse, include_in_schema=False)
    def node_page(node_id: str) -> HTMLResponse:
        try:
            detail = _find_node(data, node_id)
        except HTTPException:
            return page("not_found.html", status_code=404, what="node", missing=node_id[:MAX_NODE_ID_CHARS])
        return page("node.html", detail=detail, contribution_svg=Markup(contribution_chart(detail)))

    @http.get("/versions", response_class=HTMLResponse, include_in_schema=False)
    def versions_page(
        before: Annotated[int | None, Query(ge=1, le=LAST_STEP)] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_VERSIONS_PER_PAGE)] = NUM_VERSIONS_PER_PAGE,
    ) -> HTMLResponse:
        return page("versions.html", versions_page=data.versions(before=before, limit=limit), limit=limit)
