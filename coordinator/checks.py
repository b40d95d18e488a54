"""The cheap checks every submission gets, in DESIGN.md's order (after the envelope):
lease → policy version → schema and bounds → duplicates → reward.

Pure functions over domain types; what they need from the run (vocabulary, the task's
verifier, the duplicate index) comes in through `RunFacts` and callables, so they are
tested without a server.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import compress

from protocol.types import FinishReason, LeasedPrompt, RejectReason, Rollout, RolloutBatch, RolloutVerdict, WorkLease

REWARD_TOLERANCE = 1e-6
# A verdict's message is stored with the submission and sent back in its receipt: capped, so that
# what a refused batch leaves behind stays a small multiple of its size.
MAX_VERDICT_MESSAGE_CHARS = 200


def truncated_message(message: str) -> str:
    if len(message) <= MAX_VERDICT_MESSAGE_CHARS:
        return message
    return message[: MAX_VERDICT_MESSAGE_CHARS - 1] + "…"


class LeaseRejection(ValueError):
    """The whole batch is refused before its rollouts are looked at."""

    def __init__(self, reason: RejectReason, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class RunFacts:
    vocab_size: int
    eos_token_id: int
    commitment_bytes: Callable[[int], int]  # expected commitment length for n sampled tokens
    multi_turn: bool = False  # single-turn tasks: every token is sampled


@dataclass(frozen=True)
class LeaseView:
    lease: WorkLease
    state: str  # "open", "submitted", "released", "expired"


def check_lease(batch: RolloutBatch, lease_state: LeaseView | None, signer_id: str, now_ms: int) -> WorkLease:
    """The lease exists, belongs to the signer, is live, and the batch claims its version."""
    if lease_state is None:
        raise LeaseRejection(RejectReason.UNKNOWN_LEASE, f"lease {batch.lease_id!r} does not exist")
    lease = lease_state.lease
    if lease.node_id != signer_id:
        raise LeaseRejection(
            RejectReason.LEASE_NOT_OWNED, f"lease {lease.lease_id} belongs to another node, not to {signer_id}"
        )
    if lease_state.state == "submitted":
        raise LeaseRejection(RejectReason.DUPLICATE, f"lease {lease.lease_id} was already submitted")
    if lease_state.state != "open" or now_ms > lease.deadline_ms:
        raise LeaseRejection(
            RejectReason.LEASE_EXPIRED,
            f"lease {lease.lease_id} is {lease_state.state if lease_state.state != 'open' else 'past its deadline'}",
        )
    if batch.policy_version != lease.policy_version:
        raise LeaseRejection(
            RejectReason.WRONG_POLICY_VERSION,
            f"batch claims policy version {batch.policy_version}, the lease is for {lease.policy_version}",
        )
    return lease


def rollout_content_hash(lease: WorkLease, prompt_index: int, rollout: Rollout) -> bytes:
    """Identity of a rollout's content: the same sample of the same lease hashes alike."""
    header = struct.pack(">QQI", lease.sampling_seed, prompt_index, rollout.sample_index)
    tokens = struct.pack(f"<{len(rollout.token_ids)}I", *rollout.token_ids)
    return hashlib.sha256(b"rollproof/v1/rollout\x00" + header + tokens).digest()


def _logprobs_problem(logprobs: tuple[float, ...]) -> bool:
    """Whether any log-probability is NaN, infinite or positive (min/max/isnan run in C)."""
    return bool(logprobs) and (max(logprobs) > 0.0 or min(logprobs) == -math.inf or any(map(math.isnan, logprobs)))


def _schema_problem(rollout: Rollout, lease: WorkLease, facts: RunFacts) -> tuple[RejectReason, str] | None:
    """The rollout's first schema or bounds problem, or None. Each pass over the tokens is a
    C-level builtin (sum, max, compress, count): these run on every rollout of every submission."""
    token_ids = rollout.token_ids
    num_sampled = sum(rollout.sampled_mask)
    if not facts.multi_turn and num_sampled != len(token_ids):
        return RejectReason.SCHEMA, "single-turn task: every completion token must be marked as sampled"
    if num_sampled == 0:
        return RejectReason.SCHEMA, "the completion has no sampled token"
    if num_sampled > lease.sampling.max_tokens:
        return RejectReason.TOO_LONG, f"{num_sampled} sampled tokens, max_tokens is {lease.sampling.max_tokens}"
    if token_ids and max(token_ids) >= facts.vocab_size:
        first_bad = next(t for t in token_ids if t >= facts.vocab_size)
        return RejectReason.TOKEN_OUT_OF_VOCAB, f"token id {first_bad} is outside the vocabulary of {facts.vocab_size}"
    if len(rollout.logprobs) != num_sampled:
        return RejectReason.SCHEMA, f"{len(rollout.logprobs)} log-probabilities for {num_sampled} sampled tokens"
    if _logprobs_problem(rollout.logprobs):
        return RejectReason.SCHEMA, "log-probabilities must be finite and ≤ 0"
    expected_commitment = facts.commitment_bytes(num_sampled)
    if len(rollout.commitment) != expected_commitment:
        return (
            RejectReason.COMMITMENT_MISMATCH,
            f"commitment has {len(rollout.commitment)} bytes, expected {expected_commitment} for {num_sampled} tokens",
        )
    finish_problem = _finish_problem(rollout, lease, facts, num_sampled)
    if finish_problem is not None:
        return finish_problem
    if not (0.0 <= rollout.claimed_reward <= 1.0):
        return RejectReason.SCHEMA, f"claimed reward {rollout.claimed_reward} is outside [0, 1]"
    return None


def _finish_problem(
    rollout: Rollout, lease: WorkLease, facts: RunFacts, num_sampled: int
) -> tuple[RejectReason, str] | None:
    """Whether the finish reason disagrees with the sampled tokens: 'stop' ends in the one EOS,
    'length' has none and max_tokens tokens."""
    sampled = tuple(compress(rollout.token_ids, rollout.sampled_mask))
    num_eos = sampled.count(facts.eos_token_id)
    if rollout.finish_reason == FinishReason.STOP:
        if num_eos != 1 or sampled[-1] != facts.eos_token_id:
            return RejectReason.FINISH_REASON_INCONSISTENT, "finish reason 'stop' needs exactly one EOS, at the end"
    elif num_eos:
        return RejectReason.FINISH_REASON_INCONSISTENT, "an EOS was sampled but the finish reason is not 'stop'"
    elif num_sampled != lease.sampling.max_tokens:
        return (
            RejectReason.FINISH_REASON_INCONSISTENT,
            f"finish reason 'length' after {num_sampled} tokens, max_tokens is {lease.sampling.max_tokens}",
        )
    return None


@dataclass(frozen=True)
class CheckedGroup:
    prompt: LeasedPrompt
    group_index: int  # position of the group in the batch
    verdicts: tuple[RolloutVerdict, ...]
    content_hashes: tuple[bytes, ...]

    @property
    def accepted(self) -> bool:
        return all(v.accepted for v in self.verdicts)


def check_rollouts(
    batch: RolloutBatch,
    lease: WorkLease,
    facts: RunFacts,
    *,
    reward_of: Callable[[LeasedPrompt, Rollout], float],
    already_seen: Callable[[Iterable[bytes]], set[bytes]],
) -> list[CheckedGroup]:
    """Per-rollout verdicts. A group trains only as a whole (its advantages are relative),
    so one bad rollout rejects its group; the others in the group are marked with why."""
    prompts = {p.prompt_index: p for p in lease.prompts}
    seen_prompts: set[int] = set()
    hashes = [[rollout_content_hash(lease, g.prompt_index, r) for r in g.rollouts] for g in batch.groups]
    known = already_seen([h for group_hashes in hashes for h in group_hashes])
    checked = []
    for group_index, group in enumerate(batch.groups):
        group_problem: tuple[RejectReason, str] | None = None
        if group.prompt_index not in prompts:
            group_problem = (RejectReason.SCHEMA, f"prompt {group.prompt_index} is not part of this lease")
        elif group.prompt_index in seen_prompts:
            group_problem = (RejectReason.DUPLICATE, f"prompt {group.prompt_index} appears twice in the batch")
        elif sorted(r.sample_index for r in group.rollouts) != list(range(lease.group_size)):
            group_problem = (
                RejectReason.WRONG_GROUP_SIZE,
                f"expected samples 0..{lease.group_size - 1}, got {sorted(r.sample_index for r in group.rollouts)}",
            )
        seen_prompts.add(group.prompt_index)
        problems: list[tuple[RejectReason, str] | None] = []
        batch_hashes: set[bytes] = set()
        for rollout, content_hash in zip(group.rollouts, hashes[group_index], strict=False):
            problem = group_problem or _schema_problem(rollout, lease, facts)
            if problem is None and (content_hash in known or content_hash in batch_hashes):
                problem = (RejectReason.DUPLICATE, "this rollout was already submitted")
            if problem is None:
                recomputed = reward_of(prompts[group.prompt_index], rollout)
                if abs(recomputed - rollout.claimed_reward) > REWARD_TOLERANCE:
                    problem = (
                        RejectReason.REWARD_MISMATCH,
                        f"claimed reward {rollout.claimed_reward:g}, the task's verifier gives {recomputed:g}",
                    )
            batch_hashes.add(content_hash)
            problems.append(problem)
        first_problem = next((p for p in problems if p is not None), None)
        verdicts = []
        for rollout, problem in zip(group.rollouts, problems, strict=False):
            if problem is None and first_problem is not None:
                problem = (first_problem[0], "another rollout of this group was rejected")
            verdicts.append(
                RolloutVerdict(
                    prompt_index=group.prompt_index,
                    sample_index=rollout.sample_index,
                    accepted=problem is None,
                    reason=problem[0] if problem else None,
                    message=truncated_message(problem[1]) if problem else "",
                )
            )
        checked.append(
            CheckedGroup(
                prompt=prompts.get(group.prompt_index, LeasedPrompt(group.prompt_index, "", ())),
                group_index=group_index,
                verdicts=tuple(verdicts),
                content_hashes=tuple(hashes[group_index]),
            )
        )
    return checked
