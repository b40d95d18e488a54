"""The torch generation engine and the validator prefill (policy/engine.py, policy/prefill.py)."""

import copy
import dataclasses
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from policy.engine import EngineRequestError, GenerationEngine, GenerationRequest, TorchEngine, chunk_points
from policy.prefill import ClaimedRollout, prefill, replay
from protocol import commitment
from protocol import sampling as rule
from protocol.types import FinishReason, SamplingParams

STOP_TOKEN = 1
VOCAB_SIZE = 64


def tiny_model(seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        initializer_range=0.2,
    )
    return Qwen2ForCausalLM(config).eval()


@pytest.fixture(scope="module")
def model() -> Qwen2ForCausalLM:
    return tiny_model()


def make_requests(num_requests: int, params: SamplingParams, lease_seed: int = 7) -> list[GenerationRequest]:
    rng = np.random.default_rng(lease_seed)
    return [
        GenerationRequest(
            tuple(int(t) for t in rng.integers(2, VOCAB_SIZE, rng.integers(2, 10))),
            params,
            rule.derive_sample_seed(lease_seed, index, 0),
        )
        for index in range(num_requests)
    ]


def claims(requests, results) -> list[ClaimedRollout]:
    return [
        ClaimedRollout(q.prompt_token_ids, r.token_ids, r.logprobs, r.commitment, q.sampling, q.seed)
        for q, r in zip(requests, results, strict=True)
    ]


def test_torch_engine_implements_the_interface(model):
    assert isinstance(TorchEngine(model, [STOP_TOKEN]), GenerationEngine)


def test_same_seed_same_completion_different_seed_different(model):
    engine = TorchEngine(model, [STOP_TOKEN], max_batch_size=4)
    request = GenerationRequest((5, 9, 13), SamplingParams(1.0, max_tokens=30), seed=123)
    first, second = engine.generate([request, request])
    # Two rows of one batch may round differently in the last bit (intra-op threads split the
    # rows' work differently): the tokens and the commitment agree exactly, log-probabilities and
    # margins to float32 rounding.
    assert (first.token_ids, first.finish_reason, first.commitment) == (
        second.token_ids,
        second.finish_reason,
        second.commitment,
    )
    np.testing.assert_allclose(first.logprobs, second.logprobs, rtol=0, atol=1e-5)
    np.testing.assert_allclose(first.margins, second.margins, rtol=0, atol=1e-5)
    others = engine.generate([GenerationRequest(request.prompt_token_ids, request.sampling, seed) for seed in range(4)])
    assert len({r.token_ids for r in others} | {first.token_ids}) == 5


def test_temperature_zero_is_greedy_like_hf_generate(model):
    engine = TorchEngine(model, [STOP_TOKEN], max_batch_size=8)
    requests = make_requests(4, SamplingParams(0.0, max_tokens=20))
    for request, result in zip(requests, engine.generate(requests), strict=True):
        prompt = torch.tensor([request.prompt_token_ids])
        expected = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            do_sample=False,
            max_new_tokens=20,
            eos_token_id=STOP_TOKEN,
            pad_token_id=0,
        )
        assert result.token_ids == tuple(expected[0, prompt.shape[1] :].tolist())


def test_finish_reasons_and_lengths(model):
    engine = TorchEngine(model, [STOP_TOKEN], max_batch_size=16)
    requests = make_requests(40, SamplingParams(1.0, max_tokens=25))
    results = engine.generate(requests)
    for result in results:
        assert len(result.token_ids) == len(result.logprobs) == len(result.margins) >= 1
        assert all(t != STOP_TOKEN for t in result.token_ids[:-1])
        if result.finish_reason == FinishReason.STOP:
            assert result.token_ids[-1] == STOP_TOKEN
        else:
            assert len(result.token_ids) == 25 and result.token_ids[-1] != STOP_TOKEN
        assert all(lp <= 0.0 for lp in result.logprobs) and all(m >= 0.0 for m in result.margins)
    assert {r.finish_reason for r in results} == {FinishReason.STOP, FinishReason.LENGTH}


def test_engine_rejects_empty_prompts(model):
    with pytest.raises(EngineRequestError):
        TorchEngine(model, [STOP_TOKEN]).generate([GenerationRequest((), SamplingParams(), 0)])


def test_chunk_points_select_like_the_reference():
    values = torch.randn(6, 32 * 40)
    values[:, 100:140] = 2.5  # many magnitude ties at the boundary
    values[:, 200:220] = -2.5
    bits = values.to(torch.bfloat16).view(torch.int16).to(torch.int32) & 0xFFFF
    indices, selected = chunk_points(bits, 128)
    for row in range(6):
        reference = commitment.top_indices(bits[row].numpy().astype(np.uint16), 128)
        assert sorted(indices[row].tolist()) == sorted(reference.tolist())
        np.testing.assert_array_equal(selected[row], bits[row].numpy()[indices[row]])


def test_prefill_matches_decoding_states(model):
    engine = TorchEngine(model, [STOP_TOKEN], max_batch_size=4)
    requests = make_requests(4, SamplingParams(1.0, max_tokens=40))
    results = engine.generate(requests)
    outputs = prefill(model, [(q.prompt_token_ids, r.token_ids) for q, r in zip(requests, results, strict=True)])
    for result, output in zip(results, outputs, strict=True):
        assert output.logits.shape == (len(result.token_ids), VOCAB_SIZE)
        assert output.hidden_bits.shape == (len(result.token_ids), 64)
        assert commitment.commit(output.hidden_bits) == result.commitment


@dataclass(frozen=True)
class Rejections:
    commitment_rate: float  # rollouts whose commitment fails its per-chunk bounds
    replay_rate: float  # rollouts failing any part of the replay check
    pooled: commitment.PooledCheck  # every chunk of every rollout together


def rejections(model, requests, results, validator=None) -> Rejections:
    reports = replay(validator if validator is not None else model, claims(requests, results))
    return Rejections(
        commitment_rate=sum(not commitment.accepts(r.commitment_checks) for r in reports) / len(reports),
        replay_rate=sum(not r.passes() for r in reports) / len(reports),
        pooled=commitment.pool([c for r in reports for c in r.commitment_checks]),
    )


@pytest.fixture(scope="module")
def honest(model):
    requests = make_requests(24, SamplingParams(1.0, max_tokens=64), lease_seed=11)
    return requests, TorchEngine(model, [STOP_TOKEN], max_batch_size=24).generate(requests)


def test_honest_rollouts_replay(model, honest):
    result = rejections(model, *honest)
    assert (result.commitment_rate, result.replay_rate) == (0.0, 0.0)
    assert result.pooled.passes(commitment.Thresholds())


def test_commitment_rejects_a_changed_prompt(model, honest):
    requests, results = honest
    changed = [
        GenerationRequest((q.prompt_token_ids[0] % 60 + 2,) + q.prompt_token_ids[1:], q.sampling, q.seed)
        for q in requests
    ]
    assert rejections(model, changed, results).commitment_rate == 1.0


def test_commitment_rejects_a_changed_token(model, honest):
    requests, results = honest
    kept = [(q, r) for q, r in zip(requests, results, strict=True) if len(r.token_ids) >= 8]
    changed = [
        dataclasses.replace(r, token_ids=r.token_ids[:2] + ((r.token_ids[2] + 1) % VOCAB_SIZE,) + r.token_ids[3:])
        for _, r in kept
    ]
    assert rejections(model, [q for q, _ in kept], changed).commitment_rate == 1.0


def perturbed(model, scale: float) -> Qwen2ForCausalLM:
    tampered = copy.deepcopy(model)
    with torch.no_grad():
        tampered.model.layers[0].mlp.down_proj.weight.mul_(scale)
    return tampered


def test_commitment_rejects_perturbed_weights(model, honest):
    requests = honest[0][:12]
    tampered = TorchEngine(perturbed(model, 1.1), [STOP_TOKEN], max_batch_size=12).generate(requests)
    assert rejections(model, requests, tampered).commitment_rate == 1.0
    requests = honest[0]
    slightly = TorchEngine(perturbed(model, 1.003), [STOP_TOKEN], max_batch_size=24).generate(requests)
    pooled = rejections(model, requests, slightly).pooled
    assert pooled.passes(commitment.Thresholds()) and not pooled.passes(commitment.FP32_THRESHOLDS)


def test_commitment_rejects_a_bf16_to_fp16_swap(model, honest):
    requests = honest[0][:16]
    node = TorchEngine(copy.deepcopy(model).to(torch.float16), [STOP_TOKEN], max_batch_size=16)
    result = rejections(model, requests, node.generate(requests), validator=copy.deepcopy(model).to(torch.bfloat16))
    assert not result.pooled.passes(commitment.Thresholds())
    assert result.replay_rate > 0.0


def test_commitments_of_rows_that_end_at_any_step_equal_the_reference(model):
    """Rows ending inside a chunk, on a chunk boundary and one token past it, in one batch: their
    partial chunks are closed later than they end, from states that must not have been overwritten."""
    lengths = (1, 2, 31, 32, 33, 40, 64, 65, 70)
    requests = [
        GenerationRequest((5, 9, 13 + i), SamplingParams(1.0, max_tokens=n), seed=i) for i, n in enumerate(lengths)
    ]
    results = TorchEngine(model, [], max_batch_size=len(requests)).generate(requests)
    outputs = prefill(model, [(q.prompt_token_ids, r.token_ids) for q, r in zip(requests, results, strict=True)])
    for length, result, output in zip(lengths, results, outputs, strict=True):
        assert len(result.token_ids) == length
        assert commitment.commit(output.hidden_bits) == result.commitment


def test_replay_of_groups_sharing_prompts_in_one_batch(model):
    """Groups of several samples per prompt (the prompt runs once per group), prompts of different
    lengths, in one replay; a broken commitment fails its own rollout only."""
    requests = [
        GenerationRequest(prompt, SamplingParams(1.0, max_tokens=40), rule.derive_sample_seed(3, g, s))
        for g, prompt in enumerate([(5, 9), (7, 8, 9, 10, 11, 12, 13), (20,)])
        for s in range(4)
    ]
    results = TorchEngine(model, [STOP_TOKEN], max_batch_size=5).generate(requests)
    claimed = claims(requests, results)
    claimed[5] = dataclasses.replace(claimed[5], commitment=claimed[5].commitment[:-2])
    reports = replay(model, claimed, rule.FP32_LOGIT_TOLERANCE)
    for index, report in enumerate(reports):
        if index == 5:
            assert report.commitment_error is not None and not report.passes()
        else:
            assert report.commitment_error is None
            assert report.passes(rule.FP32_MAX_LOGPROB_DRIFT, commitment.FP32_THRESHOLDS)
            assert report.token_checks.num_near_ties == 0
    alone = replay(model, claimed[4:8], rule.FP32_LOGIT_TOLERANCE)
    assert [r.commitment_checks for r in alone] == [r.commitment_checks for r in reports[4:8]]
