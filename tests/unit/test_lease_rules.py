"""Which nodes may register (the precisions a run accepts), and when the coordinator hands out a lease
(Coordinator.lease): at the policy version the node holds,
when that is recent enough for its groups to be trained on, and not while the node cools down after
walking away from too many leases; otherwise why not and when to ask again."""

import pytest
from fastapi.testclient import TestClient

from coordinator.core import (
    BACKLOG_RETRY_MS,
    NO_POLICY_RETRY_MS,
    InvalidRequestError,
    LeaseWait,
)
from coordinator.dashboard.views import DashboardData
from coordinator.dashboard.web import create_http_app
from coordinator.store import PolicyVersionRecord
from policy.tokenizer import load_tokenizer, save_char_tokenizer
from protocol.identity import Identity
from protocol.types import Codec, WorkLease
from tests.unit.conftest import T0


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tokenizer")
    save_char_tokenizer(directory, model_max_length=64)
    return load_tokenizer(directory)


def _with_versions(make_coordinator, tokenizer, num_versions: int, **config):
    app = make_coordinator(tokenizer=tokenizer, **config)
    for version in range(1, num_versions + 1):
        codec = Codec.KEYFRAME if version == 1 else Codec.DELTA
        app.store.add_version(PolicyVersionRecord(version, version - 1, codec, b"m%d" % version, 10, 10, T0))
    node = Identity.generate()
    app.register(node.key_id, node.public_key, "node", "torch", "cpu", "0.1.0")
    return app, node.key_id


@pytest.mark.parametrize(("max_staleness", "oldest_leased"), [(0, 5), (1, 5), (2, 4), (4, 2)])
def test_a_lease_goes_out_at_the_held_version_up_to_k_minus_1_behind(
    make_coordinator, tokenizer, max_staleness, oldest_leased
):
    app, node_id = _with_versions(
        make_coordinator, tokenizer, 5, run={"max_staleness": max_staleness, "max_backlog_groups": 0}
    )
    for held in range(7):
        lease = app.lease(node_id, held)
        if oldest_leased <= held <= 5:
            assert isinstance(lease, WorkLease) and lease.policy_version == held
            app.release(node_id, lease.lease_id)
        else:
            assert lease == LeaseWait(f"pull policy version 5 first (held: {held})", 0)


def test_no_lease_before_a_policy_or_while_the_backlog_is_full(make_coordinator, tokenizer, monkeypatch):
    app, node_id = _with_versions(make_coordinator, tokenizer, 0)
    assert app.lease(node_id, 0) == LeaseWait("no policy has been published yet", NO_POLICY_RETRY_MS)
    full, full_node = _with_versions(make_coordinator, tokenizer, 1, run={"max_backlog_groups": 1})
    monkeypatch.setattr(full, "backlog_full", lambda: True)
    assert full.lease(full_node, 1) == LeaseWait("the backlog of groups for the trainer is full", BACKLOG_RETRY_MS)


def test_a_node_declaring_a_precision_the_run_does_not_accept_cannot_register(make_coordinator):
    """bf16's bounds are far looser than fp32's: a run of fp32 nodes accepts no bf16 declaration,
    which would otherwise let a cheater buy the looser checks by declaring it."""
    coordinator = make_coordinator(validation={"precisions": ["float32"]})
    node = Identity.generate()
    with pytest.raises(
        InvalidRequestError,
        match="computes in bfloat16, and this run accepts nodes computing in float32 only: set the node's engine.dtype",
    ):
        coordinator.register(node.key_id, node.public_key, "n", "torch-cuda-bfloat16", "gpu", "test")
    assert coordinator.store.get_node(node.key_id) is None
    assert coordinator.register(node.key_id, node.public_key, "n", "torch-cpu-float32", "cpu", "test").engine == (
        "torch-cpu-float32"
    )
    both = make_coordinator()
    assert both.register(node.key_id, node.public_key, "n", "vllm-cuda-bfloat16", "gpu", "test").engine == (
        "vllm-cuda-bfloat16"
    )


def _second_node(app):
    node = Identity.generate()
    app.register(node.key_id, node.public_key, "other", "torch", "cpu", "0.1.0")
    return node.key_id


def test_a_released_prompt_set_goes_to_another_node_with_its_seed_and_version(make_coordinator, tokenizer):
    """Walking away buys no new draw: not from the same node, not by asking again at another held version."""
    app, walker = _with_versions(make_coordinator, tokenizer, 5, run={"max_backlog_groups": 0})  # leasable: 4, 5
    other = _second_node(app)
    released = app.lease(walker, 5)
    assert app.release(walker, released.lease_id)
    assert app.lease(walker, 5).prompts != released.prompts
    assert app.lease(other, 4).prompts != released.prompts  # bound to version 5 while 5 is leasable
    again = app.lease(other, 5)
    assert (again.prompts, again.sampling_seed, again.policy_version) == (
        released.prompts,
        released.sampling_seed,
        released.policy_version,
    )


def test_a_node_that_walks_away_too_often_waits_and_its_page_shows_why(make_coordinator, tokenizer):
    app, walker = _with_versions(
        make_coordinator,
        tokenizer,
        1,
        run={"max_backlog_groups": 0},
        lease={"walkaway_window": 4, "max_walkaway_fraction": 0.25, "cooldown_s": 30},
    )
    for _ in range(2):
        app.release(walker, app.lease(walker, 1).lease_id)
    wait = app.lease(walker, 1)
    assert isinstance(wait, LeaseWait) and wait.retry_after_ms == 30_000
    assert wait.reason == f"node {walker} released or let expire too many of its recent leases; no leases for 30 s"
    detail = DashboardData(app).node(walker)
    assert (detail.num_leases_released, detail.num_leases_expired, detail.num_lease_cooldowns) == (2, 0, 1)
    assert detail.cooldown_until_ms == T0 + 30_000
    assert [lease.state for lease in detail.leases] == ["released", "released"]
    page = TestClient(create_http_app(app)).get(f"/nodes/{walker}").text
    assert "2 released, 0 expired, 1 cool-downs" in page and "no leases until" in page
    assert page.count('<span class="lease-state lease-state-released">released</span>') == 2
    app.clock.now_ms += 30_000
    assert isinstance(app.lease(walker, 1), WorkLease)
    assert DashboardData(app).node(walker).cooldown_until_ms is None
