"""Issue 16's bf16 attacks: nodes that declare bf16 and deviate by less than any per-rollout bound
(near-ties steered toward reward, a wrong temperature, an unasked top-p, log-probabilities shaded with
the advantage, a policy one optimizer step away), against a coordinator that fully checks every
submission with the default warmed-up tiny model and a stand-in trainer that consumes every group as
soon as it is ready. Each keeps submitting until rejected; each must be rejected with its reason, and
none of its groups trained on (none in the trainer's ledger, none counted consumed at its verdict,
none left trainable), while an honest node's groups are trained on once its first window passes."""

import copy
import dataclasses
import time

import numpy as np
import pytest
import torch

from coordinator.node_stats import CHECKS, LIFETIME_FALSE_POSITIVE_RATE, NODE_WINDOW_TOKENS, WIDE_GAP_FRACTION
from protocol import sampling as rule
from protocol.identity import Identity
from protocol.sampling import DEFAULT_LOGIT_TOLERANCE
from tests.adversarial.harness import (
    MARGINS,
    Attacker,
    careful_completions,
    consumed_groups,
    consuming_trainer,
    rebuilt_batch,
    run,
    trainable_groups,
    wait_for_validation,
)
from tests.integration.cluster import Cluster

pytestmark = pytest.mark.slow

BF16 = "torch-cpu-bfloat16"
# Per-rollout checks a deviation may also trip first, and the node-level ones.
CAUGHT_BY = set(CHECKS) | {
    "sampling",
    "near_ties",
    "logprob_drift",
    "commitment",
    "commitment_node_pooled",
    "node_doubt_rate",
}


@pytest.fixture(scope="module")
def warm_cluster(tmp_path_factory):
    from policy.bootstrap import bootstrapped_model_dir

    cluster = Cluster(tmp_path_factory.mktemp("node-stats"), bootstrapped_model_dir(), Identity.generate())
    cluster.publish_fixed_policy()
    cluster.start_coordinator(
        "--set",
        "validation.num_initial_checks=1000000",
        "--set",
        "lease.max_open_per_node=4",
        "--set",
        "run.prompts_per_lease=8",
        "--set",
        "run.group_size=8",
        "--set",
        "run.sampling.max_tokens=16",
        "--set",
        "run.max_backlog_groups=0",
        "--set",
        "server.max_message_bytes=1048576",
    )
    with consuming_trainer(cluster):
        yield cluster
    cluster.stop_all()


@pytest.fixture(scope="module")
def bf16_policy(warm_cluster):
    from policy.model import load_model
    from policy.tokenizer import load_tokenizer

    return load_model(warm_cluster.model_dir, dtype="bfloat16"), load_tokenizer(warm_cluster.model_dir)


def careful(pick, gap_fraction: float = 0.9):
    """A cheat that deviates only where a bf16 validator forgives it (harness.careful_completions):
    at near-ties within gap_fraction of the logit tolerance."""

    def make(attacker, model, lease):
        tolerance = gap_fraction * DEFAULT_LOGIT_TOLERANCE / lease.sampling.temperature
        return rebuilt_batch(attacker, model, lease, careful_completions(attacker, model, lease, tolerance, pick))

    return make


def toward_the_answer(tokenizer):
    """Near-ties steered toward reward: the token that spells the answer's next character."""

    def pick(near, choice, logits, noise, answer, step):
        wanted = [t for t in near if step < len(answer) and tokenizer.decode([int(t)]) == answer[step]]
        return wanted[0] if wanted else choice

    return pick


def at_temperature(temperature: float):
    """The token the rule picks at another temperature than the leased 1.0, where it is a near-tie."""

    def pick(near, choice, logits, noise, answer, step):
        cheat = int(np.argmax(logits / np.float32(temperature) + noise))
        return cheat if cheat in near else choice

    return pick


def with_top_p(top_p: float):
    """The token the rule picks with an unasked top-p filter, where it is a near-tie."""

    def pick(near, choice, logits, noise, answer, step):
        threshold = rule.filter_threshold(logits[None], 0, top_p)[0]
        cheat = int(np.argmax(np.where(logits >= threshold, logits + noise, -np.inf)))
        return cheat if cheat in near else choice

    return pick


def shade_logprobs(attacker, model, lease):
    """Honest tokens; each log-probability moved 0.3 with the sign of its rollout's advantage (and
    kept at or below 0, where the cheap checks would refuse it)."""
    batch = attacker.generate(lease)
    groups = []
    for group in batch.groups:
        rewards = np.array([r.claimed_reward for r in group.rollouts])
        shaded = [
            dataclasses.replace(r, logprobs=tuple(min(0.0, x + 0.3 * float(np.sign(a))) for x in r.logprobs))
            for r, a in zip(group.rollouts, rewards - rewards.mean(), strict=True)
        ]
        groups.append(dataclasses.replace(group, rollouts=tuple(shaded)))
    return dataclasses.replace(batch, groups=tuple(groups))


def one_adamw_step(model, tokenizer):
    """The policy after one AdamW step at lr 1e-4 on the reference answers of a few problems."""
    from envs import get_task
    from envs.base import Split

    tampered = copy.deepcopy(model).float().train()
    task = get_task("addition")
    texts = [p.prompt + p.answer for p in task.problems(Split.TRAIN, 1, 32)]
    ids = [torch.tensor(tokenizer.encode(t)) for t in texts]
    batch = torch.nn.utils.rnn.pad_sequence(ids, batch_first=True)
    loss = tampered(input_ids=batch, labels=batch.masked_fill(batch == 0, -100)).loss
    loss.backward()
    torch.optim.AdamW(tampered.parameters(), lr=1e-4).step()
    return tampered.to(torch.bfloat16).eval()


def caught_after(cluster, model, tokenizer, make_batch, max_leases: int):
    """A bf16 node that leases, cheats, submits and waits for the full checks, until one fails:
    (the node, the results, leases used)."""

    async def scenario():
        attacker = await Attacker(cluster, model, tokenizer, engine_name=BF16).start()
        num_leases = 0
        while num_leases < max_leases:
            num_leases += 1
            lease = await attacker.lease()
            await attacker.submit(make_batch(attacker, model, lease))
            results = wait_for_validation(cluster, attacker.node_id, timeout_s=600)
            if not all(passed for passed, _, _ in results):
                break
        await attacker.close()
        return attacker, results, num_leases

    return run(scenario())


@pytest.mark.parametrize(
    ("attack", "make_batch", "tampered"),
    [
        ("16-2-near-ties-steered-toward-reward", "steer", None),
        ("16-3-temperature-0.9-for-1.0", careful(at_temperature(0.9)), None),
        ("16-3-temperature-1.1-for-1.0", careful(at_temperature(1.1)), None),
        ("16-4-unasked-top-p-0.95", careful(with_top_p(0.95)), None),
        ("16-5-logprobs-shaded-with-advantage", shade_logprobs, None),
        ("16-6-policy-one-adamw-step-ahead", lambda a, m, lease: a.generate(lease), one_adamw_step),
    ],
)
def test_bf16_deviation_is_caught_before_any_group_is_trained_on(
    warm_cluster, bf16_policy, attack, make_batch, tampered
):
    model, tokenizer = bf16_policy
    node_model = tampered(model, tokenizer) if tampered is not None else model
    if make_batch == "steer":
        make_batch = careful(toward_the_answer(tokenizer))
    # Windows of NODE_WINDOW_TOKENS tokens; a lease of 64 short rollouts holds a few hundred.
    attacker, results, num_leases = caught_after(
        warm_cluster, node_model, tokenizer, make_batch, max_leases=4 * NODE_WINDOW_TOKENS // 256
    )
    expect_caught(warm_cluster, attacker, results, num_leases, attack)


def expect_caught(cluster, attacker, results, num_leases: int, attack: str) -> None:
    failures = [(check, evidence) for passed, check, evidence in results if not passed]
    assert failures, f"{attack}: passed all {len(results)} full checks over {num_leases} leases"
    check, evidence = failures[0]
    assert check in CAUGHT_BY, f"{attack}: failed {check}: {evidence}"
    consumed_at_verdict = cluster.query(
        "SELECT num_groups_consumed FROM validation_results WHERE node_id = ? AND passed = 0", attacker.node_id
    )
    assert consumed_at_verdict == [(0,)], f"{attack}: groups consumed when caught: {consumed_at_verdict}"
    assert consumed_groups(cluster, attacker.node_id) == 0 and trainable_groups(cluster, attacker.node_id) == 0
    MARGINS[attack] = {
        "check": check,
        "num_leases": num_leases,
        "num_groups_passed_before": sum(passed for passed, _, _ in results),
        **{k: evidence[k] for k in ("p_value", "p_values", "false_positive_rate", "num_tokens") if k in evidence},
        **({"evidence": evidence} if check not in CHECKS else {}),
    }


def test_near_ties_steered_at_narrow_gaps_are_caught_over_the_nodes_lifetime(warm_cluster, bf16_policy):
    """The steerer kept to score gaps under the wide ones (so node_temperature_fit sees nothing) moves
    a few near-ties a window into rewarded rollouts: every window passes, and the groups of its
    passed windows are trained on. The lifetime direction test sums its whole history and catches it;
    then none of its groups is left to train on, and how many had been consumed is recorded (the
    bound on what such a node steers over its whole life)."""
    model, tokenizer = bf16_policy
    steer = careful(toward_the_answer(tokenizer), gap_fraction=0.95 * WIDE_GAP_FRACTION)
    attacker, results, num_leases = caught_after(
        warm_cluster, model, tokenizer, steer, max_leases=40 * NODE_WINDOW_TOKENS // 256
    )
    failures = [(check, evidence) for passed, check, evidence in results if not passed]
    assert failures, f"passed all {len(results)} full checks over {num_leases} leases"
    check, evidence = failures[0]
    assert check == "node_lifetime_near_tie_direction", f"failed {check}: {evidence}"
    assert evidence["p_value"] < LIFETIME_FALSE_POSITIVE_RATE
    left_to_train = warm_cluster.query(
        "SELECT COUNT(*) FROM groups WHERE node_id = ? AND state = 'ready'", attacker.node_id
    )[0][0]
    assert left_to_train == 0
    MARGINS["16-2n-near-ties-steered-at-narrow-gaps"] = {
        "check": check,
        "num_leases": num_leases,
        "num_groups_passed_before": sum(passed for passed, _, _ in results),
        "num_groups_consumed": consumed_groups(warm_cluster, attacker.node_id),
        **{k: evidence[k] for k in ("p_value", "num_tokens", "num_near_ties", "num_near_ties_positive", "expected")},
    }


def test_an_honest_bf16_node_passes_its_windows(warm_cluster, bf16_policy):
    """The same node without the cheat, over two windows' worth of tokens: no check fails."""
    model, tokenizer = bf16_policy
    attacker, results, num_leases = caught_after(
        warm_cluster, model, tokenizer, lambda a, m, lease: a.generate(lease), max_leases=2 * NODE_WINDOW_TOKENS // 256
    )
    assert all(passed for passed, _, _ in results), [r for r in results if not r[0]][:2]
    tokens = warm_cluster.query(
        "SELECT COALESCE(SUM(num_tokens), 0) FROM node_tokens WHERE node_id = ?", attacker.node_id
    )[0][0]
    assert tokens >= NODE_WINDOW_TOKENS, f"{num_leases} leases held only {tokens} tokens"
    deadline = time.monotonic() + 60
    while consumed_groups(warm_cluster, attacker.node_id) == 0 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert consumed_groups(warm_cluster, attacker.node_id) > 0, "the honest node's groups were never trained on"
