"""The attack suite of issue 7: each a misbehaving node against a real coordinator that fully
checks every submission. Each attack is rejected with the right reason and none of its
rollouts can reach the trainer (no group of the attacker is ready or consumed)."""

import copy
import dataclasses

import grpc
import pytest
import torch

from protocol.envelope import method_name, seal
from protocol.proto import service_pb2
from protocol.types import FinishReason
from tests.adversarial.harness import (
    MARGINS,
    Attacker,
    rejected_reasons,
    replace_rollout,
    run,
    trainable_groups,
    wait_for_validation,
)

FULL_CHECKS = {"sampling", "near_ties", "logprob_drift", "commitment", "commitment_pooled", "termination"}


def margin_of(check: str, evidence: dict) -> dict:
    """How far past its bound the attack landed."""
    allowed = evidence.get("allowed")
    if check == "sampling":
        return {k: evidence[k] for k in ("num_mismatches", "max_score_gap", "allowed_score_gap", "doubt_score_gap")}
    if check == "logprob_drift":
        return {"max_drift": evidence["max_drift"], "allowed": allowed, "doubt_drift": evidence["doubt_drift"]}
    if check == "commitment" and "exponent_mismatches" in evidence:
        return {k: evidence[k] for k in ("exponent_mismatches", "mantissa_error_mean", "mantissa_error_median")} | {
            "allowed": allowed
        }
    if check in ("commitment_pooled", "commitment_node_pooled"):
        return {k: evidence[k] for k in ("exponent_mismatches_per_chunk", "mantissa_error_mean")} | {"allowed": allowed}
    if check == "termination":
        return {"eos_logprob": evidence["eos_logprob"], "allowed_min": evidence["allowed_min"]}
    return evidence


def expect_full_check_failure(cluster, attacker, receipt, attack: str, expected_checks: set[str]):
    assert receipt.num_accepted > 0, f"{attack}: the cheap checks should not be what catches it: {receipt}"
    results = wait_for_validation(cluster, attacker.node_id)
    failures = [(check, evidence) for passed, check, evidence in results if not passed]
    assert failures, f"{attack}: passed every full check: {results}"
    check, evidence = failures[0]
    assert check in expected_checks, f"{attack}: failed {check}, expected one of {expected_checks}: {evidence}"
    assert trainable_groups(cluster, attacker.node_id) == 0
    MARGINS[attack] = {"check": check, **margin_of(check, evidence)}


def expect_cheap_rejection(cluster, attacker, receipt, attack: str, reason: str):
    assert reason in rejected_reasons(receipt), f"{attack}: {receipt}"
    assert trainable_groups(cluster, attacker.node_id) == 0 or receipt.num_accepted > 0
    MARGINS[attack] = {"check": reason, "exact": True}


def perturbed(model, scale: float):
    tampered = copy.deepcopy(model)
    with torch.no_grad():
        tampered.model.layers[1].mlp.down_proj.weight.mul_(scale)
    return tampered


def fp16_arithmetic(model):
    """The whole forward pass in fp16 (the bf16 policy weights are exact in fp16; the
    activations are not)."""
    return copy.deepcopy(model).to(torch.float16)


def int8_linear_weights(model):
    """Linear layers quantized to int8 per output row, dequantized for the matmul."""
    tampered = copy.deepcopy(model)
    with torch.no_grad():
        for module in tampered.modules():
            if isinstance(module, torch.nn.Linear):
                weight = module.weight
                scale = weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
                weight.copy_(torch.round(weight / scale).clamp(-127, 127) * scale)
    return tampered


@pytest.mark.parametrize(
    ("attack", "make_model"),
    [
        ("1-weights-perturbed-1.02", lambda m: perturbed(m, 1.02)),
        ("2-lower-precision-fp16", fp16_arithmetic),
        ("2-lower-precision-int8-linear", int8_linear_weights),
    ],
)
def test_generation_with_another_model(cluster, trusted, attack, make_model):
    model, tokenizer = trusted

    async def scenario():
        attacker = await Attacker(cluster, make_model(model), tokenizer).start()
        receipt = await attacker.submit(attacker.generate(await attacker.lease()))
        await attacker.close()
        return attacker, receipt

    attacker, receipt = run(scenario())
    expect_full_check_failure(cluster, attacker, receipt, attack, FULL_CHECKS)


def _honest(cluster, trusted, tamper):
    """Lease, generate honestly, apply `tamper(batch, attacker)`, submit."""
    model, tokenizer = trusted

    async def scenario():
        attacker = await Attacker(cluster, model, tokenizer).start()
        lease = await attacker.lease()
        batch = tamper(attacker.generate(lease), attacker, lease)
        receipt = await attacker.submit(batch)
        await attacker.close()
        return attacker, receipt

    return run(scenario())


def _rescored(attacker, lease, batch):
    """The batch with every claimed reward recomputed, as a careful attacker would."""
    from envs import Split
    from policy.scoring import completion_text

    groups = []
    for group in batch.groups:
        problem = attacker.task.problem(Split.TRAIN, attacker.run_info.run_seed, group.prompt_index)
        rollouts = tuple(
            dataclasses.replace(
                r, claimed_reward=attacker.task.reward(problem, completion_text(attacker.tokenizer, r.token_ids))
            )
            for r in group.rollouts
        )
        groups.append(dataclasses.replace(group, rollouts=rollouts))
    return dataclasses.replace(batch, groups=tuple(groups))


def _edit_token(batch, attacker, lease):
    rollout = batch.groups[0].rollouts[0]
    position = len(rollout.token_ids) // 2
    replacement = 40 if rollout.token_ids[position] != 40 else 41
    tokens = list(rollout.token_ids)
    tokens[position] = replacement
    return _rescored(attacker, lease, replace_rollout(batch, 0, 0, token_ids=tuple(tokens)))


def _fabricate_logprobs(batch, attacker, lease):
    rollout = batch.groups[0].rollouts[0]
    return replace_rollout(batch, 0, 0, logprobs=tuple(min(0.0, lp + 0.5) for lp in rollout.logprobs))


def _garbage_commitment(batch, attacker, lease):
    rollout = batch.groups[0].rollouts[0]
    garbage = bytes((b * 7 + 3) % 256 for b in rollout.commitment)
    return replace_rollout(batch, 0, 0, commitment=garbage)


def _truncate_with_eos(batch, attacker, lease):
    eos = attacker.tokenizer.eos_token_id
    rollout = next(r for r in batch.groups[0].rollouts if r.finish_reason == FinishReason.LENGTH)
    cut = 5
    tokens = (*rollout.token_ids[:cut], eos)
    commitment = rollout.commitment[:258]
    changed = replace_rollout(
        batch,
        0,
        rollout.sample_index,
        token_ids=tokens,
        sampled_mask=(True,) * len(tokens),
        logprobs=rollout.logprobs[: len(tokens)],
        commitment=commitment,
        finish_reason=FinishReason.STOP,
    )
    return _rescored(attacker, lease, changed)


@pytest.mark.parametrize(
    ("attack", "tamper", "expected"),
    [
        ("3-completion-tokens-edited", _edit_token, {"sampling", "commitment", "logprob_drift"}),
        ("6-fabricated-logprobs", _fabricate_logprobs, {"logprob_drift"}),
        ("11-garbage-commitment", _garbage_commitment, {"commitment"}),
        ("14-stop-without-eos-by-truncation", _truncate_with_eos, {"sampling", "termination", "commitment"}),
    ],
)
def test_tampering_after_generation(cluster, trusted, attack, tamper, expected):
    attacker, receipt = _honest(cluster, trusted, tamper)
    expect_full_check_failure(cluster, attacker, receipt, attack, expected)


def test_4_cherry_picking(cluster, trusted):
    """Generate 3G samples per prompt with seeds of its own choosing, submit the best G."""
    from policy.engine import GenerationRequest
    from protocol.sampling import derive_sample_seed

    model, tokenizer = trusted

    def cherry_pick(batch, attacker, lease):
        groups = []
        for position, (prompt, group) in enumerate(zip(lease.prompts, batch.groups, strict=True)):
            requests = [
                GenerationRequest(
                    prompt.prompt_token_ids, lease.sampling, derive_sample_seed(lease.sampling_seed + 1, position, i)
                )
                for i in range(3 * lease.group_size)
            ]
            results = attacker.engine.generate(requests)
            best = sorted(results, key=lambda r: -len(r.token_ids))[: lease.group_size]
            rollouts = tuple(
                dataclasses.replace(
                    r0,
                    token_ids=b.token_ids,
                    sampled_mask=(True,) * len(b.token_ids),
                    logprobs=b.logprobs,
                    commitment=b.commitment,
                    finish_reason=b.finish_reason,
                )
                for r0, b in zip(group.rollouts, best, strict=True)
            )
            groups.append(dataclasses.replace(group, rollouts=rollouts))
        return _rescored(attacker, lease, dataclasses.replace(batch, groups=tuple(groups)))

    attacker, receipt = _honest(cluster, trusted, cherry_pick)
    expect_full_check_failure(cluster, attacker, receipt, "4-cherry-picking", {"sampling"})


def test_5_inflated_reward(cluster, trusted):
    def inflate(batch, attacker, lease):
        rollout = batch.groups[0].rollouts[0]
        return replace_rollout(batch, 0, 0, claimed_reward=1.0 if rollout.claimed_reward < 1 else 0.0)

    attacker, receipt = _honest(cluster, trusted, inflate)
    expect_cheap_rejection(cluster, attacker, receipt, "5-inflated-reward", "REWARD_MISMATCH")


def test_8_replayed_batch_and_duplicate_rollouts(cluster, trusted):
    model, tokenizer = trusted

    async def scenario():
        attacker = await Attacker(cluster, model, tokenizer).start()
        batch = attacker.generate(await attacker.lease())
        first = await attacker.submit(batch)
        replayed = await attacker.submit(dataclasses.replace(batch, engine="torch-cpu-float32 "))
        doubled = attacker.generate(await attacker.lease())
        doubled = dataclasses.replace(doubled, groups=(doubled.groups[0], doubled.groups[0]))
        twice = await attacker.submit(doubled)
        await attacker.close()
        return first, replayed, twice

    first, replayed, twice = run(scenario())
    assert first.num_rejected == 0
    assert rejected_reasons(replayed) == {"DUPLICATE"} and replayed.num_accepted == 0
    assert "DUPLICATE" in rejected_reasons(twice)
    MARGINS["8-replayed-batch"] = {"check": "DUPLICATE", "exact": True}


def test_9_forged_signature_and_another_nodes_id(cluster, trusted):
    model, tokenizer = trusted

    async def scenario():
        victim = await Attacker(cluster, model, tokenizer).start()
        attacker = await Attacker(cluster, model, tokenizer).start()
        payload = service_pb2.HeartbeatRequest(policy_version=1).SerializeToString()
        envelope = seal(attacker.identity, method_name("NodeService", "Heartbeat"), payload)
        envelope.signer_public_key = victim.identity.public_key
        outcomes = []
        for forged in (envelope,):
            try:
                await attacker.client.stub.Heartbeat(forged, timeout=10)
                outcomes.append("accepted")
            except grpc.aio.AioRpcError as error:
                outcomes.append((error.code(), error.details()))
        batch = attacker.generate(await attacker.lease())
        from protocol import convert

        impostor = seal(
            attacker.identity,
            method_name("NodeService", "SubmitRollouts"),
            convert.batch_to_proto(batch).SerializeToString(),
        )
        impostor.signer_public_key = victim.identity.public_key
        try:
            await attacker.client.stub.SubmitRollouts(impostor, timeout=10)
            outcomes.append("accepted")
        except grpc.aio.AioRpcError as error:
            outcomes.append((error.code(), error.details()))
        await victim.close()
        await attacker.close()
        return outcomes

    for outcome in run(scenario()):
        assert outcome != "accepted"
        assert outcome[0] == grpc.StatusCode.UNAUTHENTICATED and "bad_signature" in outcome[1]
    MARGINS["9-forged-signature"] = {"check": "bad_signature", "exact": True}


def test_10_lease_not_held(cluster, trusted):
    model, tokenizer = trusted

    async def scenario():
        owner = await Attacker(cluster, model, tokenizer).start()
        thief = await Attacker(cluster, model, tokenizer).start()
        receipt = await thief.submit(owner.generate(await owner.lease()))
        await owner.close()
        await thief.close()
        return thief, receipt

    thief, receipt = run(scenario())
    expect_cheap_rejection(cluster, thief, receipt, "10-lease-not-held", "LEASE_NOT_OWNED")
    assert receipt.num_accepted == 0


@pytest.mark.parametrize("cut", ["missing", "truncated"])
def test_11_missing_or_truncated_commitment(cluster, trusted, cut):
    def strip(batch, attacker, lease):
        rollout = batch.groups[0].rollouts[0]
        return replace_rollout(batch, 0, 0, commitment=b"" if cut == "missing" else rollout.commitment[:-7])

    attacker, receipt = _honest(cluster, trusted, strip)
    expect_cheap_rejection(cluster, attacker, receipt, f"11-{cut}-commitment", "COMMITMENT_MISMATCH")


def test_12_another_nodes_rollouts_copied(cluster, trusted):
    model, tokenizer = trusted

    async def scenario():
        honest = await Attacker(cluster, model, tokenizer).start()
        copier = await Attacker(cluster, model, tokenizer).start()
        original = honest.generate(await honest.lease())
        await honest.submit(original)
        lease = await copier.lease()
        groups = tuple(
            dataclasses.replace(source, prompt_index=prompt.prompt_index)
            for source, prompt in zip(original.groups, lease.prompts, strict=True)
        )
        copied = _rescored(copier, lease, dataclasses.replace(original, lease_id=lease.lease_id, groups=groups))
        receipt = await copier.submit(copied)
        await honest.close()
        await copier.close()
        return copier, receipt

    copier, receipt = run(scenario())
    expect_full_check_failure(cluster, copier, receipt, "12-copied-rollouts", {"sampling", "commitment"})


def test_13_substituted_prompt(cluster, trusted):
    from node.generate import generate_batch
    from protocol.types import LeasedPrompt

    def substitute(batch, attacker, lease):
        easy = tuple(attacker.tokenizer.encode("1+1="))
        swapped = dataclasses.replace(
            lease, prompts=tuple(LeasedPrompt(p.prompt_index, "1+1=", easy) for p in lease.prompts)
        )
        generated = generate_batch(
            attacker.engine,
            attacker.tokenizer,
            attacker.task,
            attacker.run_info.run_seed,
            swapped,
            attacker.engine_name,
        ).batch
        return _rescored(attacker, lease, generated)

    attacker, receipt = _honest(cluster, trusted, substitute)
    expect_full_check_failure(
        cluster, attacker, receipt, "13-substituted-prompt", {"sampling", "commitment", "logprob_drift"}
    )


def test_14_stop_without_eos(cluster, trusted):
    def no_eos(batch, attacker, lease):
        rollout = batch.groups[0].rollouts[0]
        tokens = tuple(t for t in rollout.token_ids if t != attacker.tokenizer.eos_token_id) or (40,)
        return replace_rollout(
            batch,
            0,
            0,
            token_ids=tokens,
            sampled_mask=(True,) * len(tokens),
            logprobs=rollout.logprobs[: len(tokens)],
            finish_reason=FinishReason.STOP,
        )

    attacker, receipt = _honest(cluster, trusted, no_eos)
    expect_cheap_rejection(cluster, attacker, receipt, "14-stop-without-eos", "FINISH_REASON_INCONSISTENT")


def test_15_malformed_and_oversized_messages(cluster, trusted):
    model, tokenizer = trusted

    async def scenario():
        attacker = await Attacker(cluster, model, tokenizer).start()
        codes = []
        for payload in (b"\xff\xfe\xfd", b"\x0a" + b"\x01" * 400_000):
            try:
                await attacker.client.submit(payload)
                codes.append("accepted")
            except grpc.aio.AioRpcError as error:
                codes.append(error.code())
        await attacker.close()
        return codes

    assert run(scenario()) == [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED]
    MARGINS["15-malformed-oversized"] = {"check": "INVALID_ARGUMENT / RESOURCE_EXHAUSTED", "exact": True}


def int8_bf16_attack_until_caught(cluster, model, tokenizer, max_chunks: int):
    """A node running int8 linear layers in bf16 under a bf16 declaration submits until a full check
    fails it (or max_chunks chunks went by); returns the attacker, its full-check results and the
    first failure's check and evidence, asserting that there is one, of the commitment family (or the
    node's rate of doubts, which those checks raise)."""
    cheat = int8_linear_weights(model).to(torch.bfloat16)

    async def scenario():
        attacker = await Attacker(cluster, cheat, tokenizer, engine_name="torch-cpu-bfloat16").start()
        num_chunks = 0
        while num_chunks < max_chunks:
            batch = attacker.generate(await attacker.lease())
            num_chunks += sum(-(-len(r.token_ids) // 32) for g in batch.groups for r in g.rollouts)
            await attacker.submit(batch)
            if not all(passed for passed, _, _ in wait_for_validation(cluster, attacker.node_id)):
                break
        await attacker.close()
        return attacker

    attacker = run(scenario())
    results = wait_for_validation(cluster, attacker.node_id)
    failures = [(check, evidence) for passed, check, evidence in results if not passed]
    assert failures, f"passed {len(results)} full checks"
    check, evidence = failures[0]
    # or, where its groups' own commitment checks doubt it far more often than honest nodes, its doubt rate
    assert check in {"commitment", "commitment_node_pooled", "node_doubt_rate"}, evidence
    return attacker, results, check, evidence


def test_2_int8_under_a_bf16_declaration_is_caught_over_its_groups(cluster, trusted):
    """int8 linear layers run in bf16 by a node that declares bf16, whose bounds must let honest
    cross-engine drift pass: most of its groups pass one by one; its last NODE_WINDOW_CHUNKS chunks
    pooled do not. By chance one chunk may fail first, in any group, the first included (about one
    group in sixteen fails so). Either way none of its groups, those that had passed included, can
    reach the trainer."""
    from coordinator.validation import NODE_WINDOW_CHUNKS

    model, tokenizer = trusted
    attacker, results, check, evidence = int8_bf16_attack_until_caught(
        cluster, model, tokenizer, 2 * NODE_WINDOW_CHUNKS
    )
    assert trainable_groups(cluster, attacker.node_id) == 0
    MARGINS["2-int8-linear-declared-bf16"] = {
        "check": check,
        "num_groups_passed_before": sum(passed for passed, _, _ in results),
        **margin_of(check, evidence),
    }


def test_repeat_offender_is_banned_and_loses_its_credit(cluster, trusted):
    model, tokenizer = trusted

    async def scenario():
        attacker = await Attacker(cluster, perturbed(model, 1.05), tokenizer).start()
        for _ in range(2):
            await attacker.submit(attacker.generate(await attacker.lease()))
            wait_for_validation(cluster, attacker.node_id)  # one strike per failed submission
        await attacker.close()
        return attacker

    attacker = run(scenario())
    results = wait_for_validation(cluster, attacker.node_id)
    assert not any(passed for passed, _, _ in results)

    banned, strikes = cluster.query("SELECT banned, num_strikes FROM nodes WHERE node_id = ?", attacker.node_id)[0]
    assert banned and strikes >= 2
    assert (
        cluster.query(
            "SELECT COUNT(*) FROM contributions WHERE node_id = ? AND voided = 0 AND settled = 0", attacker.node_id
        )[0][0]
        == 0
    )
    assert trainable_groups(cluster, attacker.node_id) == 0


def test_7_older_policy_claimed_as_current(cluster, trusted):
    """Runs last: it publishes version 2, so leases from here on are for version 2."""
    from policy.weights import export_bf16_state
    from trainer.client import TrainerClient
    from trainer.publish import PolicyPublisher

    model, tokenizer = trusted
    client = TrainerClient(cluster.address, cluster.trainer_identity, tls=cluster.coordinator_tls)
    publisher = PolicyPublisher(cluster.trainer_identity, "demo", client)
    publisher.resume(1, export_bf16_state(model))
    publisher.publish_model(2, perturbed(model, 1.02))
    client.close()

    async def scenario():
        attacker = await Attacker(cluster, model, tokenizer).start()
        lease = await attacker.lease()
        assert lease.policy_version == 2
        old_version_label = await attacker.submit(dataclasses.replace(attacker.generate(lease), policy_version=1))
        old_weights = await attacker.submit(attacker.generate(await attacker.lease()))
        await attacker.close()
        return attacker, old_version_label, old_weights

    attacker, old_version_label, old_weights = run(scenario())
    assert rejected_reasons(old_version_label) == {"WRONG_POLICY_VERSION"}
    expect_full_check_failure(cluster, attacker, old_weights, "7-older-policy-as-current", FULL_CHECKS)
