"""The dashboard app against a real Coordinator over a real SQLite store (no processes)."""

from __future__ import annotations

import json
import random
import re

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from coordinator.core import SETTLE_WINDOW_MS, Coordinator
from coordinator.dashboard.views import (
    contribution_bucket_ms,
    cumulative,
    evenly_spaced_indices,
    extreme_indices,
    finite_number,
    smooth_ema,
    submission_status,
)
from coordinator.dashboard.web import create_http_app, format_quantity, time_unit
from coordinator.grpc_servicers import Ranks, node_standing_proto
from coordinator.store import GroupState, NewGroup, NewSubmission, NewVerdict, PolicyVersionRecord
from protocol.identity import Identity
from protocol.manifest import blob_hash
from protocol.types import Codec, RejectReason
from tests.unit.conftest import OPERATOR_TOKEN, T0

SCRIPT_NAME = "<script>alert(1)</script>"
EVIL_ENGINE = '"><img src=x onerror=alert(2)>'
EVIL_MESSAGE = "<b>claimed</b> & recomputed"


def submit(app: Coordinator, node_id: str, index: int, num_rejected: int, message: str = "claimed 1.0, recomputed 0.0"):
    lease_id = f"lease-{node_id[-8:]}-{index}"
    groups = (NewGroup(f"{lease_id}-0", index, 1, b"group", 120, 2, GroupState.READY, 2.4e5),)
    verdicts = (NewVerdict(index, 0, True), NewVerdict(index, 1, True)) + tuple(
        NewVerdict(
            index + 1, sample, False, RejectReason.REWARD_MISMATCH, message, '{"claimed": 1.0, "recomputed": 0.0}'
        )
        for sample in range(num_rejected)
    )
    app.store.record_submission(
        NewSubmission(
            batch_hash=f"batch-{node_id}-{index}".encode(),
            lease_id=lease_id,
            node_id=node_id,
            created_ms=app.clock() - 1000 * index,
            receipt=b"receipt",
            groups=groups,
            verdicts=verdicts,
            rollout_hashes=(f"hash-{node_id}-{index}".encode(),),
        )
    )


@pytest.fixture
def populated(coordinator: Coordinator) -> dict[str, Identity]:
    nodes = {"honest": Identity.generate(), "evil": Identity.generate()}
    coordinator.register(nodes["honest"].key_id, nodes["honest"].public_key, "honest box", "torch", "cpu x2", "0.1.0")
    coordinator.register(nodes["evil"].key_id, nodes["evil"].public_key, SCRIPT_NAME, EVIL_ENGINE, "cpu", "0.1.0")
    for index in range(3):
        submit(coordinator, nodes["honest"].key_id, index, num_rejected=0)
    submit(coordinator, nodes["evil"].key_id, 0, num_rejected=2, message=EVIL_MESSAGE)
    coordinator.store.settle_contributions(before_ms=T0 + 1)
    for step in range(1, 6):
        metrics = {
            "step": step,
            "reward_mean": step / 10,
            "tokens_per_second": 100.0 * step,
            "policy_version": step + 1,
        }
        if step % 2 == 0:
            metrics["eval_reward"] = step / 20
        coordinator.store.add_metrics(step, json.dumps(metrics), T0 + step)
    coordinator.store.add_version(PolicyVersionRecord(1, 0, Codec.KEYFRAME, b"m1", 2_000_000, 2_000_000, T0))
    coordinator.store.add_version(PolicyVersionRecord(2, 1, Codec.DELTA, b"m2", 20_000, 2_000_000, T0 + 5))
    coordinator.heartbeat(nodes["honest"].key_id, 2, 55.5)
    coordinator.flush_heartbeats()
    return nodes


@pytest.fixture
def client(coordinator: Coordinator) -> TestClient:
    return TestClient(create_http_app(coordinator))


def test_pages_render_and_node_supplied_strings_are_text(client, populated):
    evil_id = populated["evil"].key_id
    for path in ("/", "/leaderboard", f"/nodes/{evil_id}", "/versions"):
        response = client.get(path)
        assert response.status_code == 200, path
        assert "script-src 'self'" in response.headers["content-security-policy"]
        body = response.text
        assert "<script>alert" not in body and "<img src=x" not in body and "<b>claimed" not in body, path
    leaderboard = client.get("/leaderboard").text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in leaderboard
    assert "&#34;&gt;&lt;img src=x onerror=alert(2)&gt;" in leaderboard
    node_page = client.get(f"/nodes/{evil_id}").text
    assert "&lt;b&gt;claimed&lt;/b&gt; &amp; recomputed" in node_page
    assert "reward_mismatch" in node_page and "recomputed" in node_page


def test_leaderboard_ranks_by_verified_contribution(client, populated):
    rows = client.get("/api/v1/nodes").json()
    assert [row["node_id"] for row in rows] == [populated["honest"].key_id, populated["evil"].key_id]
    honest, evil = rows
    assert (honest["rank"], honest["settled"]["num_tokens"], honest["acceptance_rate"]) == (1, 360, 1.0)
    assert (evil["rank"], evil["num_rollouts_rejected"], evil["acceptance_rate"]) == (2, 2, 0.5)
    assert honest["state"] == "online" and honest["tokens_per_second"] == 55.5
    assert evil["display_name"] == SCRIPT_NAME


def test_node_api_shows_rejections_with_evidence_and_credit(client, populated):
    detail = client.get(f"/api/v1/nodes/{populated['evil'].key_id}").json()
    assert [r["reason"] for r in detail["rejections"]] == ["reward_mismatch", "reward_mismatch"]
    assert detail["rejections"][0]["evidence"] == {"claimed": 1.0, "recomputed": 0.0}
    assert detail["submissions"][0]["status"] == "partly rejected"
    assert detail["node"]["settled"]["num_tokens"] == 120
    assert detail["contribution"][-1]["cumulative_tokens"] == 120
    assert client.get("/api/v1/nodes/nobody").status_code == 404
    assert client.get("/nodes/nobody").status_code == 404


def test_overview_training_and_versions(client, populated):
    overview = client.get("/api/v1/overview").json()
    assert (overview["trainer_step"], overview["policy_version"]) == (5, 2)
    assert (overview["num_nodes"], overview["num_nodes_online"]) == (2, 2)
    assert (overview["num_rollouts_accepted"], overview["num_rollouts_rejected"]) == (8, 2)
    assert overview["reward_mean"] == 0.5 and overview["eval_reward"] == 0.2
    assert overview["run"]["model_name"] == "tiny-test-model"
    training = client.get("/api/v1/training").json()
    assert [p["step"] for p in training] == [1, 2, 3, 4, 5]
    versions = client.get("/api/v1/versions").json()
    assert [(v["version"], v["codec"], v["ratio_to_full"]) for v in versions] == [
        (2, "delta", 0.01),
        (1, "keyframe", 1.0),
    ]
    assert versions[0]["num_nodes_holding"] == 1
    page = client.get("/").text
    reward_chart = re.search(r'<svg id="reward-chart".*?</svg>', page, re.S).group(0)
    assert reward_chart.count('class="point"') == 5 + 2


def test_openapi_describes_the_json_api(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert {
        "/api/v1/overview",
        "/api/v1/training",
        "/api/v1/nodes",
        "/api/v1/nodes/{node_id}",
        "/api/v1/versions",
    } <= set(paths)
    assert client.get("/docs").status_code == 404, "the Swagger UI loads scripts from a CDN; it stays off"


def test_metrics_parse_and_carry_the_main_counters(client, populated):
    response = client.get("/metrics")
    assert response.status_code == 200
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }
    assert samples[("rollproof_rollouts_accepted_total", ())] == 8
    assert samples[("rollproof_rollouts_rejected_total", ())] == 2
    assert samples[("rollproof_groups", (("state", "ready"),))] == 4
    assert samples[("rollproof_nodes_online", ())] == 2
    assert samples[("rollproof_trainer_step", ())] == 5
    assert samples[("rollproof_policy_version_latest", ())] == 2
    assert samples[("rollproof_validations_passed_total", ())] == 0
    assert samples[("rollproof_validations_failed_total", ())] == 0
    assert samples[("rollproof_contributed_tokens_total", (("credit", "settled"),))] == 480
    assert samples[("process_resident_memory_bytes", ())] > 0  # the process's own metrics
    assert any(name == "python_info" for name, _ in samples)


def test_metrics_time_the_rpcs_by_method_and_code(client, coordinator):
    coordinator.rpc_latency.labels("/rollproof.v1.NodeService/LeaseWork", "OK").observe(0.003)
    text = client.get("/metrics").text
    assert (
        'rollproof_rpc_duration_seconds_bucket{code="OK",le="0.005",method="/rollproof.v1.NodeService/LeaseWork"} 1.0'
        in text
    )


def test_health(client):
    assert client.get("/health").json()["status"] == "ok"


def test_public_responses_carry_no_secrets(client, populated, coordinator):
    private_hex = [identity.private_key.private_bytes_raw().hex() for identity in populated.values()]
    paths = [
        "/",
        "/leaderboard",
        "/versions",
        "/api/v1/overview",
        "/api/v1/nodes",
        "/api/v1/versions",
        "/metrics",
        "/health",
        "/openapi.json",
    ]
    paths += [f"/nodes/{i.key_id}" for i in populated.values()] + [
        f"/api/v1/nodes/{i.key_id}" for i in populated.values()
    ]
    for path in paths:
        body = client.get(path).text
        assert OPERATOR_TOKEN not in body, path
        assert "PRIVATE KEY" not in body and not any(secret in body for secret in private_hex), path


def test_view_helpers():
    assert evenly_spaced_indices(11, 3) == {0, 5, 10} and evenly_spaced_indices(3, 5) == {0, 1, 2}
    assert evenly_spaced_indices(7, 1) == {0} and evenly_spaced_indices(1000, 2) == {0, 999}
    assert finite_number({"a": 1, "b": True, "c": float("nan"), "d": "1"}, "a") == 1.0
    assert [finite_number({"b": True, "c": float("nan"), "d": "1"}, k) for k in "bcde"] == [None] * 4
    assert cumulative([3, 0, 2]) == [3, 3, 5]
    assert [submission_status(2, 0), submission_status(0, 2), submission_status(1, 1)] == [
        "accepted",
        "rejected",
        "partly rejected",
    ]
    assert contribution_bucket_ms(0, 60 * 60_000) == 60_000
    assert contribution_bucket_ms(0, 1000) == 10_000
    assert [format_quantity(v) for v in (None, 12, 0.5, 1234, 2.5e9)] == ["–", "12", "0.5", "1.23 k", "2.5 G"]
    assert [time_unit(ms)[1] for ms in (5_000, 30 * 60_000, 5 * 3_600_000)] == ["seconds", "minutes", "hours"]


def test_policy_blobs_are_served_with_ranges_beside_the_dashboard(client, coordinator):
    data = bytes(range(256)) * 4
    coordinator.policy.blobs.put_blob(blob_hash(data), data)
    response = client.get(f"/blobs/{blob_hash(data).hex()}", headers={"Range": "bytes=10-19"})
    assert response.status_code == 206 and response.content == data[10:20]
    assert client.get(f"/blobs/{'0' * 64}").status_code == 404


def test_the_shipped_grafana_board_reads_only_exported_metrics(client, coordinator, populated, repo_root):
    coordinator.rpc_latency.labels("/rollproof.v1.NodeService/Heartbeat", "OK").observe(0.001)
    coordinator.refusals.add("/rollproof.v1.NodeService/Heartbeat", "resource_exhausted")
    families = text_string_to_metric_families(client.get("/metrics").text)
    exported = {sample.name for family in families for sample in family.samples}
    board = json.loads((repo_root / "deploy" / "grafana" / "rollproof-coordinator.json").read_text())
    expressions = [target["expr"] for panel in board["panels"] for target in panel["targets"]]
    used = {name for expr in expressions for name in re.findall(r"\b(?:rollproof|process)_[a-z_]+", expr)}
    assert len(used) >= 10 and used <= exported, used - exported


def _naive_kept(values: list[float | None], num_buckets: int) -> set[int]:
    present = [i for i, v in enumerate(values) if v is not None]
    kept = set()
    for bucket in range(num_buckets):
        start, end = bucket * len(present) // num_buckets, (bucket + 1) * len(present) // num_buckets
        run = [i for n, i in enumerate(present) if start <= n < end]
        if run:
            lowest = min(values[i] for i in run)
            highest = max(values[i] for i in run)
            kept |= {run[0], run[-1]}
            kept.add(next(i for i in run if values[i] == lowest))
            kept.add(next(i for i in run if values[i] == highest))
    return kept


@pytest.mark.parametrize("seed", range(5))
def test_extreme_indices_against_a_naive_reference(seed):
    rng = random.Random(seed)
    values = [None if rng.random() < 0.3 else rng.random() for _ in range(rng.randrange(1, 400))]
    for num_buckets in (1, 3, 16, 500):
        if not any(v is not None for v in values):
            assert extreme_indices(values, num_buckets) == set()
            continue
        assert extreme_indices(values, num_buckets) == _naive_kept(values, num_buckets)


def test_the_reward_chart_covers_the_whole_run_at_bounded_size(client, coordinator):
    """3,000 steps with one dip at step 1,234: the chart and the API keep the first step and the
    dip; the API takes a range and a number of points."""
    for step in range(3000):
        reward = 0.05 if step == 1234 else 0.2 + step / 10_000
        metrics = {"reward_mean": reward, **({"eval_reward": reward} if step % 10 == 0 else {})}
        coordinator.store.add_metrics(step, json.dumps(metrics), T0 + step)
    whole = client.get("/api/v1/training").json()
    steps = [point["step"] for point in whole]
    assert len(whole) <= 500 and steps[0] == 0 and steps[-1] == 2999 and 1234 in steps and steps == sorted(steps)
    assert 'data-x="0"' in client.get("/").text  # the first step is on the overview's reward chart
    ranged = client.get("/api/v1/training", params={"since": 2000, "until": 2100, "points": 1000}).json()
    assert [point["step"] for point in ranged] == list(range(2000, 2101))
    assert client.get("/api/v1/training", params={"points": 5000}).status_code == 422


def test_a_node_learns_its_standing_and_what_to_do_about_its_rejections(client, coordinator, populated):
    coordinator.dashboard_url = "https://run.example.org"
    ranks = Ranks(coordinator)
    evil = populated["evil"].key_id
    standing = node_standing_proto(coordinator, evil, ranks)
    assert standing.num_nodes == 2 and standing.num_strikes == 0 and not standing.ban_reason
    assert standing.last_rejection_reason == "reward_mismatch"
    assert "verifier" in standing.last_rejection_remedy
    assert standing.dashboard_url == f"https://run.example.org/nodes/{evil}"
    honest = node_standing_proto(coordinator, populated["honest"].key_id, ranks)
    assert honest.rank == 1 and honest.settled_tokens > 0 and honest.last_rejection_reason == ""
    assert honest.pending_tokens == 0 and honest.pending_settles_ms == 0
    submit(coordinator, populated["honest"].key_id, 3, num_rejected=0)  # made 3 s ago, not settled yet
    pending = node_standing_proto(coordinator, populated["honest"].key_id, ranks)
    assert pending.pending_tokens > 0 and pending.pending_settles_ms == coordinator.clock() - 3000 + SETTLE_WINDOW_MS
    assert "What to do: the node&#39;s verifier" in client.get(f"/nodes/{evil}").text
    late = Identity.generate()  # the ranks are read at most every RANK_REFRESH_S: not ranked yet
    coordinator.register(late.key_id, late.public_key, "late", "torch", "cpu", "0.1.0")
    assert ranks.of(late.key_id) == (0, 2) and Ranks(coordinator).of(late.key_id)[1] == 3


def test_nodes_sharing_a_display_name_are_told_apart_by_their_ids(client, coordinator):
    twins = [Identity.generate(), Identity.generate()]
    for twin in twins:
        coordinator.register(twin.key_id, twin.public_key, "same name", "torch", "cpu", "0.1.0")
    leaderboard = client.get("/leaderboard").text
    for twin in twins:
        assert f'title="{twin.key_id}">…{twin.key_id[-6:]}</small>' in leaderboard


def test_training_smoothing_runs_over_every_step_read_then_keeps_the_extremes(client, coordinator):
    rng = random.Random(7)
    rewards = [rng.random() for _ in range(1500)]
    for step, reward in enumerate(rewards):
        coordinator.store.add_metrics(step, json.dumps({"reward_mean": reward, "tokens_per_second": 10.0}), T0)
    expected = smooth_ema(rewards, 0.9)
    points = client.get("/api/v1/training", params={"smoothing": 0.9}).json()
    assert len(points) <= 500
    smoothed = [point for point in points if point["reward_mean_smoothed"] is not None]
    assert [point["step"] for point in smoothed] == sorted(evenly_spaced_indices(1500, 100))
    assert [point["step"] for point in smoothed][:3] == [0, 15, 30]
    for point in smoothed:
        assert point["reward_mean_smoothed"] == pytest.approx(expected[point["step"]], rel=1e-12)
        assert point["tokens_per_second_smoothed"] == pytest.approx(10.0)
    zoomed = client.get("/api/v1/training", params={"since": 1000, "smoothing": 0.9}).json()
    assert [p["reward_mean_smoothed"] for p in zoomed] == pytest.approx(smooth_ema(rewards[1000:], 0.9), rel=1e-12)
    unsmoothed = client.get("/api/v1/training", params={"since": 1000}).json()
    assert all(p["reward_mean_smoothed"] == p["reward_mean"] for p in unsmoothed)
    assert client.get("/api/v1/training", params={"smoothing": 1}).status_code == 422
    assert len(client.get("/api/v1/training", params={"points": 10}).json()) <= 10
    assert client.get("/api/v1/training", params={"points": 9}).status_code == 422


def chart_of(page: str, chart_id: str) -> str:
    return re.search(rf'<svg id="{chart_id}".*?</svg>', page, re.S).group(0)


def test_overview_zooms_into_a_step_range_at_full_resolution_and_smooths(client, coordinator):
    for step in range(3000):
        coordinator.store.add_metrics(step, json.dumps({"reward_mean": (step % 7) / 7, "tokens_per_second": 5.0}), T0)
    whole = chart_of(client.get("/").text, "reward-chart")
    assert whole.count('class="point"') <= 500 and 'data-x="0"' in whole and 'class="smoothed"' in whole
    zoomed_page = client.get("/", params={"since": "1200", "until": "1500", "smoothing": "0"}).text
    zoomed = chart_of(zoomed_page, "reward-chart")
    assert sorted(int(x) for x in re.findall(r'data-x="(\d+)"', zoomed)) == list(range(1200, 1501))
    assert 'class="smoothed"' not in zoomed and 'class="line"' in zoomed
    assert 'name="since" min="0" step="1" value="1200"' in zoomed_page and "Steps 1200 to 1500" in zoomed_page
    assert 'href="/?smoothing=0.0"' in zoomed_page  # back to the whole run, keeping the smoothing
    light, heavy = (
        re.search(r'class="smoothed"[^>]*points="([^"]*)"', chart_of(client.get("/", params=p).text, "reward-chart"))
        for p in ({"smoothing": "0.3"}, {"smoothing": "0.95"})
    )
    assert light.group(1) != heavy.group(1)


@pytest.mark.parametrize(
    ("params", "problem"),
    [
        ({"since": "ten"}, "from step &#39;ten&#39; is not a whole number: showing the whole run"),
        ({"since": "50", "until": "20"}, "to step 20 comes before from step 50: showing the whole run"),
        ({"until": "-3"}, "to step -3 is not a step number (0 or more): showing the whole run"),
        ({"smoothing": "1.5"}, "smoothing 1.5 is not from 0 to 0.99: smoothing 0.9 instead"),
        ({"smoothing": "lots"}, "smoothing &#39;lots&#39; is not a number: smoothing 0.9 instead"),
    ],
)
def test_overview_says_which_chart_control_it_ignored(client, coordinator, params, problem):
    coordinator.store.add_metrics(1, json.dumps({"reward_mean": 0.5}), T0)
    page = client.get("/", params=params)
    assert page.status_code == 200 and f'<p class="notice">{problem}</p>' in page.text
    assert 'data-x="1"' in chart_of(page.text, "reward-chart")


def add_versions(coordinator: Coordinator, num_versions: int) -> None:
    for version in range(1, num_versions + 1):
        codec = Codec.KEYFRAME if version == 1 else Codec.DELTA
        record = PolicyVersionRecord(version, version - 1, codec, b"m", 1000, 100_000, T0 + version)
        coordinator.store.add_version(record)


def listed_versions(page: str) -> list[int]:
    return [int(version) for version in re.findall(r'<tr>\n  <td class="num">(\d+)</td>', page)]


def test_versions_come_in_pages_with_newer_and_older_links(client, coordinator):
    add_versions(coordinator, 120)
    newest = client.get("/versions").text
    assert listed_versions(newest) == list(range(120, 70, -1))
    assert 'href="/versions?before=71&amp;limit=50">Older' in newest and "Newer versions" not in newest
    middle = client.get("/versions", params={"before": 71}).text
    assert listed_versions(middle) == list(range(70, 20, -1))
    assert 'href="/versions?before=21&amp;limit=50">Older' in middle and 'href="/versions?limit=50">Newer' in middle
    oldest = client.get("/versions", params={"before": 21, "limit": 50}).text
    assert listed_versions(oldest) == list(range(20, 0, -1)) and "Older versions" not in oldest
    assert 'href="/versions?before=71&amp;limit=50">Newer' in oldest
    small = client.get("/versions", params={"before": 100, "limit": 10}).text
    assert listed_versions(small) == list(range(99, 89, -1))
    assert 'href="/versions?before=110&amp;limit=10">Newer' in small and "before=90&amp;limit=10" in small
    api = client.get("/api/v1/versions", params={"before": 61, "limit": 10}).json()
    assert [v["version"] for v in api] == list(range(60, 50, -1))
    assert client.get("/api/v1/versions", params={"before": 1}).json() == []
    assert client.get("/api/v1/versions", params={"limit": 501}).status_code == 422


def test_version_pages_read_a_bounded_number_of_rows(coordinator):
    add_versions(coordinator, 300)
    page = coordinator.store.list_versions_page(11, before=200)
    assert [v.version for v in page] == list(range(199, 188, -1))
    assert coordinator.store.version_numbers_after(295, 3) == [296, 297, 298]
    assert coordinator.store.version_numbers_after(299, 3) == [300]


def submit_at(app: Coordinator, node_id: str, version: int, name: str, state: GroupState = GroupState.READY) -> str:
    group_id = f"group-{name}"
    app.store.record_submission(
        NewSubmission(
            batch_hash=f"batch-{name}".encode(),
            lease_id=f"lease-{name}",
            node_id=node_id,
            created_ms=app.clock(),
            receipt=b"receipt",
            groups=(NewGroup(group_id, 0, version, b"group", 10, 2, state, 1.0),),
            verdicts=(NewVerdict(0, 0, True), NewVerdict(0, 1, True)),
            rollout_hashes=(f"hash-{name}".encode(),),
        )
    )
    return group_id


def test_nodes_holding_and_nodes_that_generated_on_each_version(client, coordinator):
    """A node runs one version at a time: "on it now" counts the recent heartbeats reporting a
    version; "generated on it" the nodes whose groups at that version were accepted and stand."""
    add_versions(coordinator, 4)
    nodes = [Identity.generate() for _ in range(4)]
    for index, node in enumerate(nodes):
        coordinator.register(node.key_id, node.public_key, f"node {index}", "torch", "cpu", "0.1.0")
    a, b, c, gone = (node.key_id for node in nodes)
    submit_at(coordinator, a, 1, "a1")
    submit_at(coordinator, a, 2, "a2")
    submit_at(coordinator, b, 2, "b2")
    submit_at(coordinator, b, 2, "b2-again", GroupState.PENDING_VALIDATION)
    caught = submit_at(coordinator, c, 3, "c3")
    coordinator.store.set_group_state([caught], GroupState.QUARANTINED, T0)
    submit_at(coordinator, gone, 1, "gone1")
    coordinator.heartbeat(gone, 1, 1.0)
    coordinator.flush_heartbeats()
    coordinator.clock.now_ms += coordinator.liveness.offline_after_ms + 1  # gone's heartbeat is too old now
    for node_id, version in ((a, 4), (b, 4), (c, 3)):
        coordinator.heartbeat(node_id, version, 1.0)
    coordinator.flush_heartbeats()
    coordinator.store.ban_node(c, "caught")
    versions = {v["version"]: v for v in client.get("/api/v1/versions").json()}
    assert {v: versions[v]["num_nodes_holding"] for v in versions} == {4: 2, 3: 0, 2: 0, 1: 0}
    assert {v: versions[v]["num_nodes_generated"] for v in versions} == {4: 0, 3: 0, 2: 2, 1: 2}
    page = client.get("/versions").text
    assert "Nodes on it now" in page and "Nodes that generated on it" in page
