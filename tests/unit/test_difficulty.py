"""The pass-rate buffer (coordinator/difficulty.py) and the scheduler's use of it."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator.difficulty import FAILED, MAX_SLICES_PER_LEASE, MIXED, SOLVED, PassRateBuffer
from coordinator.scheduler import Scheduler, prompt_indices_for_lease
from coordinator.store import Store, open_store, sqlite_url
from tests.unit.test_scheduler import PLAN, T0

KEY = bytes(range(32))


def test_a_group_records_its_prompt_as_solved_failed_or_mixed():
    buffer = PassRateBuffer(KEY, num_prompts=10, keep_fraction=0.25)
    buffer.record(1, [1.0, 1.0, 1.0])
    buffer.record(2, [0.0, 0.0])
    buffer.record(3, [0.0, 1.0])
    buffer.record(4, [0.5, 0.5])  # partial rewards, all equal: no sample solved it
    buffer.record(99, [1.0])  # outside the training set: ignored
    buffer.record(5, [])
    assert [buffer.last_group(i) for i in (0, 1, 2, 3, 4, 5, 99)] == [MIXED, SOLVED, FAILED, MIXED, MIXED, MIXED, MIXED]
    buffer.record(1, [1.0, 0.0])  # the newest group decides
    assert buffer.last_group(1) == MIXED


def test_solved_and_failed_prompts_are_kept_at_the_keep_fraction_by_a_keyed_draw():
    buffer = PassRateBuffer(KEY, num_prompts=8, keep_fraction=0.25)
    buffer.record(0, [1.0] * 8)
    buffer.record(1, [0.0] * 8)
    slices = [buffer.select(lease_number, (0, 1, 2, 3)) for lease_number in range(4000)]
    for prompt_index in (0, 1):
        kept = sum(prompt_index in s for s in slices) / len(slices)
        assert 0.22 < kept < 0.28, (prompt_index, kept)
    assert all(2 in s and 3 in s for s in slices), "mixed and unseen prompts are always kept"
    assert slices == [buffer.select(lease_number, (0, 1, 2, 3)) for lease_number in range(4000)]
    other = PassRateBuffer(bytes(32), num_prompts=8, keep_fraction=0.25)
    other.record(0, [1.0] * 8)
    other.record(1, [0.0] * 8)
    assert slices != [other.select(lease_number, (0, 1, 2, 3)) for lease_number in range(4000)], "the key decides"


def _counter(start: int) -> tuple[list[int], object]:
    taken: list[int] = []

    def take() -> int:
        taken.append(start + len(taken))
        return taken[-1]

    return taken, take


def test_a_thinned_lease_fills_up_from_further_slices_and_keeps_the_rest_for_the_next():
    buffer = PassRateBuffer(KEY, num_prompts=100, keep_fraction=0.0)
    for index in (1, 2, 3, 5, 6):
        buffer.record(index, [1.0, 1.0])

    def slice_of(lease_number: int) -> tuple[int, ...]:
        return tuple(range(4 * lease_number, 4 * lease_number + 4))

    taken, take = _counter(1)
    assert buffer.fill(0, 4, slice_of, take) == (0, 4, 7, 8)
    assert taken == [1, 2], "slices 0, 1 and 2 were drawn"
    taken, take = _counter(3)
    assert buffer.fill(3, 4, slice_of, take) == (9, 10, 11, 12), "slice 2's rest first"
    assert taken == []
    assert buffer.fill(4, 4, slice_of, take) == (13, 14, 15, 16)
    assert buffer.fill(4, 4, slice_of, take) == (16, 17, 18, 19), "taken again after a rollback: no copies"


def test_a_lease_draws_at_most_max_slices_and_is_never_empty():
    buffer = PassRateBuffer(KEY, num_prompts=100, keep_fraction=0.0)
    for index in range(100):
        if index != 13:
            buffer.record(index, [0.0, 0.0])

    def slice_of(lease_number: int) -> tuple[int, ...]:
        return tuple(range(4 * lease_number, 4 * lease_number + 4))

    taken, take = _counter(1)
    assert buffer.fill(0, 4, slice_of, take) == (13,)
    assert len(taken) == MAX_SLICES_PER_LEASE - 1
    taken, take = _counter(10)
    assert buffer.fill(9, 4, slice_of, take) == (36,), "nothing kept: the slice's first"
    off = PassRateBuffer(KEY, num_prompts=1_000_000, keep_fraction=1.0)
    off.record(0, [1.0, 1.0])
    assert off.fill(0, 2, lambda n: (0, 1), take) == (0, 1) and off.last_group(0) == MIXED
    with pytest.raises(ValueError, match="keep_fraction must be between 0 and 1"):
        PassRateBuffer(KEY, 4, 1.5)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = open_store(sqlite_url(tmp_path))
    opened.register_node("node-a", b"node-a".ljust(32, b"k"), "node-a", "torch", "cpu", "0.1.0", T0)
    yield opened
    opened.close()


def test_new_leases_leave_out_prompts_last_seen_solved_and_stay_full(store: Store):
    plan = dataclasses.replace(PLAN, num_prompts=200, keep_solved_or_failed=0.0, max_open_per_node=100)
    scheduler = Scheduler(store, plan)
    first = prompt_indices_for_lease(plan.run_seed, 0, plan.prompts_per_lease, plan.num_prompts)
    lease = scheduler.issue("node-a", policy_version=1, now_ms=T0)
    assert lease.prompt_indices == first
    solved = set(range(0, plan.num_prompts, 2)) - set(first)
    for index in solved:
        scheduler.pass_rates.record(index, [1.0] * 8)
    leased = [scheduler.issue("node-a", policy_version=1, now_ms=T0 + step).prompt_indices for step in range(1, 1 + 4)]
    assert all(len(prompts) == plan.prompts_per_lease for prompts in leased), leased
    flat = [index for prompts in leased for index in prompts]
    assert len(set(flat)) == len(flat), "no prompt twice within the epoch"
    assert not solved.intersection(flat)
