import dataclasses

import pytest

from coordinator.checks import (
    LeaseRejection,
    LeaseView,
    RunFacts,
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


def reward_of(prompt, r):
    return 1.0 if r.token_ids[0] == 3 else 0.0


def run(b, seen=frozenset(), facts=FACTS):
    return check_rollouts(b, LEASE, facts, reward_of=reward_of, already_seen=lambda hs: set(hs) & set(seen))


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
    a = check_rollouts(batch(good_group()), LEASE, FACTS, reward_of=reward_of, already_seen=lambda h: set())
    b = check_rollouts(batch(good_group()), other_lease, FACTS, reward_of=reward_of, already_seen=lambda h: set())
    assert set(a[0].content_hashes).isdisjoint(b[0].content_hashes)
