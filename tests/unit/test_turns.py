"""Multi-turn rollouts: the calculator task and its environment (envs/tools.py, envs/base.py), the
torch engine's turn loop (policy/turns.py), the coordinator's environment check
(coordinator/checks.py) and the validator's replay of sampled tokens only (policy/prefill.py)."""

from __future__ import annotations

import dataclasses
from itertools import compress

import numpy as np
import pytest

from coordinator.checks import RunFacts, check_rollouts, environment_problem
from envs import Split, get_task
from envs.base import Problem, TurnLimits
from envs.tools import CalcTask
from policy.bootstrap import IGNORE_INDEX, supervised_batch
from policy.engine import EngineRequestError, GenerationRequest, TorchEngine, check_requests
from policy.model import load_model
from policy.prefill import ClaimedRollout, prefill, replay
from policy.tokenizer import EOS_ID, VOCAB_SIZE, load_tokenizer
from protocol import commitment
from protocol import sampling as rule
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

CALC = CalcTask()
PROBLEM = Problem(prompt="calc:4721*0386=", answer="[4721*0386]01822306", key="calc:4721*0386=")


class EchoTask(CalcTask):
    """Answers every turn end with the transcript's length: an untrained model's rollouts then
    hold environment turns wherever it happens to sample the turn end."""

    def environment_turn(self, problem: Problem, seed: int, transcript: str) -> str | None:
        return f"<{len(transcript)}:{seed % 10}>"


ECHO = EchoTask(limits=TurnLimits(max_turns=3, max_environment_tokens=20, max_total_tokens=60))


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return load_tokenizer(tiny_model)


@pytest.fixture(scope="module")
def model(tiny_model):
    return load_model(tiny_model)


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def decode(tokenizer, token_ids) -> str:
    return tokenizer.decode(list(token_ids), skip_special_tokens=True)


# ---- the task and its environment ----


def test_calc_problems_answers_and_rewards():
    problem = CALC.problem(Split.TRAIN, 0, 3)
    operands = problem.prompt.removeprefix("calc:").removesuffix("=")
    left, right = (int(x) for x in operands.split("*"))
    assert all(len(x) == CALC.max_digits for x in operands.split("*"))
    product = f"{left * right:08d}"
    assert problem.answer == f"[{operands}]{product}"
    assert CALC.environment_turn(problem, 0, f"abc[{operands}]") == f"={product}\n"
    assert CALC.environment_turn(problem, 0, f"[{left}*{right}]") == f"={product}\n"
    assert CALC.reward(problem, f"[{operands}]={product}\n{product}") == 1.0
    assert CALC.reward(problem, f"{left * right}") == 1.0  # no tool needed when the model knows
    assert CALC.reward(problem, f"[{operands}]={product}\n{left * right + 1}") == 0.0
    assert CALC.reward(problem, f"[{operands}]={product}\n") == 0.0
    assert CALC.reward(problem, f"[{operands}]={product}\n-{product}") == 0.0


@pytest.mark.parametrize("transcript", ["[12*3", "12*3]", "[12+3]", "[*3]", "[1234567890*2]", "[12*3] "])
def test_a_malformed_call_gets_no_answer(transcript):
    assert CALC.environment_turn(PROBLEM, 0, transcript) is None


def test_the_reference_transcript_interleaves_the_environment(tokenizer):
    model_turns = encode(tokenizer, PROBLEM.answer) + [EOS_ID]
    token_ids, mask = CALC.environment(PROBLEM, 0, tokenizer).transcript(model_turns)
    assert decode(tokenizer, token_ids) == "[4721*0386]=01822306\n01822306"
    assert "".join("m" if m else "e" for m in mask) == "m" * 11 + "e" * 10 + "m" * 9
    assert list(compress(token_ids, mask)) == model_turns
    assert CALC.reward(PROBLEM, decode(tokenizer, token_ids)) == 1.0


def test_the_environment_keeps_within_the_limits(tokenizer):
    call = encode(tokenizer, "[12*3]")
    turns = call * 4 + [EOS_ID]

    def num_turns(limits: TurnLimits) -> int:
        task = dataclasses.replace(CALC, limits=limits)
        _, mask = task.environment(PROBLEM, 0, tokenizer).transcript(turns)
        return sum(1 for i, m in enumerate(mask) if not m and mask[i - 1])

    assert num_turns(TurnLimits(10, 100, 100)) == 4
    assert num_turns(TurnLimits(2, 100, 100)) == 2
    assert num_turns(TurnLimits(10, 29, 100)) == 2  # "=00000036\n" is 10 tokens
    assert num_turns(TurnLimits(10, 100, 33)) == 2  # 6 + 10 + 6 + 10 tokens leave one for the model
    assert num_turns(TurnLimits(10, 100, 32)) == 1  # and none here


def test_a_turn_end_of_several_tokens_is_refused():
    class Words:
        def encode(self, text, add_special_tokens=False):
            return [1, 2]

    with pytest.raises(ValueError, match="one token"):
        CALC.environment(PROBLEM, 0, Words())


def test_the_warm_up_trains_on_model_turns_only(tokenizer):
    batch = supervised_batch([PROBLEM], tokenizer, 128, CALC)
    prompt_length = len(tokenizer.encode(PROBLEM.prompt))
    labels = batch["labels"][0].tolist()
    assert decode(tokenizer, batch["input_ids"][0].tolist()) == PROBLEM.prompt + "[4721*0386]=01822306\n01822306"
    trained = [t for t in labels if t != IGNORE_INDEX]
    assert decode(tokenizer, trained) == PROBLEM.answer and trained[-1] == EOS_ID
    assert labels[prompt_length + 11 : prompt_length + 21] == [IGNORE_INDEX] * 10


# ---- the engine's turn loop and the validator's replay ----


def echo_requests(tokenizer, num_requests: int, params: SamplingParams, lease_seed: int = 3):
    problems = ECHO.problems(Split.TRAIN, 0, num_requests)
    seeds = [rule.derive_sample_seed(lease_seed, index, 0) for index in range(num_requests)]
    return [
        GenerationRequest(tuple(tokenizer.encode(p.prompt)), params, seed, ECHO.environment(p, seed, tokenizer))
        for p, seed in zip(problems, seeds, strict=True)
    ]


@pytest.fixture(scope="module")
def echo_rollouts(model, tokenizer):
    requests = echo_requests(tokenizer, 24, SamplingParams(1.0, max_tokens=40))
    return requests, TorchEngine(model, [EOS_ID], max_batch_size=24).generate(requests)


def claims(requests, results) -> list[ClaimedRollout]:
    return [
        ClaimedRollout(q.prompt_token_ids, r.token_ids, r.logprobs, r.commitment, q.sampling, q.seed, r.sampled_mask)
        for q, r in zip(requests, results, strict=True)
    ]


def test_rollouts_hold_environment_turns_that_the_environment_rederives(echo_rollouts):
    requests, results = echo_rollouts
    assert sum(not all(r.mask) for r in results) >= 5  # the untrained model hits the turn end often enough
    for request, result in zip(requests, results, strict=True):
        sampled = tuple(compress(result.token_ids, result.mask))
        assert request.environment.transcript(sampled) == (result.token_ids, result.mask)
        assert len(result.logprobs) == len(result.margins) == len(sampled) <= request.sampling.max_tokens
        assert len(result.token_ids) <= ECHO.limits.max_total_tokens
        if result.finish_reason == FinishReason.STOP:
            assert sampled[-1] == EOS_ID
        else:
            assert len(sampled) == 40 or len(result.token_ids) == ECHO.limits.max_total_tokens


def test_the_batch_a_rollout_shares_changes_none_of_its_tokens(model, echo_rollouts):
    """Batches of 5 and of 24 give the same tokens and turns. Their commitments may differ where a
    hidden value sits on a bf16 rounding boundary (a batch's size changes how kernels split its
    rows: seen in one value of 24 x 40 tokens on this machine), so each is checked by the replay."""
    requests, results = echo_rollouts
    alone = TorchEngine(model, [EOS_ID], max_batch_size=5).generate(requests)
    assert [(r.token_ids, r.mask) for r in alone] == [(r.token_ids, r.mask) for r in results]
    outputs = prefill(model, [(q.prompt_token_ids, r.token_ids) for q, r in zip(requests, alone, strict=True)])
    for result, output in zip(alone, outputs, strict=True):
        sampled_rows = np.flatnonzero(result.mask)
        assert commitment.accepts(commitment.verify(result.commitment, output.hidden_bits[sampled_rows]))


def test_sampled_tokens_follow_the_rule_at_their_count_of_sampled_tokens(model, echo_rollouts):
    """The j-th sampled token is the rule's at position j under the logits of a whole-transcript
    prefill; the commitment covers the states of the sampled tokens, in chunks of them."""
    requests, results = echo_rollouts
    outputs = prefill(model, [(q.prompt_token_ids, r.token_ids) for q, r in zip(requests, results, strict=True)])
    for request, result, output in zip(requests, results, outputs, strict=True):
        sampled_rows = np.flatnonzero(result.mask)
        expected = rule.sample_tokens(
            output.logits[sampled_rows], np.uint64(request.seed), np.arange(len(sampled_rows)), request.sampling
        )
        near_tie = np.array(result.margins) < 1e-3
        assert np.all((expected.token_ids == np.array(result.token_ids)[sampled_rows]) | near_tie)
        assert commitment.accepts(commitment.verify(result.commitment, output.hidden_bits[sampled_rows]))


def test_honest_multi_turn_rollouts_pass_the_replay(model, echo_rollouts):
    reports = replay(model, claims(*echo_rollouts))
    assert all(report.passes() for report in reports)


def test_a_model_token_changed_after_an_environment_turn_fails_the_replay(model, tokenizer, echo_rollouts):
    requests, results = echo_rollouts
    index, result = next((i, r) for i, r in enumerate(results) if not all(r.mask) and r.mask[-1])
    position = len(result.mask) - 1 - result.mask[::-1].index(False) + 1  # the first model token after the last turn
    token_ids = list(result.token_ids)
    token_ids[position] = encode(tokenizer, "7" if decode(tokenizer, [token_ids[position]]) != "7" else "8")[0]
    tampered = dataclasses.replace(claims(requests, results)[index], token_ids=tuple(token_ids))
    report = replay(model, [tampered])[0]
    assert report.token_checks.num_mismatches >= 1 and not report.passes()


def test_an_engine_without_environments_refuses_multi_turn_requests(model, tokenizer):
    request = echo_requests(tokenizer, 1, SamplingParams(1.0, max_tokens=8))[0]
    with pytest.raises(EngineRequestError, match="multi-turn"):
        check_requests([request])
    check_requests([request], runs_environments=True)
    with pytest.raises(EngineRequestError, match="mixes"):
        TorchEngine(model, [EOS_ID]).generate([request, dataclasses.replace(request, environment=None)])


# ---- the coordinator's environment check ----

LEASE = WorkLease(
    lease_id="L1",
    node_id="node-a",
    task="calc",
    policy_version=1,
    prompts=(LeasedPrompt(5, PROBLEM.prompt, ()),),
    group_size=2,
    sampling=SamplingParams(max_tokens=32),
    sampling_seed=9,
    deadline_ms=1,
)


def calc_rollout(
    tokenizer, model_text: str, *, sample_index: int = 0, environment_text: str | None = None, mask=None, task=CALC
):
    """An honest rollout of these model turns; environment_text (the text of the transcript,
    model and environment turns) and mask replace what the node submits."""
    model_turns = encode(tokenizer, model_text) + [EOS_ID]
    token_ids, honest_mask = task.environment(PROBLEM, 0, tokenizer).transcript(model_turns)
    if environment_text is not None:
        token_ids = tuple(encode(tokenizer, environment_text) + [EOS_ID])
    mask = honest_mask if mask is None else mask
    num_sampled = sum(mask)
    return Rollout(
        sample_index=sample_index,
        token_ids=tuple(token_ids),
        sampled_mask=tuple(mask),
        logprobs=(-0.5,) * num_sampled,
        commitment=b"\x00" * num_sampled,
        finish_reason=FinishReason.STOP,
        claimed_reward=CALC.reward(PROBLEM, decode(tokenizer, token_ids)),
    )


def calc_check(tokenizer, rollout: Rollout):
    return environment_problem(rollout, CALC.environment(PROBLEM, 0, tokenizer))


def test_an_honest_transcript_passes(tokenizer):
    assert calc_check(tokenizer, calc_rollout(tokenizer, PROBLEM.answer)) is None
    assert calc_check(tokenizer, calc_rollout(tokenizer, "[4721*0386]01822306[1*2]xyz")) is None


def test_a_fabricated_tool_result_is_an_environment_mismatch(tokenizer):
    honest = calc_rollout(tokenizer, PROBLEM.answer)
    for forged in ("[4721*0386]=01822307\n01822307", "[4721*0386]=018223060\n01822306", "[4721*0386]=1\n01822306"):
        rollout = dataclasses.replace(
            calc_rollout(tokenizer, PROBLEM.answer, environment_text=forged),
            sampled_mask=tuple([True] * 11 + [False] * (len(forged) - 19) + [True] * 9),
        )
        assert len(rollout.sampled_mask) == len(rollout.token_ids), forged
        assert calc_check(tokenizer, rollout)[0] == RejectReason.ENVIRONMENT_MISMATCH, forged
    missing = calc_rollout(tokenizer, "[4721*0386]=01822306\n01822306")  # the node wrote the answer itself
    assert calc_check(tokenizer, dataclasses.replace(missing, sampled_mask=(True,) * len(missing.token_ids)))[0] == (
        RejectReason.ENVIRONMENT_MISMATCH
    )
    assert calc_check(tokenizer, honest) is None


def test_model_tokens_marked_as_the_environments_are_a_mask_violation(tokenizer):
    honest = calc_rollout(tokenizer, PROBLEM.answer)
    final_answer_hidden = tuple(honest.sampled_mask[:21]) + (False,) * 8 + (True,)
    call_hidden = (False,) * 3 + tuple(honest.sampled_mask[3:])
    for mask in (final_answer_hidden, call_hidden):
        rollout = dataclasses.replace(honest, sampled_mask=mask, logprobs=(-0.5,) * sum(mask))
        assert calc_check(tokenizer, rollout)[0] == RejectReason.SAMPLED_MASK


def test_more_turns_or_tokens_than_the_limits_allow_are_refused(tokenizer):
    limits = CALC.limits
    unlimited = dataclasses.replace(CALC, limits=TurnLimits(10, 100, 100))
    three_calls = calc_rollout(tokenizer, "[1*2][1*2][1*2]2", task=unlimited)
    assert environment_problem(three_calls, unlimited.environment(PROBLEM, 0, tokenizer)) is None
    assert sum(1 for i, m in enumerate(three_calls.sampled_mask) if not m and three_calls.sampled_mask[i - 1]) == 3
    problem = calc_check(tokenizer, three_calls)
    assert problem == (RejectReason.TURN_LIMIT, "3 environment turns, the task allows 2"), problem
    long = calc_rollout(tokenizer, "7" * (limits.max_total_tokens + 1))
    assert calc_check(tokenizer, long)[0] == RejectReason.TURN_LIMIT


def test_check_rollouts_rejects_the_group_with_the_environment_reason(tokenizer):
    def environment_of(lease, prompt_index, sample_index):
        return CALC.environment(PROBLEM, 0, tokenizer)

    facts = RunFacts(
        vocab_size=VOCAB_SIZE, eos_token_id=EOS_ID, commitment_bytes=lambda n: n, environment_of=environment_of
    )
    honest = [calc_rollout(tokenizer, PROBLEM.answer), calc_rollout(tokenizer, "[4721*0386]5", sample_index=1)]
    forged = dataclasses.replace(
        honest[1], token_ids=calc_rollout(tokenizer, "[4721*0386]5", environment_text="[4721*0386]=5\n5").token_ids
    )
    forged = dataclasses.replace(forged, sampled_mask=(True,) * 11 + (False,) * 3 + (True,) * 2, claimed_reward=1.0)

    def run(rollouts):
        batch = RolloutBatch("L1", 1, (RolloutGroup(5, tuple(rollouts)),), "test")
        return check_rollouts(
            batch,
            LEASE,
            facts,
            rewards_of=lambda scored: [CALC.reward(PROBLEM, decode(tokenizer, r.token_ids)) for _, r in scored],
            already_seen=lambda hashes: set(),
        )[0]

    assert run(honest).accepted
    rejected = run([honest[0], forged])
    assert [v.reason for v in rejected.verdicts] == [RejectReason.ENVIRONMENT_MISMATCH] * 2
    assert "another rollout" in rejected.verdicts[0].message


def test_length_may_end_a_multi_turn_rollout_at_its_total_cap(tokenizer):
    """'length' holds max_tokens sampled tokens, or max_total_tokens tokens in all."""
    facts = RunFacts(
        vocab_size=VOCAB_SIZE,
        eos_token_id=EOS_ID,
        commitment_bytes=lambda n: n,
        environment_of=lambda lease, prompt_index, sample_index: CALC.environment(PROBLEM, 0, tokenizer),
    )
    lease = dataclasses.replace(LEASE, group_size=1, sampling=SamplingParams(max_tokens=60))
    text = "[4721*0386]" + "9" * (CALC.limits.max_total_tokens - 21)
    rollout = calc_rollout(tokenizer, text)
    rollout = dataclasses.replace(
        rollout,
        token_ids=rollout.token_ids[:-1],
        sampled_mask=rollout.sampled_mask[:-1],
        logprobs=rollout.logprobs[:-1],
        commitment=rollout.commitment[:-1],
        finish_reason=FinishReason.LENGTH,
        claimed_reward=0.0,
    )
    assert len(rollout.token_ids) == CALC.limits.max_total_tokens

    def verdict(r):
        batch = RolloutBatch("L1", 1, (RolloutGroup(5, (r,)),), "test")
        return check_rollouts(
            batch, lease, facts, rewards_of=lambda scored: [0.0] * len(scored), already_seen=lambda hashes: set()
        )[0].verdicts[0]

    assert verdict(rollout).accepted, verdict(rollout)
    shorter = dataclasses.replace(
        rollout,
        token_ids=rollout.token_ids[:-1],
        sampled_mask=rollout.sampled_mask[:-1],
        logprobs=rollout.logprobs[:-1],
        commitment=rollout.commitment[:-1],
    )
    assert verdict(shorter).reason == RejectReason.FINISH_REASON_INCONSISTENT


def test_calc_is_registered():
    assert isinstance(get_task("calc"), CalcTask)
