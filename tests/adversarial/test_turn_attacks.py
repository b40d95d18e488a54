"""Attacks on multi-turn rollouts (issue 20), against a real coordinator running the `calc` tool
task that fully checks every submission: a node that fabricates a tool result, one that marks
model tokens as the environment's, one that goes past the turn limits. Each forged rollout is
dressed as an honest node would report it (log-probabilities and commitment from a prefill on the
trusted model, the reward its transcript earns), so only the environment check can catch it; each
is rejected with its reason, and none of the attacker's groups is trained on by a stand-in trainer
that consumes every group as soon as it is ready. And honest
multi-turn rollouts: no false rejection over 1,000 fully checked rollouts."""

from __future__ import annotations

import dataclasses
from itertools import compress

import numpy as np
import pytest

from envs.base import Split
from envs.tools import CalcTask
from policy.prefill import prefill
from policy.scoring import completion_text
from protocol import commitment
from protocol import sampling as rule
from protocol.convert import group_from_proto
from protocol.proto import rollout_pb2
from protocol.sampling import derive_sample_seed
from protocol.types import FinishReason, Rollout, WorkLease
from tests.adversarial.harness import (
    MARGINS,
    Attacker,
    consumed_groups,
    consuming_trainer,
    rejected_reasons,
    run,
    trainable_groups,
)
from tests.integration.cluster import checking_cluster, wait_for

CALC = CalcTask()


@pytest.fixture(scope="module")
def calc_cluster(tmp_path_factory, tiny_model):
    with (
        checking_cluster(tmp_path_factory.mktemp("calc-attacks"), tiny_model, "run.task=calc") as cluster,
        consuming_trainer(cluster),
    ):
        yield cluster


def forged_rollout(attacker: Attacker, model, lease: WorkLease, position: int, sample_index: int, turns) -> Rollout:
    """A rollout of `turns` ((text, sampled) pairs, ending with EOS) as an honest node reports one."""
    tokenizer = attacker.tokenizer
    token_ids: list[int] = []
    mask: list[bool] = []
    for text, sampled in turns:
        ids = tokenizer.encode(text, add_special_tokens=False)
        token_ids.extend(ids)
        mask.extend([sampled] * len(ids))
    token_ids.append(tokenizer.eos_token_id)
    mask.append(True)
    prompt = lease.prompts[position]
    output = prefill(model, [(prompt.prompt_token_ids, token_ids)])[0]
    rows = np.flatnonzero(mask)
    seed = derive_sample_seed(lease.sampling_seed, position, sample_index)
    sampled_ids = np.array(list(compress(token_ids, mask)))
    logprobs = rule.check_tokens(
        output.logits[rows], sampled_ids, np.uint64(seed), np.arange(len(rows), dtype=np.uint64), lease.sampling
    ).logprobs
    problem = attacker.task.problem(Split.TRAIN, attacker.run_info.run_seed, prompt.prompt_index)
    return Rollout(
        sample_index=sample_index,
        token_ids=tuple(token_ids),
        sampled_mask=tuple(mask),
        logprobs=tuple(float(x) for x in logprobs),
        commitment=commitment.commit(output.hidden_bits[rows]),
        finish_reason=FinishReason.STOP,
        claimed_reward=attacker.task.reward(problem, completion_text(tokenizer, token_ids)),
    )


def operands(prompt_text: str) -> tuple[int, int]:
    left, right = prompt_text.removeprefix("calc:").removesuffix("=").split("*")
    return int(left), int(right)


def fabricated_tool_result(a: int, b: int):
    """The model called the tool with a wrong operand; the node makes up, in the tool's format, the
    answer it needed."""
    return [(f"[{a}*{b + 1}]", True), (f"={CALC.printed(a * b)}\n", False), (f"{a * b}", True)]


def answer_marked_as_environment(a: int, b: int):
    """A real tool call answered truly, then the final answer written by the node, marked as the
    environment's (so that no replay would check it against the model)."""
    return [(f"[{a}*{b}]", True), (f"={CALC.printed(a * b)}\n{a * b}", False)]


def past_the_turn_limit(a: int, b: int):
    """Three calls, each answered truly, where the task allows two environment turns."""
    return [("[1*1]", True), (f"={CALC.printed(1)}\n", False)] * 2 + [
        (f"[{a}*{b}]", True),
        (f"={CALC.printed(a * b)}\n", False),
        (f"{a * b}", True),
    ]


@pytest.mark.parametrize(
    ("attack", "turns_of", "reason"),
    [
        ("20-fabricated-tool-result", fabricated_tool_result, "ENVIRONMENT_MISMATCH"),
        ("20-model-tokens-marked-as-environment", answer_marked_as_environment, "SAMPLED_MASK"),
        ("20-past-the-turn-limit", past_the_turn_limit, "TURN_LIMIT"),
    ],
)
def test_forged_environment_turns_are_rejected(calc_cluster, trusted, attack, turns_of, reason):
    model, tokenizer = trusted

    async def scenario():
        attacker = await Attacker(calc_cluster, model, tokenizer).start()
        lease = await attacker.lease()
        honest = attacker.generate(lease)
        groups = []
        for position, group in enumerate(honest.groups):
            forged = forged_rollout(
                attacker, model, lease, position, 0, turns_of(*operands(lease.prompts[position].prompt_text))
            )
            groups.append(dataclasses.replace(group, rollouts=(forged, *group.rollouts[1:])))
        receipt = await attacker.submit(dataclasses.replace(honest, groups=tuple(groups)))
        await attacker.close()
        return attacker, receipt

    attacker, receipt = run(scenario())
    assert receipt.num_accepted == 0, receipt
    assert rejected_reasons(receipt) == {reason}, receipt
    assert trainable_groups(calc_cluster, attacker.node_id) == 0
    assert consumed_groups(calc_cluster, attacker.node_id) == 0
    MARGINS[attack] = {"check": reason, "exact": True}


def test_an_honest_forged_looking_rollout_passes(calc_cluster, trusted):
    """The same dressing with true tool answers passes the cheap checks: the attacks above fail on
    their lie alone (this one's sampled tokens are not the rule's, which only the full check sees)."""
    model, tokenizer = trusted

    async def scenario():
        attacker = await Attacker(calc_cluster, model, tokenizer).start()
        lease = await attacker.lease()
        honest = attacker.generate(lease)
        a, b = operands(lease.prompts[0].prompt_text)
        turns = [(f"[{a}*{b}]", True), (f"={CALC.printed(a * b)}\n", False), (f"{a * b}", True)]
        forged = forged_rollout(attacker, model, lease, 0, 0, turns)
        group = dataclasses.replace(honest.groups[0], rollouts=(forged, *honest.groups[0].rollouts[1:]))
        receipt = await attacker.submit(dataclasses.replace(honest, groups=(group, *honest.groups[1:])))
        await attacker.close()
        return forged, receipt

    forged, receipt = run(scenario())
    assert forged.claimed_reward == 1.0
    assert receipt.num_rejected == 0, receipt


def _checked_rollouts(cluster, node_ids) -> list[Rollout]:
    marks = ",".join("?" * len(node_ids))
    rows = cluster.query(
        f"SELECT g.group_bytes FROM validation_results v JOIN groups g ON g.group_id = v.group_id "
        f"WHERE v.node_id IN ({marks})",
        *node_ids,
    )
    return [r for (data,) in rows for r in group_from_proto(rollout_pb2.RolloutGroup.FromString(data)).rollouts]


def _both_nodes(cluster) -> list[str] | None:
    node_ids = [row[0] for row in cluster.query("SELECT node_id FROM nodes")]
    return node_ids if len(node_ids) == 2 else None


@pytest.mark.slow
@pytest.mark.timeout(2700)  # the warm-up and 1,000 full checks, on a loaded 2-core machine
def test_honest_multi_turn_rollouts_over_a_thousand_full_checks(tmp_path_factory):
    """Real `rollproof node run` processes on a model warmed up on calc (so that it calls the tool),
    fp32 and bf16, every submission fully checked: no rejection, no failed check, no ban."""
    from policy.bootstrap import BootstrapSettings, ensure_bootstrapped

    model_dir = tmp_path_factory.mktemp("calc-model") / "model"
    # 60 steps: past the warm-up's jump (greedy reward 0.03 at step 48, 0.46 at step 50), so that it calls the tool.
    settings = BootstrapSettings(task="calc", num_steps=60, stop_at_reward=None, num_eval_problems=20)
    ensure_bootstrapped(settings, out_dir=model_dir)
    with checking_cluster(tmp_path_factory.mktemp("calc-honest"), model_dir, "run.task=calc") as cluster:
        nodes = [
            cluster.start_node("honest-fp32", "--batch-size", "16"),
            cluster.start_node("honest-bf16", "--batch-size", "16", "--set", "engine.dtype=bfloat16"),
        ]
        try:
            node_ids = wait_for(lambda: _both_nodes(cluster), 120, "the nodes to register")
            wait_for(
                lambda: len(_checked_rollouts(cluster, node_ids)) >= 1000,
                1800,
                "1,000 fully checked multi-turn rollouts",
            )
        finally:
            for node in nodes:
                node.terminate()
        failed = cluster.query("SELECT check_name, evidence_json FROM validation_results WHERE passed = 0")
        rejected = cluster.query("SELECT reason, message FROM verdicts WHERE accepted = 0")
        banned = cluster.query("SELECT node_id FROM nodes WHERE banned = 1")
        assert failed == [] and rejected == [] and banned == [], (failed[:3], rejected[:3], banned)
        checked = _checked_rollouts(cluster, node_ids)
        with_tool_calls = sum(not all(r.sampled_mask) for r in checked)
        print(f"\n{len(checked)} fully checked calc rollouts, {with_tool_calls} with environment turns")
        assert with_tool_calls >= len(checked) // 2
