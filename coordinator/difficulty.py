"""The pass-rate buffer: prompts that every sample solved, or none did, are leased less often.

A group whose rewards are all equal has zero advantage everywhere: the trainer skips it, so the
compute that made it is lost. Over a finite training set seen for several epochs a prompt's last
group predicts its next one, so each accepted group records its prompt's pass rate (the mean of its
rewards, recomputed by the coordinator), and a later lease carries a prompt last seen all solved or
all failed only with probability `keep_fraction`, decided by a keyed hash of (lease number, prompt)
that nodes can neither predict nor draw again. A prompt skipped this way is not lost: its next
epoch offers it again, and one group then updates its pass rate (a policy that has since learned or
forgotten it moves it back). A lease whose slice the draw thins is filled up from the slices of the
next lease numbers, which it takes (they are then not leased on their own), so leases keep their
size and nodes their generation batch; what the last slice keeps past a full lease waits for the next
lease. With `num_prompts` larger than the prompts a run leases (the generated tasks' default), no
prompt repeats and the buffer changes nothing. It is off by default (keep_fraction 1): on the addition
task with 1,024 prompts a keep_fraction of 0.25 cut the uninformative groups only for the first epochs
and reached the held-out target later in every pair measured (`bench/rl.py --compare difficulty`).

The buffer lives in each coordinator process (replicas each know the groups submitted to them), a
byte per prompt: it steers which prompts are offered, never what is accepted or how it is checked.
A node cannot choose its prompts through it beyond making its own prompts look solved or failed,
which costs it the rewards' credit and at most drops those prompts to keep_fraction for one epoch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import numpy as np

MIXED, SOLVED, FAILED = 0, 1, 2  # a prompt's last group: mixed rewards (or none yet), all 1, all 0
MAX_SLICES_PER_LEASE = 4  # the slices one fresh lease draws from, at most, to fill up


class PassRateBuffer:
    def __init__(self, key: bytes, num_prompts: int, keep_fraction: float) -> None:
        """key: a coordinator secret (the draws must be unpredictable to nodes)."""
        if not 0.0 <= keep_fraction <= 1.0:
            raise ValueError(f"keep_fraction must be between 0 and 1, got {keep_fraction}")
        self.keep_fraction = keep_fraction
        self._key = key
        self._last_groups = np.full(num_prompts if keep_fraction < 1.0 else 0, MIXED, dtype=np.uint8)
        # Kept prompts past a full lease, in order, each with the lease number of its slice.
        self._left_over: dict[int, int] = {}

    def record(self, prompt_index: int, rewards: Sequence[float]) -> None:
        """An accepted group of the prompt, with its rewards."""
        if rewards and 0 <= prompt_index < len(self._last_groups):
            solved, failed = all(r == 1.0 for r in rewards), all(r == 0.0 for r in rewards)
            self._last_groups[prompt_index] = SOLVED if solved else FAILED if failed else MIXED

    def last_group(self, prompt_index: int) -> int:
        """MIXED, SOLVED or FAILED."""
        return int(self._last_groups[prompt_index]) if 0 <= prompt_index < len(self._last_groups) else MIXED

    def _keeps(self, lease_number: int, prompt_index: int) -> bool:
        if self.last_group(prompt_index) == MIXED:
            return True
        digest = hashlib.blake2b(
            lease_number.to_bytes(8, "big") + prompt_index.to_bytes(8, "big"), key=self._key, digest_size=8
        ).digest()
        return int.from_bytes(digest, "big") < self.keep_fraction * 2**64

    def select(self, lease_number: int, prompt_indices: Sequence[int]) -> tuple[int, ...]:
        """The prompts of a slice that lease lease_number keeps: all but those last seen solved or
        failed that the keyed draw drops."""
        if self.keep_fraction >= 1.0:
            return tuple(prompt_indices)
        return tuple(index for index in prompt_indices if self._keeps(lease_number, index))

    def fill(
        self,
        lease_number: int,
        num_wanted: int,
        slice_of: Callable[[int], Sequence[int]],
        take_lease_number: Callable[[], int],
    ) -> tuple[int, ...]:
        """The prompts of fresh lease lease_number, num_wanted of them where the slices allow: those
        an earlier lease's last slice left over, then what select keeps of slice_of(lease_number),
        then, while short and fewer than MAX_SLICES_PER_LEASE slices were drawn, of the slice of
        take_lease_number() (a further number, whose slice is then leased only here). Kept prompts
        past num_wanted wait for the next lease; a lease that keeps none carries its slice's first."""
        if self.keep_fraction >= 1.0:
            return tuple(slice_of(lease_number))
        # Lease numbers only grow, except when a transaction that took them rolls back: what their
        # slices left over is then drawn again.
        self._left_over = {index: number for index, number in self._left_over.items() if number < lease_number}
        prompts = list(self._left_over)[:num_wanted]
        for index in prompts:
            del self._left_over[index]
        number = lease_number
        for num_slices in range(1, MAX_SLICES_PER_LEASE + 1):
            for index in self.select(number, slice_of(number)):
                if index in prompts:
                    continue
                if len(prompts) < num_wanted:
                    prompts.append(index)
                else:
                    self._left_over[index] = number
            if len(prompts) >= num_wanted or num_slices == MAX_SLICES_PER_LEASE:
                break
            number = take_lease_number()
        return tuple(prompts) or tuple(slice_of(lease_number)[:1])
