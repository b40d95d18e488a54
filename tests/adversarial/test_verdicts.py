"""Verdicts (issue 16): a node's groups are trainable only after its first node-level verdict
(probation), a failing submission costs one strike however the validator batches its groups, and
honest drift is never struck on thin evidence. Against a real coordinator that fully checks every
submission, with a stand-in trainer that consumes every ready group as soon as it is ready."""

import pytest
import torch

from coordinator.validation import MIN_WINDOW_CHUNKS, NODE_WINDOW_CHUNKS
from tests.adversarial.harness import (
    MARGINS,
    Attacker,
    consumed_groups,
    consuming_trainer,
    run,
    trainable_groups,
    wait_for_validation,
)
from tests.adversarial.test_attacks import int8_bf16_attack_until_caught, perturbed
from tests.integration.cluster import checking_cluster

PROBATION_TOKENS = 512


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_model):
    """This module's own coordinator (the attack suite's publishes a second version at its end)."""
    with checking_cluster(
        tmp_path_factory.mktemp("verdicts"),
        tiny_model,
        f"validation.probation_tokens={PROBATION_TOKENS}",
        "run.max_backlog_groups=0",
    ) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def greedy_trainer(cluster):
    with consuming_trainer(cluster):
        yield


def _node(cluster, node_id: str) -> tuple[int, int, int, int]:
    """(num_strikes, banned, on_probation, num_checked_tokens)"""
    return cluster.query(
        "SELECT num_strikes, banned, on_probation, num_checked_tokens FROM nodes WHERE node_id = ?", node_id
    )[0]


def with_attention(model, implementation: str):
    model.config._attn_implementation = implementation
    return model


def test_one_submission_with_two_bad_groups_is_one_strike(cluster, trusted, greedy_trainer):
    """Both groups of the submission fail, checked by the validator in one pass: one strike, no ban
    (max_strikes 2); every group of the node quarantined, none trained on."""
    model, tokenizer = trusted

    async def scenario():
        attacker = await Attacker(cluster, perturbed(model, 1.05), tokenizer).start()
        receipt = await attacker.submit(attacker.generate(await attacker.lease()))
        await attacker.close()
        return attacker, receipt

    attacker, receipt = run(scenario())
    assert receipt.num_accepted == 16
    results = wait_for_validation(cluster, attacker.node_id)
    assert results and not any(passed for passed, _, _ in results)
    strikes, banned, _, _ = _node(cluster, attacker.node_id)
    assert (strikes, banned) == (1, 0)
    states = {state for (state,) in cluster.query("SELECT state FROM groups WHERE node_id = ?", attacker.node_id)}
    assert states <= {"rejected", "quarantined"}
    assert trainable_groups(cluster, attacker.node_id) == 0 and consumed_groups(cluster, attacker.node_id) == 0


@pytest.fixture(scope="module")
def cluster_without_validator(tmp_path_factory, tiny_model):
    """A coordinator whose groups only a validator the test plays checks, as many a pass as it likes."""
    with checking_cluster(
        tmp_path_factory.mktemp("verdicts-by-hand"), tiny_model, "validation.in_process=false"
    ) as cluster:
        yield cluster


@pytest.mark.parametrize("groups_per_pass", [1, 2])
def test_one_strike_per_submission_however_the_validator_batches(
    cluster_without_validator, trusted, tiny_model, groups_per_pass
):
    """The same two bad groups of one submission, checked one per pass or both in one pass, each
    pass's verdicts reported (and reported again): one strike either way."""
    from coordinator.validation import GroupChecker, job_from_proto, verdict_to_proto
    from policy.model import load_model
    from policy.weights import export_bf16_state
    from protocol.proto import validation_pb2, validation_pb2_grpc
    from tests.integration.cluster import OPERATOR_TOKEN
    from tests.unit.test_validation_checks import FixedHistory

    cluster = cluster_without_validator
    model, tokenizer = trusted

    async def scenario():
        attacker = await Attacker(cluster, perturbed(model, 1.05), tokenizer).start()
        receipt = await attacker.submit(attacker.generate(await attacker.lease()))
        await attacker.close()
        return attacker, receipt

    attacker, receipt = run(scenario())
    assert receipt.num_accepted == 16
    checker = GroupChecker(FixedHistory(export_bf16_state(load_model(tiny_model))), tiny_model)
    operator = (("authorization", f"Bearer {OPERATOR_TOKEN}"),)
    with cluster.channel() as channel:
        stub = validation_pb2_grpc.ValidatorServiceStub(channel)
        while True:
            work = stub.TakeValidation(
                validation_pb2.TakeValidationRequest(validator_id="by-hand", max_groups=groups_per_pass),
                metadata=operator,
                timeout=30,
            )
            if not work.jobs:
                break
            jobs = [job_from_proto(job) for job in work.jobs]
            report = validation_pb2.ReportValidationRequest(
                validator_id="by-hand",
                verdicts=[
                    verdict_to_proto(job.group_id, verdict)
                    for job, verdict in zip(jobs, checker.check(jobs), strict=True)
                ],
            )
            for _ in range(2):  # a re-report changes nothing
                stub.ReportValidation(report, metadata=operator, timeout=30)
    results = wait_for_validation(cluster, attacker.node_id)
    assert results and not any(passed for passed, _, _ in results)
    strikes, banned, _, _ = _node(cluster, attacker.node_id)
    assert (strikes, banned) == (1, 0)
    assert trainable_groups(cluster, attacker.node_id) == 0


def _run_honest(cluster, model, tokenizer, engine_name: str, num_leases: int) -> str:
    async def scenario():
        node = await Attacker(cluster, model, tokenizer, engine_name=engine_name).start()
        for _ in range(num_leases):
            await node.submit(node.generate(await node.lease()))
        await node.close()
        return node

    node = run(scenario())
    results = wait_for_validation(cluster, node.node_id, timeout_s=600)
    failures = [(check, evidence) for passed, check, evidence in results if not passed]
    assert failures == [], failures[:3]
    strikes, banned, on_probation, checked_tokens = _node(cluster, node.node_id)
    assert (strikes, banned) == (0, 0)
    assert checked_tokens >= PROBATION_TOKENS and not on_probation, (checked_tokens, on_probation)
    return node.node_id


@pytest.mark.parametrize(
    ("engine_name", "dtype", "attention"),
    [
        ("torch-cpu-float32", torch.float32, "eager"),
        ("torch-cpu-bfloat16", torch.bfloat16, "eager"),
        ("torch-cpu-bfloat16", torch.bfloat16, "sdpa"),
    ],
)
def test_honest_nodes_pass_probation_and_are_never_struck(
    cluster, trusted, greedy_trainer, engine_name, dtype, attention
):
    """An honest node on another attention kernel than the validator's, in fp32 and bf16: every
    full check passed, no strike, probation passed, its groups trained on."""
    import copy

    model, tokenizer = trusted
    num_leases = -(-MIN_WINDOW_CHUNKS // 16) + 2  # 16 rollouts, a chunk each at least, a lease
    node_id = _run_honest(
        cluster,
        with_attention(copy.deepcopy(model).to(dtype), attention),
        tokenizer,
        engine_name,
        num_leases=num_leases,
    )
    assert trainable_groups(cluster, node_id) == 2 * num_leases


@pytest.mark.slow
def test_honest_bf16_nodes_over_a_long_run_are_never_struck(cluster, trusted, greedy_trainer):
    import copy

    model, tokenizer = trusted
    for attention in ("eager", "sdpa"):
        node_id = _run_honest(
            cluster,
            with_attention(copy.deepcopy(model).to(torch.bfloat16), attention),
            tokenizer,
            "torch-cpu-bfloat16",
            num_leases=60,
        )
        assert trainable_groups(cluster, node_id) == 120


def test_a_node_caught_on_probation_had_none_of_its_groups_trained_on(cluster, trusted, greedy_trainer):
    """int8 linear layers under a bf16 declaration pass group by group; the node's window keeps it on
    probation from MIN_WINDOW_CHUNKS chunks on (over the bound, too little evidence to strike) and fails
    it once full (or by chance one chunk fails first). Meanwhile the trainer consumed every ready group it could, and
    none of this node's: its groups were held."""
    model, tokenizer = trusted
    attacker, results, check, evidence = int8_bf16_attack_until_caught(
        cluster, model, tokenizer, NODE_WINDOW_CHUNKS + 64
    )
    consumed_when_caught = cluster.query(
        "SELECT num_groups_consumed FROM validation_results WHERE node_id = ? AND passed = 0", attacker.node_id
    )
    assert consumed_when_caught == [(0,)]
    assert consumed_groups(cluster, attacker.node_id) == 0 and trainable_groups(cluster, attacker.node_id) == 0
    MARGINS["16-caught-on-probation-int8-declared-bf16"] = {
        "check": check,
        "num_groups_passed_before": sum(passed for passed, _, _ in results),
        "num_groups_consumed": 0,
        **{k: evidence.get(k) for k in ("num_chunks", "mantissa_error_mean", "allowed")},
    }
