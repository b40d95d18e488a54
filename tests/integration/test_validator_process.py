"""`rollproof validator run` as its own process: a coordinator that validates nothing itself hands
sampled groups to it under leases, and applies the verdicts it reports. A validator that takes work
and dies holds it only until its lease runs out."""

import dataclasses

import grpc
import pytest

from protocol.identity import Identity
from protocol.proto import validation_pb2, validation_pb2_grpc
from tests.adversarial.harness import Attacker, run, trainable_groups, wait_for_validation
from tests.integration.cluster import OPERATOR_TOKEN, Cluster, wait_for

LEASE_S = 3


@pytest.fixture
def cluster(tmp_path, tiny_model):
    cluster = Cluster(tmp_path, tiny_model, Identity.generate())
    cluster.publish_fixed_policy()
    cluster.start_coordinator(
        "--set",
        "validation.in_process=false",
        "--set",
        f"validation.lease_s={LEASE_S}",
        "--set",
        "validation.num_initial_checks=1000000",
        "--set",
        "validation.probation_tokens=0",  # a passed group is trainable at once
        "--set",
        "run.prompts_per_lease=2",
        "--set",
        "run.group_size=4",
        "--set",
        "run.sampling.max_tokens=24",
    )
    yield cluster
    cluster.stop_all()


@pytest.fixture
def trusted(tiny_model):
    from policy.model import load_model
    from policy.tokenizer import load_tokenizer
    from policy.weights import export_bf16_state, load_bf16_state

    model = load_model(tiny_model)
    load_bf16_state(model, export_bf16_state(model))
    return model, load_tokenizer(tiny_model)


def submit(cluster, trusted, tamper=None) -> str:
    model, tokenizer = trusted

    async def scenario():
        node = await Attacker(cluster, model, tokenizer).start()
        batch = node.generate(await node.lease())
        receipt = await node.submit(tamper(batch) if tamper else batch)
        await node.close()
        assert receipt.num_rejected == 0
        return node.node_id

    return run(scenario())


def edit_a_token(batch):
    group = batch.groups[0]
    rollout = group.rollouts[0]
    edited = dataclasses.replace(rollout, token_ids=(rollout.token_ids[0] % 20 + 3,) + rollout.token_ids[1:])
    groups = (dataclasses.replace(group, rollouts=(edited,) + group.rollouts[1:]),) + batch.groups[1:]
    return dataclasses.replace(batch, groups=groups)


def pending(cluster) -> int:
    return cluster.query("SELECT COUNT(*) FROM groups WHERE state = 'pending_validation'")[0][0]


def test_a_validator_process_checks_groups_and_the_coordinator_applies_its_verdicts(cluster, trusted):
    honest = submit(cluster, trusted)
    cheater = submit(cluster, trusted, edit_a_token)
    assert pending(cluster) == 4  # nothing validates inside this coordinator

    # A validator takes every group and dies without reporting: the groups wait for its lease.
    with cluster.channel() as channel:
        taken = validation_pb2_grpc.ValidatorServiceStub(channel).TakeValidation(
            validation_pb2.TakeValidationRequest(validator_id="dead", max_groups=64),
            metadata=(("authorization", f"Bearer {OPERATOR_TOKEN}"),),
            timeout=30,
        )
    assert len(taken.jobs) == 4
    malformed = validation_pb2.ReportValidationRequest(
        validator_id="dead",
        verdicts=[
            validation_pb2.ValidationVerdict(
                group_id=taken.jobs[0].group_id,
                passed=True,
                check="all",
                chunks=[validation_pb2.ChunkStatistics(mantissa_error_sum=float("nan"))],
            ),
        ],
    )
    with cluster.channel() as channel, pytest.raises(grpc.RpcError) as refused:
        validation_pb2_grpc.ValidatorServiceStub(channel).ReportValidation(
            malformed, metadata=(("authorization", f"Bearer {OPERATOR_TOKEN}"),), timeout=30
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "mantissa" in refused.value.details()
    assert pending(cluster) == 4

    validator = cluster.spawn(
        "validator",
        [
            "validator",
            "run",
            "--coordinator",
            cluster.address,
            "--model",
            str(cluster.model_dir),
            "--id",
            "v1",
        ],
        env={"ROLLPROOF_OPERATOR_TOKEN": OPERATOR_TOKEN},
    )
    wait_for(
        lambda: pending(cluster) == 0 or validator.popen.poll() is not None,
        180,
        "the validator process to decide every group",
    )
    assert validator.popen.poll() is None, validator.log()

    honest_results = wait_for_validation(cluster, honest)
    assert [passed for passed, _, _ in honest_results] == [True, True]
    assert trainable_groups(cluster, honest) == 2
    # The validator reported each passed group's chunks (rollouts of 24 tokens: one chunk each), and
    # they joined the node's window in the coordinator's store.
    assert cluster.query("SELECT COUNT(*) FROM node_chunks WHERE node_id = ?", honest)[0][0] == 2 * 4
    cheater_results = wait_for_validation(cluster, cheater)
    assert any(not passed and check in ("sampling", "commitment") for passed, check, _ in cheater_results)
    assert trainable_groups(cluster, cheater) == 0
    assert "verdicts applied" in validator.log()
    assert validator.terminate() == 0
