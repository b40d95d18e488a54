import collections
import dataclasses
import math
import random

import pytest

from coordinator.checks import (
    LeaseRejection,
    LeaseView,
    RunFacts,
    _schema_problem,
    check_lease,
    check_rollouts,
)
from protocol.types import (
    FinishReason,
    LeasedPrompt,
    RejectReason,
    Rollout,
    RolloutBatch,
    RolloutGroup,
    SamplingParams,
    WorkLease,
)

EOS = 1
NOW = 1_000_000
LEASE = WorkLease(
    lease_id="L1",
    node_id="node-a",
    task="addition",
    policy_version=4,
    prompts=(LeasedPrompt(10, "1+1=", (5, 6)), LeasedPrompt(11, "2+2=", (7, 6))),
    group_size=2,
    sampling=SamplingParams(max_tokens=4),
    sampling_seed=99,
    deadline_ms=NOW + 1000,
)
FACTS = RunFacts(vocab_size=20, eos_token_id=EOS, commitment_bytes=lambda n: 3 * ((n + 1) // 2))


def rollout(sample_index=0, tokens=(3, 4, EOS), reward=1.0, finish=FinishReason.STOP, **changes):
    base = Rollout(
        sample_index=sample_index,
        token_ids=tuple(tokens),
        sampled_mask=(True,) * len(tokens),
        logprobs=(-0.1,) * len(tokens),
        commitment=b"\x00" * FACTS.commitment_bytes(len(tokens)),
        finish_reason=finish,
        claimed_reward=reward,
    )
    return dataclasses.replace(base, **changes)


def batch(*groups, version=4):
    return RolloutBatch(lease_id="L1", policy_version=version, groups=tuple(groups), engine="test")


def good_group(prompt_index=10):
    return RolloutGroup(prompt_index, (rollout(0), rollout(1, tokens=(2, EOS), reward=0.0)))


def rewards_of(scored):
    return [1.0 if r.token_ids[0] == 3 else 0.0 for _, r in scored]


def run(b, seen=frozenset(), facts=FACTS):
    return check_rollouts(b, LEASE, facts, rewards_of=rewards_of, already_seen=lambda hs: set(hs) & set(seen))


def test_honest_batch_is_accepted():
    checked = run(batch(good_group(10), good_group(11)))
    assert all(g.accepted for g in checked)
    assert len({h for g in checked for h in g.content_hashes}) == 4


@pytest.mark.parametrize(
    ("state", "signer", "now", "version", "reason"),
    [
        (None, "node-a", NOW, 4, RejectReason.UNKNOWN_LEASE),
        ("open", "node-b", NOW, 4, RejectReason.LEASE_NOT_OWNED),
        ("open", "node-a", NOW + 5000, 4, RejectReason.LEASE_EXPIRED),
        ("expired", "node-a", NOW, 4, RejectReason.LEASE_EXPIRED),
        ("submitted", "node-a", NOW, 4, RejectReason.DUPLICATE),
        ("open", "node-a", NOW, 3, RejectReason.WRONG_POLICY_VERSION),
    ],
)
def test_lease_rejections(state, signer, now, version, reason):
    lease_state = None if state is None else LeaseView(LEASE, state)
    with pytest.raises(LeaseRejection) as info:
        check_lease(batch(good_group(), version=version), lease_state, signer, now)
    assert info.value.reason == reason


def test_live_lease_passes():
    assert check_lease(batch(good_group()), LeaseView(LEASE, "open"), "node-a", NOW) == LEASE


def _reason_of_first(b, **kwargs):
    checked = run(b, **kwargs)
    return checked[0].verdicts[0].reason, checked[0].verdicts[0].message


@pytest.mark.parametrize(
    ("bad_rollout", "reason"),
    [
        (rollout(tokens=(3, 25, EOS)), RejectReason.TOKEN_OUT_OF_VOCAB),
        (rollout(tokens=(3, 3, 3, 3, 3), finish=FinishReason.LENGTH), RejectReason.TOO_LONG),
        (rollout(tokens=(3, 4, 5)), RejectReason.FINISH_REASON_INCONSISTENT),
        (rollout(tokens=(3, EOS, 5, EOS)), RejectReason.FINISH_REASON_INCONSISTENT),
        (rollout(tokens=(3, 4, 5), finish=FinishReason.LENGTH), RejectReason.FINISH_REASON_INCONSISTENT),
        (rollout(reward=0.0), RejectReason.REWARD_MISMATCH),
        (rollout(reward=1.5), RejectReason.SCHEMA),
        (rollout(logprobs=(-0.1,)), RejectReason.SCHEMA),
        (rollout(logprobs=(-0.1, 0.5, -0.1)), RejectReason.SCHEMA),
        (rollout(logprobs=(-0.1, float("nan"), -0.1)), RejectReason.SCHEMA),
        (rollout(commitment=b""), RejectReason.COMMITMENT_MISMATCH),
        (rollout(sampled_mask=(True, False, True)), RejectReason.SCHEMA),
    ],
)
def test_rollout_rejections_reject_the_whole_group(bad_rollout, reason):
    group = RolloutGroup(10, (bad_rollout, rollout(1)))
    checked = run(batch(group))
    verdicts = checked[0].verdicts
    assert verdicts[0].reason == reason and not verdicts[0].accepted
    assert verdicts[1].reason == reason and "another rollout of this group" in verdicts[1].message
    assert not checked[0].accepted


def test_rewards_are_recomputed_once_per_batch_and_only_for_groups_that_passed_every_other_check():
    """A task that runs code pays for a program only where its reward can decide the verdict."""
    calls = []

    def recording(scored):
        calls.append([(prompt.prompt_index, r.sample_index) for prompt, r in scored])
        return rewards_of(scored)

    bad = RolloutGroup(11, (rollout(0, tokens=(3, 25, EOS)), rollout(1)))
    checked = check_rollouts(
        batch(good_group(10), bad), LEASE, FACTS, rewards_of=recording, already_seen=lambda hashes: set()
    )
    assert calls == [[(10, 0), (10, 1)]]
    assert checked[0].accepted and checked[1].verdicts[0].reason == RejectReason.TOKEN_OUT_OF_VOCAB


def test_full_length_completion_is_fine():
    group = RolloutGroup(10, (rollout(0, tokens=(3, 3, 3, 3), finish=FinishReason.LENGTH), rollout(1)))
    assert run(batch(group))[0].accepted


def test_wrong_group_size_and_foreign_prompt():
    assert _reason_of_first(batch(RolloutGroup(10, (rollout(0),))))[0] == RejectReason.WRONG_GROUP_SIZE
    assert _reason_of_first(batch(RolloutGroup(10, (rollout(0), rollout(0)))))[0] == RejectReason.WRONG_GROUP_SIZE
    assert _reason_of_first(batch(good_group(12)))[0] == RejectReason.SCHEMA


def test_duplicates_within_and_across_submissions():
    checked = run(batch(good_group(10), good_group(10)))
    assert checked[0].accepted and checked[1].verdicts[0].reason == RejectReason.DUPLICATE
    first = run(batch(good_group(10)))
    again = run(batch(good_group(10)), seen=first[0].content_hashes)
    assert again[0].verdicts[0].reason == RejectReason.DUPLICATE


def test_content_hash_depends_on_the_lease_seed():
    other_lease = dataclasses.replace(LEASE, sampling_seed=100)
    a = check_rollouts(batch(good_group()), LEASE, FACTS, rewards_of=rewards_of, already_seen=lambda h: set())
    b = check_rollouts(batch(good_group()), other_lease, FACTS, rewards_of=rewards_of, already_seen=lambda h: set())
    assert set(a[0].content_hashes).isdisjoint(b[0].content_hashes)


def _naive_schema_problem(rollout: Rollout, lease: WorkLease, facts: RunFacts, max_total_tokens: int | None):
    """Reference: the checks written out as plain loops over the tokens."""
    num_sampled = sum(rollout.sampled_mask)
    if not facts.multi_turn and num_sampled != len(rollout.token_ids):
        return RejectReason.SCHEMA, "single-turn task: every completion token must be marked as sampled"
    if num_sampled == 0:
        return RejectReason.SCHEMA, "the completion has no sampled token"
    if num_sampled > lease.sampling.max_tokens:
        return RejectReason.TOO_LONG, f"{num_sampled} sampled tokens, max_tokens is {lease.sampling.max_tokens}"
    bad = [t for t in rollout.token_ids if t >= facts.vocab_size]
    if bad:
        return RejectReason.TOKEN_OUT_OF_VOCAB, f"token id {bad[0]} is outside the vocabulary of {facts.vocab_size}"
    if len(rollout.logprobs) != num_sampled:
        return RejectReason.SCHEMA, f"{len(rollout.logprobs)} log-probabilities for {num_sampled} sampled tokens"
    if not all(math.isfinite(lp) and lp <= 0.0 for lp in rollout.logprobs):
        return RejectReason.SCHEMA, "log-probabilities must be finite and ≤ 0"
    expected_commitment = facts.commitment_bytes(num_sampled)
    if len(rollout.commitment) != expected_commitment:
        return (
            RejectReason.COMMITMENT_MISMATCH,
            f"commitment has {len(rollout.commitment)} bytes, expected {expected_commitment} for {num_sampled} tokens",
        )
    termination = _naive_termination_problem(rollout, lease, facts, max_total_tokens)
    if termination is not None:
        return termination
    if not (0.0 <= rollout.claimed_reward <= 1.0):
        return RejectReason.SCHEMA, f"claimed reward {rollout.claimed_reward} is outside [0, 1]"
    return None


def _naive_termination_problem(rollout: Rollout, lease: WorkLease, facts: RunFacts, max_total_tokens: int | None):
    sampled = [t for t, m in zip(rollout.token_ids, rollout.sampled_mask, strict=True) if m]
    eos_positions = [i for i, t in enumerate(sampled) if t == facts.eos_token_id]
    if rollout.finish_reason == FinishReason.STOP:
        if eos_positions != [len(sampled) - 1]:
            return RejectReason.FINISH_REASON_INCONSISTENT, "finish reason 'stop' needs exactly one EOS, at the end"
    elif eos_positions:
        return RejectReason.FINISH_REASON_INCONSISTENT, "an EOS was sampled but the finish reason is not 'stop'"
    elif len(sampled) != lease.sampling.max_tokens and len(rollout.token_ids) != max_total_tokens:
        return (
            RejectReason.FINISH_REASON_INCONSISTENT,
            f"finish reason 'length' after {len(sampled)} tokens, max_tokens is {lease.sampling.max_tokens}",
        )
    return None


def _random_rollout(rng: random.Random, facts: RunFacts) -> Rollout:
    num_tokens = rng.choice([0, 1, 2, 3, 4, 5])
    tokens = tuple(
        rng.choice([EOS, 0, 3, 7, facts.vocab_size - 1, facts.vocab_size, 2**32 - 1]) for _ in range(num_tokens)
    )
    mask = tuple(rng.random() < 0.8 for _ in range(num_tokens))
    num_logprobs = sum(mask) + rng.choice([0, 0, 0, -1, 1])
    special = [math.nan, math.inf, -math.inf, 0.0, -0.0, 1e-9, -1e308]
    logprobs = tuple(rng.choice(special) if rng.random() < 0.15 else -rng.random() for _ in range(max(0, num_logprobs)))
    num_commitment = facts.commitment_bytes(sum(mask)) + rng.choice([0, 0, 0, 1])
    return Rollout(
        sample_index=0,
        token_ids=tokens,
        sampled_mask=mask,
        logprobs=logprobs,
        commitment=b"\x00" * num_commitment,
        finish_reason=rng.choice(list(FinishReason)),
        claimed_reward=rng.choice([0.0, 1.0, 0.5, -0.1, 1.5, math.nan]),
    )


@pytest.mark.parametrize("multi_turn", [False, True])
def test_schema_check_matches_the_naive_reference(multi_turn):
    # The environment is never asked by the schema check; only whether the task has one counts.
    facts = dataclasses.replace(FACTS, environment_of=(lambda lease, prompt, sample: None) if multi_turn else None)
    max_total_tokens = 5 if multi_turn else None  # 'length' also ends a multi-turn rollout of 5 tokens
    rng = random.Random(5)
    problems = collections.Counter()
    for _ in range(5000):
        r = _random_rollout(rng, facts)
        expected = _naive_schema_problem(r, LEASE, facts, max_total_tokens)
        assert _schema_problem(r, LEASE, facts, max_total_tokens) == expected, r
        problems[expected[1].split(" ")[0] if expected else None] += 1
    assert len(problems) >= 8, problems  # the random rollouts reach most of the checks
