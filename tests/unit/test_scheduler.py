from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator.config import CoordinatorConfig
from coordinator.scheduler import (
    SAMPLING_SEED_BITS,
    LeaseCapError,
    LeaseCooldownError,
    LeasePlan,
    Scheduler,
    keyed_permutation,
    prompt_indices_for_lease,
    sampling_seed_for_lease,
)
from coordinator.store import LeaseState, Store, WalkAwayLimit, open_store, sqlite_url
from protocol.types import SamplingParams

T0 = 1_700_000_000_000
PLAN = LeasePlan(
    run_seed=7,
    num_prompts=50,
    prompts_per_lease=4,
    group_size=8,
    sampling=SamplingParams(temperature=1.0, top_k=0, top_p=1.0, max_tokens=32),
    deadline_ms=120_000,
    max_open_per_node=2,
    # more than 1 walk-away among the last 4 closed leases: 10 s without leases
    walkaway_limit=WalkAwayLimit(window_leases=4, max_walkaways=1, cooldown_ms=10_000, max_strikes=2),
)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = open_store(sqlite_url(tmp_path))
    for node_id in ("node-a", "node-b", "node-c"):
        opened.register_node(node_id, node_id.encode().ljust(32, b"k"), node_id, "torch", "cpu", "0.1.0", T0)
    yield opened
    opened.close()


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, 100, 1000])
def test_keyed_permutation_is_a_bijection(size: int):
    images = [keyed_permutation(b"key", index, size) for index in range(size)]
    assert sorted(images) == list(range(size))


def test_keyed_permutation_depends_on_the_key():
    first = [keyed_permutation(b"key-1", index, 1000) for index in range(1000)]
    second = [keyed_permutation(b"key-2", index, 1000) for index in range(1000)]
    assert first != second
    assert first != list(range(1000))
    with pytest.raises(ValueError):
        keyed_permutation(b"key", 1000, 1000)


def test_prompts_follow_from_the_seed_and_the_lease_number():
    leases = [prompt_indices_for_lease(7, n, 4, 50) for n in range(30)]
    assert leases == [prompt_indices_for_lease(7, n, 4, 50) for n in range(30)]
    assert leases != [prompt_indices_for_lease(8, n, 4, 50) for n in range(30)]
    # 12 leases of 4 per epoch of 50 prompts: no prompt repeats within an epoch
    for epoch in range(2):
        prompts = [p for lease in leases[12 * epoch : 12 * (epoch + 1)] for p in lease]
        assert len(set(prompts)) == 48 and all(0 <= p < 50 for p in prompts)
    # the next epoch walks the split in another order
    assert leases[12:24] != leases[:12]
    with pytest.raises(ValueError):
        prompt_indices_for_lease(7, 0, 51, 50)


def test_a_lease_carries_the_plan_the_prompts_of_its_number_and_the_seed_of_its_number(store: Store):
    scheduler = Scheduler(store, PLAN)
    first = scheduler.issue("node-a", policy_version=5, now_ms=T0)
    second = scheduler.issue("node-b", policy_version=5, now_ms=T0 + 1)
    assert (first.lease_number, second.lease_number) == (0, 1)
    assert first.prompt_indices == prompt_indices_for_lease(PLAN.run_seed, 0, PLAN.prompts_per_lease, PLAN.num_prompts)
    assert second.prompt_indices == prompt_indices_for_lease(PLAN.run_seed, 1, PLAN.prompts_per_lease, PLAN.num_prompts)
    assert (first.group_size, first.sampling, first.policy_version) == (8, PLAN.sampling, 5)
    assert (first.created_ms, first.deadline_ms) == (T0, T0 + 120_000)
    key = store.secret("sampling-seed-key")
    assert (first.sampling_seed, second.sampling_seed) == (
        sampling_seed_for_lease(key, 0),
        sampling_seed_for_lease(key, 1),
    )
    assert first.sampling_seed != second.sampling_seed and first.lease_id != second.lease_id
    assert store.get_lease(first.lease_id) == first


def test_sampling_seeds_are_63_bit_distinct_and_need_the_key():
    seeds = [sampling_seed_for_lease(b"k" * 32, number) for number in range(1000)]
    assert len(set(seeds)) == 1000
    assert all(0 <= seed < 2**SAMPLING_SEED_BITS for seed in seeds)
    assert max(seeds).bit_length() > SAMPLING_SEED_BITS - 8
    assert seeds == [sampling_seed_for_lease(b"k" * 32, number) for number in range(1000)]
    other_key = [sampling_seed_for_lease(b"j" * 32, number) for number in range(1000)]
    assert not set(seeds) & set(other_key)
    with pytest.raises(ValueError, match="lease numbers start at 0"):
        sampling_seed_for_lease(b"k" * 32, -1)


def test_the_seed_key_is_made_once_and_kept(tmp_path: Path):
    url = sqlite_url(tmp_path)
    first = open_store(url)
    key = first.secret("sampling-seed-key")
    assert len(key) == 32 and first.secret("sampling-seed-key") == key and first.secret("other") != key
    first.close()
    reopened = open_store(url)
    assert reopened.secret("sampling-seed-key") == key
    reopened.close()
    elsewhere = open_store(sqlite_url(tmp_path / "another-run"))
    assert elsewhere.secret("sampling-seed-key") != key
    elsewhere.close()


def test_an_expired_prompt_set_goes_to_another_node_first_with_its_seed(store: Store):
    scheduler = Scheduler(store, PLAN)
    abandoned = scheduler.issue("node-a", 1, T0)
    scheduler.issue("node-a", 1, T0 + 10)
    reissued = scheduler.issue("node-b", 1, T0 + PLAN.deadline_ms)
    assert store.get_lease(abandoned.lease_id).state is LeaseState.EXPIRED
    assert (reissued.lease_number, reissued.prompt_indices) == (abandoned.lease_number, abandoned.prompt_indices)
    assert (reissued.sampling_seed, reissued.policy_version) == (abandoned.sampling_seed, abandoned.policy_version)
    assert reissued.deadline_ms == T0 + 2 * PLAN.deadline_ms
    assert scheduler.issue("node-b", 1, T0 + PLAN.deadline_ms).lease_number == 2


def test_released_prompts_go_to_another_node_first_with_their_seed(store: Store):
    scheduler = Scheduler(store, PLAN)
    released = scheduler.issue("node-a", 1, T0)
    assert scheduler.release(released.lease_id, T0 + 5)
    again = scheduler.issue("node-b", 1, T0 + 6)
    assert (again.prompt_indices, again.sampling_seed) == (released.prompt_indices, released.sampling_seed)
    assert again.lease_id != released.lease_id


def test_a_prompt_set_never_returns_to_a_node_that_released_it_or_let_it_expire(store: Store):
    scheduler = Scheduler(store, PLAN)
    released = scheduler.issue("node-a", 1, T0)
    scheduler.release(released.lease_id, T0 + 1)
    # node-a gets fresh prompts, never its released set: not on release, not after expiry either
    fresh = scheduler.issue("node-a", 1, T0 + 2)
    assert fresh.lease_number == 1 and store.num_requeued() == 1
    store.close_lease(fresh.lease_id, LeaseState.SUBMITTED, T0 + 2)
    expired_by_b = scheduler.issue("node-b", 1, T0 + 3)
    assert expired_by_b.lease_number == 0
    # node-b lets it expire: neither node-a nor node-b gets it back, node-c does, with the same seed
    after = T0 + 3 + PLAN.deadline_ms
    assert scheduler.issue("node-b", 1, after).lease_number == 2
    assert scheduler.issue("node-a", 1, after).lease_number == 3
    taken = scheduler.issue("node-c", 1, after)
    assert (taken.lease_number, taken.sampling_seed) == (0, released.sampling_seed)
    seeds_of_number_0 = {
        lease.sampling_seed
        for node in ("node-a", "node-b", "node-c")
        for lease in store.list_leases(node, 10)
        if lease.lease_number == 0
    }
    assert seeds_of_number_0 == {released.sampling_seed}


def test_a_requeued_set_is_bound_to_its_version_while_that_may_be_leased(store: Store):
    """Walking away and asking again at another held version would be a new draw: while the set's
    version is leasable it goes out only at that version."""
    scheduler = Scheduler(store, PLAN)
    released = scheduler.issue("node-a", 5, T0)
    scheduler.release(released.lease_id, T0 + 1)
    assert scheduler.issue("node-b", 6, T0 + 2, oldest_leasable_version=5).lease_number == 1
    taken = scheduler.issue("node-c", 5, T0 + 3, oldest_leasable_version=5)
    assert (taken.lease_number, taken.policy_version, taken.sampling_seed) == (0, 5, released.sampling_seed)
    scheduler.release(taken.lease_id, T0 + 4)
    # once version 5 may not be leased any more, the set goes out at any version
    assert scheduler.issue("node-b", 7, T0 + 5, oldest_leasable_version=6).lease_number == 0


def test_open_leases_per_node_are_capped(store: Store):
    lenient = WalkAwayLimit(window_leases=4, max_walkaways=3, cooldown_ms=10_000, max_strikes=2)
    scheduler = Scheduler(store, dataclasses.replace(PLAN, walkaway_limit=lenient))
    scheduler.issue("node-a", 1, T0)
    scheduler.issue("node-a", 1, T0)
    with pytest.raises(LeaseCapError, match="node-a holds 2 open leases") as refused:
        scheduler.issue("node-a", 1, T0 + 1)
    assert refused.value.retry_after_ms == PLAN.deadline_ms - 1  # until the first lease runs out
    assert scheduler.issue("node-b", 1, T0 + 1).lease_number == 2
    # once the node's leases pass their deadline it may lease again (fresh prompts: not its own)
    again = scheduler.issue("node-a", 1, T0 + PLAN.deadline_ms)
    assert again.lease_number == 3


def _walk_away(scheduler: Scheduler, node_id: str, now_ms: int) -> None:
    scheduler.release(scheduler.issue(node_id, 1, now_ms).lease_id, now_ms)


def _finish(scheduler: Scheduler, store: Store, node_id: str, now_ms: int) -> None:
    store.close_lease(scheduler.issue(node_id, 1, now_ms).lease_id, LeaseState.SUBMITTED, now_ms)


def test_walking_away_from_too_many_leases_cools_a_node_down_then_strikes_it(store: Store):
    scheduler = Scheduler(store, PLAN)
    _finish(scheduler, store, "node-a", T0)
    _walk_away(scheduler, "node-a", T0 + 1)
    assert store.get_node("node-a").lease_cooldown_until_ms == 0
    _walk_away(scheduler, "node-a", T0 + 2)  # 2 of its last 3 closed leases: over 1 of 4
    node = store.get_node("node-a")
    assert (node.num_leases_released, node.num_lease_cooldowns, node.num_strikes) == (2, 1, 0)
    assert node.lease_cooldown_until_ms == T0 + 2 + 10_000
    with pytest.raises(LeaseCooldownError, match="node-a released or let expire too many") as refused:
        scheduler.issue("node-a", 1, T0 + 3)
    assert refused.value.until_ms == T0 + 10_002
    assert scheduler.issue("node-b", 1, T0 + 3).lease_number == 1  # other nodes are served
    # after the cool-down the node starts a fresh count; going on is a strike, and the second bans
    resumed = T0 + 10_002
    _walk_away(scheduler, "node-a", resumed)
    _walk_away(scheduler, "node-a", resumed + 1)
    node = store.get_node("node-a")
    assert (node.num_lease_cooldowns, node.num_strikes, node.banned) == (2, 1, False)
    assert node.reputation == 0.0
    _walk_away(scheduler, "node-a", resumed + 20_000)
    _walk_away(scheduler, "node-a", resumed + 20_001)
    node = store.get_node("node-a")
    assert (node.num_leases_released, node.num_strikes, node.banned) == (6, 2, True)
    assert node.ban_reason == "walked away from 2 of its last 2 leases after a cool-down"


def test_expiries_count_as_walking_away(store: Store):
    scheduler = Scheduler(store, PLAN)
    scheduler.issue("node-a", 1, T0)
    scheduler.issue("node-a", 1, T0)
    scheduler.expire(T0 + PLAN.deadline_ms)
    node = store.get_node("node-a")
    assert (node.num_leases_expired, node.num_leases_released, node.num_lease_cooldowns) == (2, 0, 1)
    assert [lease.state for lease in store.list_leases("node-a", 10)] == [LeaseState.EXPIRED] * 2
    # leases expiring during a lease request count too: the request is refused at once
    scheduler.issue("node-b", 1, T0)
    scheduler.issue("node-b", 1, T0)
    with pytest.raises(LeaseCooldownError):
        scheduler.issue("node-b", 1, T0 + PLAN.deadline_ms)


def test_a_node_within_the_limit_or_one_that_recovered_is_not_struck(store: Store):
    scheduler = Scheduler(store, PLAN)
    for step in range(12):  # one walk-away in every four leases: at the limit, never over it
        if step % 4 == 0:
            _walk_away(scheduler, "node-a", T0 + step)
        else:
            _finish(scheduler, store, "node-a", T0 + step)
    node = store.get_node("node-a")
    assert (node.num_leases_released, node.num_lease_cooldowns, node.num_strikes) == (3, 0, 0)
    # over the limit once: a cool-down; then a full window of leases; over it again: a cool-down, no strike
    _walk_away(scheduler, "node-a", T0 + 100)
    _walk_away(scheduler, "node-a", T0 + 101)
    assert store.get_node("node-a").num_lease_cooldowns == 1
    resumed = T0 + 101 + 10_000
    for step in range(4):
        _finish(scheduler, store, "node-a", resumed + step)
    _walk_away(scheduler, "node-a", resumed + 10)
    _walk_away(scheduler, "node-a", resumed + 11)
    node = store.get_node("node-a")
    assert (node.num_lease_cooldowns, node.num_strikes, node.banned) == (2, 0, False)


def test_seeds_exclusions_and_cool_downs_survive_a_restart(tmp_path: Path):
    url = sqlite_url(tmp_path)
    first = open_store(url)
    for node_id in ("node-a", "node-b"):
        first.register_node(node_id, node_id.encode().ljust(32, b"k"), node_id, "torch", "cpu", "0.1.0", T0)
    scheduler = Scheduler(first, PLAN)
    issued = [scheduler.issue("node-a", 1, T0) for _ in range(2)]
    first.close()
    reopened = open_store(url)
    scheduler = Scheduler(reopened, PLAN)
    after = T0 + PLAN.deadline_ms
    # the two expired leases cool node-a down and come back first, to another node, under their
    # own numbers and seeds
    with pytest.raises(LeaseCooldownError):
        scheduler.issue("node-a", 1, after)
    again = [scheduler.issue("node-b", 1, after) for _ in range(2)]
    reopened.close()
    assert [(lease.lease_number, lease.sampling_seed) for lease in again] == [
        (lease.lease_number, lease.sampling_seed) for lease in issued
    ]


def test_plan_from_config():
    config = CoordinatorConfig.model_validate(
        {"run": {"seed": 3, "prompts_per_lease": 2}, "lease": {"deadline_s": 1.5}}
    )
    plan = LeasePlan.from_config(config, num_prompts=10)
    assert (plan.run_seed, plan.prompts_per_lease, plan.deadline_ms, plan.max_open_per_node) == (3, 2, 1500, 2)
    assert plan.sampling == SamplingParams(1.0, 0, 1.0, 32)
    assert plan.walkaway_limit == WalkAwayLimit(window_leases=20, max_walkaways=5, cooldown_ms=600_000, max_strikes=2)
    with pytest.raises(ValueError, match="training split"):
        LeasePlan.from_config(config, num_prompts=1)
    with pytest.raises(ValueError, match="max_walkaways < window_leases"):
        WalkAwayLimit(window_leases=4, max_walkaways=4, cooldown_ms=0, max_strikes=2)
