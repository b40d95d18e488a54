"""The cheap checks every submission gets, in DESIGN.md's order (after the envelope):
lease → policy version → schema and bounds → duplicates → environment turns (multi-turn tasks)
→ reward.

A multi-turn rollout's environment turns are never taken from the node: its transcript is rebuilt
from its own sampled tokens, the environment answering at every model turn's end, and must equal
what it submitted, tokens and sampled mask; the reward is then computed from that transcript.

Pure functions over domain types; what they need from the run (vocabulary, the task's
verifier, the duplicate index) comes in through `RunFacts` and callables, so they are
tested without a server.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import compress

from envs.base import RolloutEnvironment
from protocol.types import (
    FinishReason,
    LeasedPrompt,
    RejectReason,
    Rollout,
    RolloutBatch,
    RolloutGroup,
    RolloutVerdict,
    WorkLease,
)

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
    # A multi-turn task's environment for a rollout: (lease, prompt index, sample index) -> environment;
    # None for a single-turn task, where every token is sampled.
    environment_of: Callable[[WorkLease, int, int], RolloutEnvironment] | None = None

    @property
    def multi_turn(self) -> bool:
        return self.environment_of is not None


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


def _schema_problem(
    rollout: Rollout, lease: WorkLease, facts: RunFacts, max_total_tokens: int | None = None
) -> tuple[RejectReason, str] | None:
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
    finish_problem = _finish_problem(rollout, lease, facts, num_sampled, max_total_tokens)
    if finish_problem is not None:
        return finish_problem
    if not (0.0 <= rollout.claimed_reward <= 1.0):
        return RejectReason.SCHEMA, f"claimed reward {rollout.claimed_reward} is outside [0, 1]"
    return None


def _finish_problem(
    rollout: Rollout, lease: WorkLease, facts: RunFacts, num_sampled: int, max_total_tokens: int | None
) -> tuple[RejectReason, str] | None:
    """Whether the finish reason disagrees with the sampled tokens: 'stop' ends in the one EOS,
    'length' has none and max_tokens sampled tokens (or, multi-turn, max_total_tokens tokens in all)."""
    sampled = tuple(compress(rollout.token_ids, rollout.sampled_mask))
    num_eos = sampled.count(facts.eos_token_id)
    if rollout.finish_reason == FinishReason.STOP:
        if num_eos != 1 or sampled[-1] != facts.eos_token_id:
            return RejectReason.FINISH_REASON_INCONSISTENT, "finish reason 'stop' needs exactly one EOS, at the end"
    elif num_eos:
        return RejectReason.FINISH_REASON_INCONSISTENT, "an EOS was sampled but the finish reason is not 'stop'"
    elif num_sampled != lease.sampling.max_tokens and len(rollout.token_ids) != max_total_tokens:
        return (
            RejectReason.FINISH_REASON_INCONSISTENT,
            f"finish reason 'length' after {num_sampled} tokens, max_tokens is {lease.sampling.max_tokens}",
        )
    return None


def _first_difference(left: tuple[object, ...], right: tuple[object, ...]) -> int:
    return next((i for i, (a, b) in enumerate(zip(left, right, strict=False)) if a != b), min(len(left), len(right)))


def environment_problem(rollout: Rollout, environment: RolloutEnvironment) -> tuple[RejectReason, str] | None:
    """Whether a multi-turn rollout breaks its task's turn limits, or differs from the transcript the
    environment makes of its sampled tokens: an environment turn's tokens differ or are missing
    (environment mismatch), or tokens are marked as the environment's where it does not speak
    (sampled mask)."""
    limits = environment.limits
    mask = rollout.sampled_mask
    num_turns = sum(1 for i, sampled in enumerate(mask) if not sampled and (i == 0 or mask[i - 1]))
    num_environment_tokens = len(mask) - sum(mask)
    for count, limit, what in (
        (len(mask), limits.max_total_tokens, "tokens"),
        (num_turns, limits.max_turns, "environment turns"),
        (num_environment_tokens, limits.max_environment_tokens, "environment tokens"),
    ):
        if count > limit:
            return RejectReason.TURN_LIMIT, f"{count} {what}, the task allows {limit}"
    expected_ids, expected_mask = environment.transcript(tuple(compress(rollout.token_ids, mask)))
    if expected_ids == rollout.token_ids and expected_mask == mask:
        return None
    first = min(_first_difference(expected_ids, rollout.token_ids), _first_difference(expected_mask, mask))
    if first < len(mask) and not mask[first] and (first >= len(expected_mask) or expected_mask[first]):
        return (
            RejectReason.SAMPLED_MASK,
            f"token {first} is marked as the environment's, where the environment does not speak",
        )
    if first < len(expected_mask) and not expected_mask[first] and mask[first]:
        return RejectReason.ENVIRONMENT_MISMATCH, f"the environment's answer at token {first} is missing"
    return RejectReason.ENVIRONMENT_MISMATCH, f"the environment turn at token {first} is not what the environment says"


@dataclass(frozen=True)
class CheckedGroup:
    prompt: LeasedPrompt
    group_index: int  # position of the group in the batch
    verdicts: tuple[RolloutVerdict, ...]
    content_hashes: tuple[bytes, ...]

    @property
    def accepted(self) -> bool:
        return all(v.accepted for v in self.verdicts)


def _group_problem(
    group: RolloutGroup, lease: WorkLease, prompts: dict[int, LeasedPrompt], seen_prompts: set[int]
) -> tuple[RejectReason, str] | None:
    if group.prompt_index not in prompts:
        return RejectReason.SCHEMA, f"prompt {group.prompt_index} is not part of this lease"
    if group.prompt_index in seen_prompts:
        return RejectReason.DUPLICATE, f"prompt {group.prompt_index} appears twice in the batch"
    sample_indices = sorted(r.sample_index for r in group.rollouts)
    if sample_indices != list(range(lease.group_size)):
        return RejectReason.WRONG_GROUP_SIZE, f"expected samples 0..{lease.group_size - 1}, got {sample_indices}"
    return None


def _rollout_problems(
    group: RolloutGroup,
    group_problem: tuple[RejectReason, str] | None,
    content_hashes: list[bytes],
    known: set[bytes],
    lease: WorkLease,
    facts: RunFacts,
) -> list[tuple[RejectReason, str] | None]:
    """Each rollout's first problem before its reward is recomputed, or None."""
    problems: list[tuple[RejectReason, str] | None] = []
    batch_hashes: set[bytes] = set()
    for rollout, content_hash in zip(group.rollouts, content_hashes, strict=False):
        environment = (
            facts.environment_of(lease, group.prompt_index, rollout.sample_index)
            if facts.environment_of is not None and group_problem is None
            else None
        )
        problem = group_problem or _schema_problem(
            rollout, lease, facts, None if environment is None else environment.limits.max_total_tokens
        )
        if problem is None and (content_hash in known or content_hash in batch_hashes):
            problem = (RejectReason.DUPLICATE, "this rollout was already submitted")
        if problem is None and environment is not None:
            problem = environment_problem(rollout, environment)
        batch_hashes.add(content_hash)
        problems.append(problem)
    return problems


def _verdicts(group: RolloutGroup, problems: list[tuple[RejectReason, str] | None]) -> tuple[RolloutVerdict, ...]:
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
    return tuple(verdicts)


def check_rollouts(
    batch: RolloutBatch,
    lease: WorkLease,
    facts: RunFacts,
    *,
    rewards_of: Callable[[Sequence[tuple[LeasedPrompt, Rollout]]], Sequence[float]],
    already_seen: Callable[[Iterable[bytes]], set[bytes]],
) -> list[CheckedGroup]:
    """Per-rollout verdicts. A group trains only as a whole (its advantages are relative),
    so one bad rollout rejects its group; the others in the group are marked with why.
    Rewards are recomputed last, in one call for the whole batch (a task that runs code runs the
    programs together), and only for rollouts of groups that passed every other check: a rejected
    rollout costs no verifier work."""
    prompts = {p.prompt_index: p for p in lease.prompts}
    seen_prompts: set[int] = set()
    hashes = [[rollout_content_hash(lease, g.prompt_index, r) for r in g.rollouts] for g in batch.groups]
    known = already_seen([h for group_hashes in hashes for h in group_hashes])
    problems_by_group = []
    for group, group_hashes in zip(batch.groups, hashes, strict=True):
        group_problem = _group_problem(group, lease, prompts, seen_prompts)
        seen_prompts.add(group.prompt_index)
        problems_by_group.append(_rollout_problems(group, group_problem, group_hashes, known, lease, facts))
    to_score = [
        (group, rollout_index, problems)
        for group, problems in zip(batch.groups, problems_by_group, strict=True)
        if not any(problems)
        for rollout_index in range(len(problems))
    ]
    recomputed = rewards_of([(prompts[group.prompt_index], group.rollouts[i]) for group, i, _ in to_score])
    for (group, rollout_index, problems), reward in zip(to_score, recomputed, strict=True):
        claimed = group.rollouts[rollout_index].claimed_reward
        if abs(reward - claimed) > REWARD_TOLERANCE:
            problems[rollout_index] = (
                RejectReason.REWARD_MISMATCH,
                f"claimed reward {claimed:g}, the task's verifier gives {reward:g}",
            )
    return [
        CheckedGroup(
            prompt=prompts.get(group.prompt_index, LeasedPrompt(group.prompt_index, "", ())),
            group_index=group_index,
            verdicts=_verdicts(group, problems),
            content_hashes=tuple(group_hashes),
        )
        for group_index, (group, problems, group_hashes) in enumerate(
            zip(batch.groups, problems_by_group, hashes, strict=True)
        )
    ]
