"""Lease scheduling: which prompts a lease carries, with which sampling seed, until when.

The prompts of lease number n follow from (run seed, n) alone, so a node cannot choose its
prompts: each epoch walks the training split in the order of a keyed pseudorandom permutation,
one slice of prompts_per_lease per lease. The sampling seed of lease number n follows from n and
a secret the coordinator keeps in its store, so nodes cannot predict it, and the prompt set keeps
it: prompts of leases that expired or were released are leased again first, under their
original lease number, hence with the same seed, and never to a node that held them before.
Walking away from a lease therefore buys no new draw. The per-node cap on open leases, the
walk-away limit and the lease counter are enforced in the store, in the same transaction that
stores the lease. A new lease's slice leaves out, by a keyed draw, prompts whose last group was all
solved or all failed, and fills up from the slices of further lease numbers (coordinator/difficulty.py).
"""

from __future__ import annotations

import hashlib
import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass

from coordinator.config import CoordinatorConfig
from coordinator.difficulty import PassRateBuffer
from coordinator.store import (
    LeaseCapError,
    LeaseCooldownError,
    LeaseRecord,
    LeaseState,
    Store,
    WalkAwayLimit,
)
from protocol.types import SamplingParams

__all__ = [
    "LeaseCapError",
    "LeaseCooldownError",
    "LeasePlan",
    "Scheduler",
    "keyed_permutation",
    "prompt_indices_for_lease",
    "sampling_seed_for_lease",
]

SAMPLING_SEED_BITS = 63
SAMPLING_SEED_SECRET = "sampling-seed-key"
PASS_RATE_SECRET = "pass-rate-key"
_FEISTEL_ROUNDS = 4


def keyed_permutation(key: bytes, index: int, size: int) -> int:
    """The image of index under the pseudorandom permutation of range(size) that key selects:
    a balanced Feistel network (BLAKE2b rounds) on the smallest even bit width covering size,
    cycle-walking until the value falls inside range(size)."""
    if not 0 <= index < size:
        raise ValueError(f"index {index} is outside range({size})")
    half_bits = max(1, ((size - 1).bit_length() + 1) // 2)
    half_mask = (1 << half_bits) - 1
    value = index
    while True:
        left, right = value >> half_bits, value & half_mask
        for round_number in range(_FEISTEL_ROUNDS):
            digest = hashlib.blake2b(right.to_bytes(8, "big") + bytes([round_number]), key=key, digest_size=8).digest()
            left, right = right, left ^ (int.from_bytes(digest, "big") & half_mask)
        value = (left << half_bits) | right
        if value < size:
            return value


def _epoch_key(run_seed: int, epoch: int) -> bytes:
    return hashlib.blake2b(f"rollproof-prompts:{run_seed}:{epoch}".encode(), digest_size=32).digest()


def prompt_indices_for_lease(
    run_seed: int, lease_number: int, prompts_per_lease: int, num_prompts: int
) -> tuple[int, ...]:
    """The prompts of lease lease_number: slice number (lease_number mod leases per epoch) of the
    epoch's permutation of range(num_prompts). No prompt repeats within a lease or an epoch; the
    num_prompts mod prompts_per_lease prompts at the end of each epoch's order wait for a later
    epoch."""
    if not 1 <= prompts_per_lease <= num_prompts:
        raise ValueError(f"need 1 <= prompts_per_lease <= num_prompts, got {prompts_per_lease} and {num_prompts}")
    if lease_number < 0:
        raise ValueError(f"lease numbers start at 0, got {lease_number}")
    epoch, slot = divmod(lease_number, num_prompts // prompts_per_lease)
    key = _epoch_key(run_seed, epoch)
    first = slot * prompts_per_lease
    return tuple(keyed_permutation(key, offset, num_prompts) for offset in range(first, first + prompts_per_lease))


def sampling_seed_for_lease(key: bytes, lease_number: int) -> int:
    """The 63-bit sampling seed (it fits a signed 64-bit column) of the prompt set of lease
    lease_number: keyed BLAKE2b of the number, unpredictable without the key."""
    if lease_number < 0:
        raise ValueError(f"lease numbers start at 0, got {lease_number}")
    digest = hashlib.blake2b(b"rollproof-sampling-seed" + lease_number.to_bytes(8, "big"), key=key, digest_size=8)
    return int.from_bytes(digest.digest(), "big") >> (64 - SAMPLING_SEED_BITS)


@dataclass(frozen=True)
class LeasePlan:
    run_seed: int
    num_prompts: int
    prompts_per_lease: int
    group_size: int
    sampling: SamplingParams
    deadline_ms: int
    max_open_per_node: int
    walkaway_limit: WalkAwayLimit
    keep_solved_or_failed: float = 1.0

    def __post_init__(self) -> None:
        if not 1 <= self.prompts_per_lease <= self.num_prompts:
            raise ValueError(
                f"prompts_per_lease ({self.prompts_per_lease}) must be between 1 and the size of the "
                f"task's training split ({self.num_prompts})"
            )
        if self.deadline_ms <= 0 or self.max_open_per_node < 1 or self.group_size < 1:
            raise ValueError("a lease plan needs deadline_ms > 0, max_open_per_node >= 1 and group_size >= 1")

    @classmethod
    def from_config(cls, config: CoordinatorConfig, num_prompts: int) -> LeasePlan:
        run = config.run
        return cls(
            run_seed=run.seed,
            num_prompts=num_prompts,
            prompts_per_lease=run.prompts_per_lease,
            group_size=run.group_size,
            sampling=SamplingParams(
                temperature=run.sampling.temperature,
                top_k=run.sampling.top_k,
                top_p=run.sampling.top_p,
                max_tokens=run.sampling.max_tokens,
            ),
            deadline_ms=round(config.lease.deadline_s * 1000),
            max_open_per_node=config.lease.max_open_per_node,
            walkaway_limit=WalkAwayLimit(
                window_leases=config.lease.walkaway_window,
                max_walkaways=math.floor(config.lease.max_walkaway_fraction * config.lease.walkaway_window),
                cooldown_ms=round(config.lease.cooldown_s * 1000),
                max_strikes=config.validation.max_strikes,
            ),
            keep_solved_or_failed=run.keep_solved_or_failed,
        )


class Scheduler:
    def __init__(self, store: Store, plan: LeasePlan) -> None:
        self._store = store
        self._plan = plan
        self._seed_key = store.secret(SAMPLING_SEED_SECRET)
        self.pass_rates = PassRateBuffer(store.secret(PASS_RATE_SECRET), plan.num_prompts, plan.keep_solved_or_failed)

    @property
    def plan(self) -> LeasePlan:
        return self._plan

    def expire(self, now_ms: int) -> list[LeaseRecord]:
        """Expire leases past their deadline; their prompts go to the front of the queue, and each
        counts against its node's walk-away limit."""
        return self._store.expire_leases(now_ms, self._plan.walkaway_limit)

    def release(self, lease_id: str, now_ms: int) -> bool:
        """Release an open lease: its prompts go to the front of the queue (for other nodes), and
        the release counts against its node's walk-away limit. False when it was not open."""
        return self._store.close_lease(lease_id, LeaseState.RELEASED, now_ms, self._plan.walkaway_limit)

    def issue(
        self, node_id: str, policy_version: int, now_ms: int, oldest_leasable_version: int | None = None
    ) -> LeaseRecord:
        """Lease work to node_id at policy_version: requeued prompts first (the store expires
        overdue leases in the same transaction, so their prompts come back at once) that the node
        never held, at the version of their last lease while that is at least
        oldest_leasable_version (default: policy_version); else the next lease number's prompts.
        Raises LeaseCooldownError while the node is cooling down after walking away from too many
        leases, LeaseCapError when it already holds max_open_per_node open leases."""
        plan = self._plan

        def slice_of(lease_number: int) -> tuple[int, ...]:
            return prompt_indices_for_lease(plan.run_seed, lease_number, plan.prompts_per_lease, plan.num_prompts)

        def make_lease(
            lease_number: int, requeued_prompts: tuple[int, ...] | None, take_lease_number: Callable[[], int]
        ) -> LeaseRecord:
            if requeued_prompts is None:
                prompts = self.pass_rates.fill(lease_number, plan.prompts_per_lease, slice_of, take_lease_number)
            else:
                prompts = requeued_prompts
            return LeaseRecord(
                lease_id=secrets.token_hex(16),
                node_id=node_id,
                lease_number=lease_number,
                prompt_indices=prompts,
                group_size=plan.group_size,
                sampling=plan.sampling,
                sampling_seed=sampling_seed_for_lease(self._seed_key, lease_number),
                policy_version=policy_version,
                created_ms=now_ms,
                deadline_ms=now_ms + plan.deadline_ms,
            )

        return self._store.issue_lease(
            node_id,
            now_ms,
            plan.max_open_per_node,
            make_lease,
            policy_version=policy_version,
            oldest_leasable_version=policy_version if oldest_leasable_version is None else oldest_leasable_version,
            walkaway_limit=plan.walkaway_limit,
        )
