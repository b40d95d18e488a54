"""The dashboard in a real browser (issues 8 and 21). One test runs a coordinator, a trainer and
two nodes as processes; headless Chromium (Debian's, driven by Playwright) finds the nodes on the
leaderboard, the reward chart's points and a node's rejection reason, and saves screenshots
under artifacts/ (slow: about a minute on two busy cores, mostly process start-up). The other
serves the dashboard of a store holding 2,400 trainer steps and checks, in the browser, that the
reward chart starts at step 0 and that zooming and smoothing change what it draws."""

import asyncio
import contextlib
import dataclasses
import json
import math
import random
import socket
import sqlite3
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from coordinator.dashboard.web import create_http_app
from envs import get_task
from node.client import CoordinatorClient
from node.generate import generate_batch
from protocol import convert
from protocol.identity import Identity
from protocol.proto import service_pb2
from tests.integration.cluster import OPERATOR_TOKEN, Cluster, wait_for
from tests.unit import conftest as unit_fixtures

make_coordinator = unit_fixtures.make_coordinator  # a Coordinator over a SQLite store, no processes

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"
SCRIPT_NAME = "<script>alert(1)</script>"
CHEATER_NAME = "reward-inflater"
COORDINATOR_FLAGS = [
    "--set",
    "run.group_size=4",
    "--set",
    "run.prompts_per_lease=2",
    "--set",
    "run.sampling.max_tokens=8",
    "--set",
    "heartbeat_interval_s=1",
]
TRAINER_FLAGS = ["--set", "groups_per_step=2", "--set", "eval_every=2", "--set", "eval_problems=4"]
NUM_TRAINER_STEPS = 4


def count(cluster: Cluster, sql: str) -> int:
    connection = sqlite3.connect(cluster.coordinator_dir / "coordinator.sqlite3", timeout=30)
    try:
        return connection.execute(sql).fetchone()[0]
    finally:
        connection.close()


def submit_inflated_reward(cluster: Cluster, model_dir: Path) -> str:
    """A test client registers, generates an honest batch, claims a wrong reward for one
    rollout and submits it; returns its node id."""
    from policy.engine import TorchEngine
    from policy.model import load_model
    from policy.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    engine = TorchEngine(load_model(model_dir), stop_token_ids={tokenizer.eos_token_id})

    async def scenario() -> str:
        client = CoordinatorClient(cluster.address, Identity.generate(), tls=cluster.coordinator_tls)
        try:
            run_info = await client.run_info()
            registered = await client.register(service_pb2.RegisterRequest(display_name=CHEATER_NAME, engine="torch"))
            lease = convert.lease_from_proto((await client.lease(run_info.latest_policy_version)).lease)
            batch = generate_batch(engine, tokenizer, get_task(run_info.task), run_info.run_seed, lease, "torch").batch
            group = batch.groups[0]
            inflated = dataclasses.replace(group.rollouts[0], claimed_reward=1.0 - group.rollouts[0].claimed_reward)
            tampered = dataclasses.replace(
                batch, groups=(dataclasses.replace(group, rollouts=(inflated, *group.rollouts[1:])), *batch.groups[1:])
            )
            receipt = await client.submit(convert.batch_to_proto(tampered).SerializeToString())
            assert receipt.num_rejected > 0
            return registered.node_id
        finally:
            await client.close()

    return asyncio.run(scenario())


def scraped_metrics(dashboard: str) -> dict[str, float]:
    with urllib.request.urlopen(f"{dashboard}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if not sample.labels
    }


@pytest.fixture
def playwright_api():
    """Playwright's sync API, or a skip when it or Chromium is missing. Start it only after
    any asyncio.run: it keeps an event loop running in this thread."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM}: install Debian's chromium (`apt-get install chromium`)")
    return sync_api


def test_dashboard_in_a_browser(tmp_path, tiny_model, playwright_api):
    trainer_identity = Identity.generate()
    (tmp_path / "trainer").mkdir()
    trainer_identity.save(tmp_path / "trainer" / "trainer.key")
    cluster = Cluster(tmp_path, tiny_model, trainer_identity)
    try:
        cluster.publish_fixed_policy()
        cluster.start_coordinator(*COORDINATOR_FLAGS)
        cheater_id = submit_inflated_reward(cluster, tiny_model)
        cluster.spawn(
            "trainer",
            [
                "trainer",
                "run",
                "--coordinator",
                cluster.address,
                "--model",
                str(tiny_model),
                "--data-dir",
                str(tmp_path / "trainer"),
                *TRAINER_FLAGS,
            ],
        )
        cluster.start_node("node-1", "--batch-size", "8")
        cluster.start_node("node-2", "--batch-size", "8", "--name", SCRIPT_NAME)
        wait_for(
            lambda: count(cluster, "SELECT COUNT(*) FROM trainer_metrics") >= NUM_TRAINER_STEPS,
            300,
            f"{NUM_TRAINER_STEPS} trainer steps",
        )
        wait_for(
            lambda: count(cluster, "SELECT COUNT(*) FROM nodes WHERE num_rollouts_accepted > 0") >= 2,
            120,
            "both nodes to have rollouts accepted",
        )
        ARTIFACTS.mkdir(exist_ok=True)
        dashboard = cluster.http_address()
        metrics = scraped_metrics(dashboard)
        assert metrics["rollproof_rollouts_accepted_total"] > 0 and metrics["rollproof_rollouts_rejected_total"] > 0
        assert metrics["rollproof_trainer_step"] >= NUM_TRAINER_STEPS and metrics["rollproof_nodes_online"] >= 2
        assert metrics["rollproof_validations_failed_total"] >= 0
        with playwright_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox", "--disable-background-networking"]
            )
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            dialogs: list[str] = []
            page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
            external: list[str] = []
            page.on(
                "request", lambda request: None if request.url.startswith(dashboard) else external.append(request.url)
            )

            page.goto(f"{dashboard}/leaderboard")
            rows = page.locator("table.leaderboard tbody tr")
            links = rows.locator("td:nth-child(2) a").all_inner_texts()
            names = [link.rsplit(" …", 1)[0] for link in links]  # each name is followed by its id's end
            assert {"node-1", SCRIPT_NAME, CHEATER_NAME} <= set(names) and all(" …" in link for link in links), links
            assert page.locator("table.leaderboard script").count() == 0
            page.screenshot(path=str(ARTIFACTS / "dashboard-leaderboard.png"), full_page=True)

            page.goto(dashboard)
            points = page.locator("#reward-chart circle.point")
            assert points.count() >= NUM_TRAINER_STEPS
            page.wait_for_function("() => document.body.dataset.refreshed !== undefined", timeout=20_000)
            assert page.evaluate("() => document.body.dataset.refreshError") is None
            assert page.locator("#reward-chart circle.point").count() >= NUM_TRAINER_STEPS, (
                "the chart survives a refresh"
            )
            assert int(page.locator("[data-field=trainer_step]").inner_text()) >= NUM_TRAINER_STEPS
            page.screenshot(path=str(ARTIFACTS / "dashboard-overview.png"), full_page=True)

            page.get_by_role("link", name=CHEATER_NAME).click()
            page.wait_for_url(f"**/nodes/{cheater_id}")
            reasons = page.locator("table.rejections .reason").all_inner_texts()
            assert "reward_mismatch" in reasons, reasons
            assert "verifier gives" in " ".join(page.locator("table.rejections .message").all_inner_texts())
            page.screenshot(path=str(ARTIFACTS / "dashboard-node-rejections.png"), full_page=True)

            page.goto(dashboard + "/leaderboard")
            page.get_by_role("link", name="node-1").click()
            assert page.locator("#contribution-chart circle.point").count() >= 1
            page.screenshot(path=str(ARTIFACTS / "dashboard-node.png"), full_page=True)

            assert OPERATOR_TOKEN not in page.content()
            assert dialogs == [], "a node-supplied string ran as script"
            assert external == [], f"the dashboard fetched from outside: {external}"
            browser.close()
    finally:
        cluster.stop_all()


NUM_STEPS = 2400
EVAL_EVERY = 50


def fill_training_metrics(coordinator) -> None:
    """NUM_STEPS trainer steps written straight to the store: a noisy rising reward that starts
    at exactly 0 on step 0, a held-out reward every EVAL_EVERY steps, a steady throughput."""
    rng = random.Random(21)
    for step in range(NUM_STEPS):
        reward = 0.0 if step == 0 else min(1.0, 0.15 + 0.6 * step / NUM_STEPS + rng.uniform(-0.12, 0.12))
        metrics = {"step": step, "reward_mean": reward, "tokens_per_second": 900.0 + rng.uniform(0, 200)}
        if step % EVAL_EVERY == 0:
            metrics["eval_reward"] = 0.1 + 0.6 * step / NUM_STEPS
        coordinator.store.add_metrics(step, json.dumps(metrics), unit_fixtures.T0 + 1000 * step)


@contextlib.contextmanager
def serving(http_app) -> Iterator[str]:
    """The app on a loopback port by uvicorn in a thread of this process; stopped on exit."""
    import uvicorn

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(http_app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, name="dashboard")
    thread.start()
    try:
        wait_for(lambda: server.started, 60, "the dashboard to serve", interval_s=0.1)
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(60)
        listener.close()


def drawn(page, selector: str) -> dict:
    """What the reward chart draws: the steps of its points, its smoothed line's coordinates."""
    return page.evaluate(
        """(selector) => {
            const chart = document.querySelector(selector);
            const smoothed = chart.querySelector("polyline.smoothed");
            return {
                steps: [...chart.querySelectorAll(".train circle.point")].map((c) => Number(c.dataset.x)),
                smoothed: smoothed ? smoothed.getAttribute("points") : null,
            };
        }""",
        selector,
    )


def test_overview_after_thousands_of_steps_shows_the_first_step_zooms_and_smooths(
    tmp_path, make_coordinator, playwright_api
):
    coordinator = make_coordinator()
    fill_training_metrics(coordinator)
    with serving(create_http_app(coordinator)) as dashboard, playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox", "--disable-background-networking"]
        )
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        external: list[str] = []
        page.on("request", lambda request: None if request.url.startswith(dashboard) else external.append(request.url))
        page.goto(dashboard)

        whole = drawn(page, "#reward-chart")
        assert whole["steps"][0] == 0 and whole["steps"][-1] == NUM_STEPS - 1 and len(whole["steps"]) <= 500
        chart_box = page.locator("#reward-chart").bounding_box()
        first_box = page.locator('#reward-chart .train circle.point[data-x="0"]').bounding_box()
        assert chart_box is not None and first_box is not None
        assert chart_box["x"] < first_box["x"] < chart_box["x"] + 0.2 * chart_box["width"], "step 0 on the left"
        assert chart_box["y"] < first_box["y"] < chart_box["y"] + chart_box["height"]
        assert [float(x) for x in page.locator("#reward-chart").get_attribute("data-x-domain").split()] == [0, 2500]
        page.screenshot(path=str(tmp_path / "overview-2400-steps.png"), full_page=True)
        assert (tmp_path / "overview-2400-steps.png").stat().st_size > 10_000

        # Smoothing: the slider reloads the charts smoothed with its weight; 0 draws no smoothed line.
        assert whole["smoothed"] is not None  # the default weight, 0.9
        with page.expect_navigation():
            page.locator("#smoothing").fill("0.5")
        assert page.url.endswith("smoothing=0.5&since=&until=")
        light = drawn(page, "#reward-chart")
        assert light["steps"] == whole["steps"] and light["smoothed"] not in (None, whole["smoothed"])
        with page.expect_navigation():
            page.locator("#smoothing").fill("0")
        assert drawn(page, "#reward-chart")["smoothed"] is None

        # Zoom: a drag across 40% to 50% of the plot (steps 1000 to 1250) reads those steps at full resolution.
        box = page.locator("#reward-chart").bounding_box()
        left, right, top, bottom = (float(v) for v in page.locator("#reward-chart").get_attribute("data-plot").split())
        to_pixels = box["width"] / 640
        y = box["y"] + (top + bottom) / 2 * to_pixels
        start, end = (box["x"] + (left + fraction * (right - left)) * to_pixels for fraction in (0.4, 0.5))
        page.mouse.move(start, y)
        page.mouse.down()
        page.mouse.move(end, y, steps=8)
        with page.expect_navigation():
            page.mouse.up()
        since = int(page.locator("input[name=since]").input_value())
        until = int(page.locator("input[name=until]").input_value())
        assert math.isclose(since, 1000, abs_tol=5) and math.isclose(until, 1250, abs_tol=5), (since, until)
        zoomed = drawn(page, "#reward-chart")
        assert zoomed["steps"] == list(range(since, until + 1)), "every step of the range, none outside it"
        page.screenshot(path=str(tmp_path / "overview-zoomed.png"), full_page=True)

        with page.expect_navigation():
            page.locator("#reset-zoom").click()
        assert drawn(page, "#reward-chart")["steps"] == whole["steps"]
        page.wait_for_function("() => document.body.dataset.refreshed !== undefined", timeout=20_000)
        assert page.evaluate("() => document.body.dataset.refreshError") is None
        assert external == [], f"the dashboard fetched from outside: {external}"
        browser.close()
