"""The dashboard in a real browser (issue 8): a coordinator, a trainer and two nodes run as
processes; headless Chromium (Debian's, driven by Playwright) finds the nodes on the
leaderboard, the reward chart's points and a node's rejection reason, and saves screenshots
under artifacts/. Slow: about a minute on two busy cores, mostly process start-up."""

import asyncio
import dataclasses
import sqlite3
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from envs import get_task
from node.client import CoordinatorClient
from node.generate import generate_batch
from protocol import convert
from protocol.identity import Identity
from protocol.proto import service_pb2
from tests.integration.cluster import OPERATOR_TOKEN, Cluster, wait_for

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
