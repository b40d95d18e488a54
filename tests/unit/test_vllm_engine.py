"""The vLLM engine (policy/vllm_engine.py) on the default tiny model: same rule, results the validator
accepts, policy updates applied in place. Skipped without vLLM (its install: docs/operations.md#the-vllm-engine)."""

import dataclasses

import numpy as np
import pytest

pytest.importorskip("vllm")

from coordinator.validation import NODE_WINDOW_CHUNKS  # noqa: E402
from coordinator.verdicts import TOLERANCES, check_rollout  # noqa: E402
from envs import Split, get_task  # noqa: E402
from policy.bootstrap import bootstrapped_model_dir  # noqa: E402
from policy.engine import EngineRequestError, GenerationEngine, GenerationRequest, TorchEngine  # noqa: E402
from policy.model import load_model  # noqa: E402
from policy.prefill import ClaimedRollout, replay  # noqa: E402
from policy.tokenizer import EOS_ID, load_tokenizer  # noqa: E402
from policy.vllm_engine import VllmEngine  # noqa: E402
from policy.weights import NodePolicy, export_bf16_state, load_bf16_state  # noqa: E402
from protocol import commitment, manifest  # noqa: E402
from protocol import sampling as rule  # noqa: E402
from protocol.identity import Identity  # noqa: E402
from protocol.types import FinishReason, Rollout, SamplingParams  # noqa: E402

pytestmark = pytest.mark.vllm

RUN = "run-vllm"
TRAINER = Identity.from_seed(bytes([5]) * 32)
GROUP_SIZE = 4


@pytest.fixture(scope="module")
def model_dir():
    return bootstrapped_model_dir()


@pytest.fixture(scope="module")
def engine(model_dir):
    return VllmEngine(model_dir, [EOS_ID], max_batch_size=64)


@pytest.fixture(scope="module")
def torch_model(model_dir):
    return load_model(model_dir)


def task_requests(model_dir, num_prompts: int, params: SamplingParams, lease_seed: int) -> list[GenerationRequest]:
    """GROUP_SIZE samples of each of the first prompts of the default task, seeded as a lease is."""
    task, tokenizer = get_task("addition"), load_tokenizer(model_dir)
    return [
        GenerationRequest(
            tuple(tokenizer.encode(task.problem(Split.TRAIN, 0, index).prompt)),
            params,
            rule.derive_sample_seed(lease_seed, index, sample),
        )
        for index in range(num_prompts)
        for sample in range(GROUP_SIZE)
    ]


def test_vllm_engine_implements_the_interface(engine):
    assert isinstance(engine, GenerationEngine)


def test_default_model_generates_through_vllm_like_the_torch_engine(engine, model_dir, torch_model):
    requests = task_requests(model_dir, 16, SamplingParams(1.0, max_tokens=24), lease_seed=3)
    results = engine.generate(requests)
    reference = TorchEngine(torch_model, [EOS_ID], max_batch_size=64).generate(requests)
    assert sum(r.token_ids == t.token_ids for r, t in zip(results, reference, strict=True)) >= 0.95 * len(requests)
    assert {r.finish_reason for r in results} == {FinishReason.STOP}
    for result, expected in zip(results, reference, strict=True):
        assert len(result.token_ids) == len(result.logprobs) == len(result.margins)
        assert all(lp <= 0.0 for lp in result.logprobs) and all(m >= 0.0 for m in result.margins)
        if result.token_ids == expected.token_ids:
            np.testing.assert_allclose(result.logprobs, expected.logprobs, atol=1e-4)


def test_same_seed_same_completion_in_any_batch(engine, model_dir):
    requests = task_requests(model_dir, 8, SamplingParams(1.0, max_tokens=24), lease_seed=4)
    together = engine.generate(requests)
    alone = [engine.generate([request])[0] for request in requests[:4]]
    assert [r.token_ids for r in alone] == [r.token_ids for r in together[:4]]
    assert len({r.token_ids for r in together}) > 1


def test_length_limit_and_long_requests(engine, model_dir):
    requests = task_requests(model_dir, 2, SamplingParams(1.5, max_tokens=3), lease_seed=5)
    for result in engine.generate(requests):
        assert len(result.token_ids) <= 3
        assert (result.finish_reason == FinishReason.LENGTH) == (
            len(result.token_ids) == 3 and result.token_ids[-1] != EOS_ID
        )
    too_long = dataclasses.replace(requests[0], sampling=SamplingParams(1.0, max_tokens=engine.max_model_len))
    with pytest.raises(EngineRequestError, match="positions"):
        engine.generate([too_long])
    with pytest.raises(EngineRequestError):
        engine.generate([dataclasses.replace(requests[0], prompt_token_ids=())])


def full_check(model, requests, results, dtype: str = "float32") -> list:
    """The validator's full check (coordinator/verdicts.py) of each group of GROUP_SIZE results,
    the node's window of chunks included."""
    tolerances = TOLERANCES[dtype]
    node_checks = []
    claims = [
        ClaimedRollout(q.prompt_token_ids, r.token_ids, r.logprobs, r.commitment, q.sampling, q.seed)
        for q, r in zip(requests, results, strict=True)
    ]
    reports = replay(model, claims, tolerances.logit_tolerance)
    verdicts = []
    for start in range(0, len(results), GROUP_SIZE):
        group_checks = []
        for sample, (report, result) in enumerate(
            zip(reports[start : start + GROUP_SIZE], results[start : start + GROUP_SIZE], strict=True)
        ):
            rollout = Rollout(
                sample,
                result.token_ids,
                (True,) * len(result.token_ids),
                result.logprobs,
                result.commitment,
                result.finish_reason,
                0.0,
            )
            verdicts.append(check_rollout(report, rollout, tolerances))
            group_checks.extend(report.commitment_checks)
        assert commitment.pool(group_checks).passes(tolerances.thresholds)
        node_checks.extend(group_checks)
        if len(node_checks) >= NODE_WINDOW_CHUNKS:  # the coordinator's window of the node's newest chunks
            window = commitment.pool(node_checks[-NODE_WINDOW_CHUNKS:])
            assert window.passes(tolerances.thresholds), window
    return verdicts


def test_validator_accepts_vllm_rollouts(engine, model_dir, torch_model):
    requests = (
        task_requests(model_dir, 32, SamplingParams(1.0, max_tokens=32), lease_seed=6)
        + task_requests(model_dir, 16, SamplingParams(0.7, top_k=8, top_p=0.9, max_tokens=32), lease_seed=7)
        + task_requests(model_dir, 8, SamplingParams(1.3, max_tokens=40), lease_seed=8)
        + task_requests(model_dir, 8, SamplingParams(0.0, max_tokens=32), lease_seed=9)
    )
    results = engine.generate(requests)
    assert len(results) >= 200
    verdicts = full_check(torch_model, requests, results)
    assert [v.check for v in verdicts if not v.passed] == []


def test_validator_accepts_bf16_vllm_rollouts(model_dir):
    """A vLLM node in bf16, replayed by the torch validator in bf16: other kernels on each side (vLLM's
    CPU attention and GEMMs against transformers'), so more drift than within one engine (README,
    "Checks on a submission"). Every group passes the bf16 full check."""
    bf16_engine = VllmEngine(model_dir, [EOS_ID], max_batch_size=64, dtype="bfloat16")
    requests = (
        task_requests(model_dir, 128, SamplingParams(1.0, max_tokens=32), lease_seed=21)
        + task_requests(model_dir, 128, SamplingParams(0.7, top_k=5, max_tokens=32), lease_seed=22)
        + task_requests(model_dir, 128, SamplingParams(1.0, top_p=0.9, max_tokens=32), lease_seed=23)
    )
    results = bf16_engine.generate(requests)
    assert sum(len(r.token_ids) for r in results) >= 7000
    verdicts = full_check(load_model(model_dir, dtype="bfloat16"), requests, results, "bfloat16")
    assert [v.check for v in verdicts if not v.passed] == []


def signed_update(version: int, state, base=None):
    if base is None:
        update = manifest.build_keyframe(RUN, version, state)
    else:
        update = manifest.build_delta(RUN, version, version - 1, base, state)
    blobs = {ref.hash: blob for ref, blob in zip(update.manifest.blobs, update.blobs, strict=True)}
    return manifest.sign_manifest(TRAINER, update.manifest), blobs


def test_policy_update_is_applied_in_place_and_used_by_the_next_rollouts(model_dir, torch_model, tiny_model):
    engine = VllmEngine(model_dir, [EOS_ID], max_batch_size=32)
    policy = NodePolicy(engine.policy_model, run_id=RUN, trainer_public_key=TRAINER.public_key)
    engine.follow(policy)
    trained, untrained = export_bf16_state(torch_model), export_bf16_state(load_model(tiny_model))
    requests = task_requests(model_dir, 8, SamplingParams(1.0, max_tokens=24), lease_seed=10)

    policy.apply(*signed_update(1, untrained))
    before = engine.generate(requests)
    policy.apply(*signed_update(2, trained, base=untrained))
    after = engine.generate(requests)

    reference = load_model(tiny_model)
    load_bf16_state(reference, trained)
    expected = TorchEngine(reference, [EOS_ID]).generate(requests)
    assert sum(r.token_ids == e.token_ids for r, e in zip(after, expected, strict=True)) >= 0.95 * len(requests)
    for result, reference_result in zip(after, expected, strict=True):
        if result.token_ids == reference_result.token_ids:
            np.testing.assert_allclose(result.logprobs, reference_result.logprobs, atol=1e-4)
    assert sum(r.token_ids == b.token_ids for r, b in zip(after, before, strict=True)) < 0.5 * len(requests)
    assert [v.check for v in full_check(reference, requests, after) if not v.passed] == []
