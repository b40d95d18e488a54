"""The pass-rate buffer (coordinator/difficulty.py) and the scheduler's use of it."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator.difficulty import FAILED, MIXED, SOLVED, PassRateBuffer
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


def test_a_slice_of_only_dropped_prompts_keeps_its_first_and_keep_fraction_1_is_no_buffer():
    buffer = PassRateBuffer(KEY, num_prompts=4, keep_fraction=0.0)
    for index in range(4):
        buffer.record(index, [1.0, 1.0])
    assert buffer.select(7, (2, 0, 1)) == (2,)
    off = PassRateBuffer(KEY, num_prompts=1_000_000, keep_fraction=1.0)
    off.record(0, [1.0, 1.0])
    assert off.select(0, (0, 1)) == (0, 1) and off.last_group(0) == MIXED
    with pytest.raises(ValueError, match="keep_fraction must be between 0 and 1"):
        PassRateBuffer(KEY, 4, 1.5)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = open_store(sqlite_url(tmp_path))
    opened.register_node("node-a", b"node-a".ljust(32, b"k"), "node-a", "torch", "cpu", "0.1.0", T0)
    yield opened
    opened.close()


def test_new_leases_leave_out_prompts_last_seen_solved(store: Store):
    scheduler = Scheduler(store, dataclasses.replace(PLAN, keep_solved_or_failed=0.0, max_open_per_node=100))
    first = prompt_indices_for_lease(PLAN.run_seed, 0, PLAN.prompts_per_lease, PLAN.num_prompts)
    lease = scheduler.issue("node-a", policy_version=1, now_ms=T0)
    assert lease.prompt_indices == first
    for index in range(PLAN.num_prompts):
        if index not in first:
            scheduler.pass_rates.record(index, [1.0] * 8)
    for lease_number in range(1, 5):
        later = scheduler.issue("node-a", policy_version=1, now_ms=T0 + lease_number)
        assert (
            later.prompt_indices
            == prompt_indices_for_lease(PLAN.run_seed, lease_number, PLAN.prompts_per_lease, PLAN.num_prompts)[:1]
        )
