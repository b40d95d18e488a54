from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator.config import CoordinatorConfig
from coordinator.scheduler import (
    SAMPLING_SEED_BITS,
    LeaseCapError,
    LeasePlan,
    Scheduler,
    keyed_permutation,
    new_sampling_seed,
    prompt_indices_for_lease,
)
from coordinator.store import LeaseState, Store, open_store, sqlite_url
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
)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = open_store(sqlite_url(tmp_path))
    for node_id in ("node-a", "node-b"):
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


def test_a_lease_carries_the_plan_the_prompts_of_its_number_and_a_fresh_seed(store: Store):
    scheduler = Scheduler(store, PLAN)
    first = scheduler.issue("node-a", policy_version=5, now_ms=T0)
    second = scheduler.issue("node-b", policy_version=5, now_ms=T0 + 1)
    assert (first.lease_number, second.lease_number) == (0, 1)
    assert first.prompt_indices == prompt_indices_for_lease(PLAN.run_seed, 0, PLAN.prompts_per_lease, PLAN.num_prompts)
    assert second.prompt_indices == prompt_indices_for_lease(PLAN.run_seed, 1, PLAN.prompts_per_lease, PLAN.num_prompts)
    assert (first.group_size, first.sampling, first.policy_version) == (8, PLAN.sampling, 5)
    assert (first.created_ms, first.deadline_ms) == (T0, T0 + 120_000)
    assert first.sampling_seed != second.sampling_seed and first.lease_id != second.lease_id
    assert store.get_lease(first.lease_id) == first


def test_sampling_seeds_are_63_bit_and_fresh():
    seeds = {new_sampling_seed() for _ in range(1000)}
    assert len(seeds) == 1000
    assert all(0 <= seed < 2**SAMPLING_SEED_BITS for seed in seeds)
    assert max(seeds).bit_length() > SAMPLING_SEED_BITS - 8


def test_prompts_of_an_expired_lease_are_served_first(store: Store):
    scheduler = Scheduler(store, PLAN)
    abandoned = scheduler.issue("node-a", 1, T0)
    scheduler.issue("node-a", 1, T0 + 10)
    reissued = scheduler.issue("node-b", 1, T0 + PLAN.deadline_ms)
    assert store.get_lease(abandoned.lease_id).state is LeaseState.EXPIRED
    assert (reissued.lease_number, reissued.prompt_indices) == (abandoned.lease_number, abandoned.prompt_indices)
    assert reissued.sampling_seed != abandoned.sampling_seed
    assert reissued.deadline_ms == T0 + 2 * PLAN.deadline_ms
    assert scheduler.issue("node-b", 1, T0 + PLAN.deadline_ms).lease_number == 2


def test_released_prompts_are_served_first(store: Store):
    scheduler = Scheduler(store, PLAN)
    released = scheduler.issue("node-a", 1, T0)
    store.close_lease(released.lease_id, LeaseState.RELEASED, T0 + 5)
    assert scheduler.issue("node-b", 1, T0 + 6).prompt_indices == released.prompt_indices


def test_open_leases_per_node_are_capped(store: Store):
    scheduler = Scheduler(store, PLAN)
    scheduler.issue("node-a", 1, T0)
    scheduler.issue("node-a", 1, T0)
    with pytest.raises(LeaseCapError, match="node-a holds 2 open leases"):
        scheduler.issue("node-a", 1, T0 + 1)
    assert scheduler.issue("node-b", 1, T0 + 1).lease_number == 2
    # once the node's leases pass their deadline it may lease again (their prompts first)
    again = scheduler.issue("node-a", 1, T0 + PLAN.deadline_ms)
    assert again.lease_number == 0


def test_lease_numbers_continue_after_a_restart(tmp_path: Path):
    url = sqlite_url(tmp_path)
    first = open_store(url)
    first.register_node("node-a", b"k" * 32, "a", "torch", "cpu", "0.1.0", T0)
    issued = [Scheduler(first, PLAN).issue("node-a", 1, T0).lease_number for _ in range(2)]
    first.close()
    reopened = open_store(url)
    lease = Scheduler(reopened, PLAN).issue("node-a", 1, T0 + PLAN.deadline_ms)
    reopened.close()
    # the two expired leases come back first, under their own numbers
    assert issued == [0, 1] and lease.lease_number == 0


def test_plan_from_config():
    config = CoordinatorConfig.model_validate(
        {"run": {"seed": 3, "prompts_per_lease": 2}, "lease": {"deadline_s": 1.5}}
    )
    plan = LeasePlan.from_config(config, num_prompts=10)
    assert (plan.run_seed, plan.prompts_per_lease, plan.deadline_ms, plan.max_open_per_node) == (3, 2, 1500, 2)
    assert plan.sampling == SamplingParams(1.0, 0, 1.0, 32)
    with pytest.raises(ValueError, match="training split"):
        LeasePlan.from_config(config, num_prompts=1)
