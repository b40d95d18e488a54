"""The vLLM engine takes its logits from vLLM's model, which applies each family's head (Granite's
logits scaling, Gemma 2's soft-capping, Cohere's logit scale) in its logits processor: its
log-probabilities equal the trainer's on families whose head does more than its output embeddings,
and the validator accepts its rollouts (issue 19). Skipped without vLLM."""

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402

from policy.engine import GenerationRequest  # noqa: E402
from policy.prefill import ClaimedRollout, replay  # noqa: E402
from policy.vllm_engine import VllmEngine  # noqa: E402
from protocol import sampling as rule  # noqa: E402
from protocol.types import SamplingParams  # noqa: E402
from tests.unit.test_model_families import family_model, trainer_logprobs  # noqa: E402

pytestmark = pytest.mark.vllm

# vLLM's CPU attention takes head sizes of 32 and up.
WIDER = dict(hidden_size=64, num_attention_heads=2, num_key_value_heads=2, head_dim=32)


@pytest.mark.parametrize("model_type", ["granite", "gemma2", "cohere"])
def test_vllm_logprobs_equal_the_trainers(tmp_path, model_type):
    model = family_model(model_type, seed=3, **WIDER)
    model.save_pretrained(str(tmp_path), safe_serialization=True)
    engine = VllmEngine(tmp_path, [2], max_batch_size=8)
    params = SamplingParams(temperature=1.0, max_tokens=12)
    requests = [
        GenerationRequest(prompt, params, rule.derive_sample_seed(5, index, 0))
        for index, prompt in enumerate([(1, 7, 8, 9), (1, 20, 21), (1, 40, 41, 42, 43, 44)])
    ]
    results = engine.generate(requests)
    for request, result in zip(requests, results, strict=True):
        expected = trainer_logprobs(model, request.prompt_token_ids, result.token_ids)
        torch.testing.assert_close(torch.tensor(result.logprobs), expected, atol=2e-4, rtol=1e-4)
    claims = [
        ClaimedRollout(q.prompt_token_ids, r.token_ids, r.logprobs, r.commitment, q.sampling, q.seed)
        for q, r in zip(requests, results, strict=True)
    ]
    assert all(report.passes() for report in replay(model, claims))
