"""One logits function for every role, per model family (issue 19): `logits_from_hidden` over the
decoder's final hidden states equals transformers' own `model(...).logits` for every family tried,
a family whose head it does not reproduce is refused, and the torch engine's log-probabilities
equal the trainer's on a family whose head does more than its output embeddings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

from policy import tokenizer as char_tokenizer
from policy.engine import GenerationRequest, TorchEngine
from policy.model import (
    HEAD_TRANSFORMS,
    ModelLoadError,
    check_logits_head,
    load_model,
    logits_from_hidden,
    save_model,
)
from policy.prefill import ClaimedRollout, prefill, replay
from protocol import sampling as rule
from protocol.types import SamplingParams
from trainer.loss import token_logprobs

VOCAB_SIZE = 96
DECODER = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
SLIDING = dict(DECODER, sliding_window=8)
MOE = dict(DECODER, num_local_experts=2, num_experts_per_tok=1)

# model_type → (config class, extra config fields). The transforms are set far from neutral (a
# soft-cap of 0.5 where a real model has 30) so that a skipped transform shows on random weights.
FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", DECODER),
    "mistral": ("MistralConfig", DECODER),
    "qwen2": ("Qwen2Config", DECODER),
    "qwen3": ("Qwen3Config", DECODER),
    "gpt2": ("GPT2Config", dict(vocab_size=VOCAB_SIZE, n_embd=32, n_layer=2, n_head=4, n_positions=64)),
    "gpt_neox": ("GPTNeoXConfig", DECODER),
    "phi": ("PhiConfig", DECODER),
    "phi3": ("Phi3Config", DECODER),
    "opt": ("OPTConfig", dict(DECODER, ffn_dim=64, word_embed_proj_dim=32)),
    "olmo2": ("Olmo2Config", DECODER),
    "starcoder2": ("Starcoder2Config", DECODER),
    "bloom": ("BloomConfig", dict(vocab_size=VOCAB_SIZE, hidden_size=32, n_layer=2, n_head=4)),
    "gemma": ("GemmaConfig", DECODER),
    "cohere": ("CohereConfig", dict(DECODER, logit_scale=0.25)),
    "cohere2": ("Cohere2Config", dict(SLIDING, logit_scale=0.25)),
    "cohere2_moe": ("Cohere2MoeConfig", dict(SLIDING, num_local_experts=2, num_experts_per_tok=1, logit_scale=0.25)),
    "granite": ("GraniteConfig", dict(DECODER, logits_scaling=4.0)),
    "granitemoe": ("GraniteMoeConfig", dict(MOE, logits_scaling=4.0)),
    "granitemoeshared": ("GraniteMoeSharedConfig", dict(MOE, logits_scaling=4.0, shared_intermediate_size=32)),
    "granite_swa": ("GraniteSWAConfig", dict(SLIDING, logits_scaling=4.0)),
    "granitemoe_swa": (
        "GraniteMoeSWAConfig",
        dict(SLIDING, num_local_experts=2, num_experts_per_tok=1, logits_scaling=4.0),
    ),
    "granitemoehybrid": (
        "GraniteMoeHybridConfig",
        dict(
            MOE,
            logits_scaling=4.0,
            shared_intermediate_size=32,
            layer_types=["mamba", "attention"],
            mamba_d_state=8,
            mamba_n_heads=4,
            mamba_d_head=16,
        ),
    ),
    "hyperclovax": ("HyperCLOVAXConfig", dict(DECODER, logits_scaling=4.0)),
    "gemma2": ("Gemma2Config", dict(SLIDING, final_logit_softcapping=0.5)),
    "gemma3_text": ("Gemma3TextConfig", dict(SLIDING, final_logit_softcapping=0.5)),
    "gemma3n_text": (
        "Gemma3nTextConfig",
        dict(
            SLIDING,
            final_logit_softcapping=0.5,
            layer_types=["sliding_attention", "full_attention"],
            activation_sparsity_pattern=[0.0, 0.0],
            num_kv_shared_layers=0,
            laurel_rank=4,
            altup_num_inputs=2,
            hidden_size_per_layer_input=8,
            vocab_size_per_layer_input=VOCAB_SIZE,
        ),
    ),
    "gemma4_text": (
        "Gemma4TextConfig",
        dict(SLIDING, final_logit_softcapping=0.5, layer_types=["sliding_attention", "full_attention"]),
    ),
    "vaultgemma": ("VaultGemmaConfig", dict(SLIDING, final_logit_softcapping=0.5)),
    "nanochat": ("NanoChatConfig", dict(DECODER, final_logit_softcapping=0.5)),
}


def family_model(model_type: str, seed: int = 0, **overrides) -> torch.nn.Module:
    config_class, fields = FAMILIES[model_type]
    config = getattr(transformers, config_class)(**{**fields, **overrides})
    assert config.model_type == model_type
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def char_tokenizer_model_dir(model_type: str, directory: Path, seed: int = 0) -> Path:
    """A model directory of `model_type` over the default tiny model's character tokenizer, as
    `policy.model.save_model` writes it."""
    model = family_model(
        model_type,
        seed,
        vocab_size=char_tokenizer.VOCAB_SIZE,
        pad_token_id=char_tokenizer.PAD_ID,
        bos_token_id=char_tokenizer.BOS_ID,
        eos_token_id=char_tokenizer.EOS_ID,
        tie_word_embeddings=True,
    )
    save_model(model, directory)
    return directory


def decoder_hidden(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    return model.get_decoder()(input_ids=input_ids).last_hidden_state


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_logits_from_hidden_equal_the_models_own_logits(model_type: str) -> None:
    model = family_model(model_type)
    input_ids = torch.randint(3, VOCAB_SIZE, (3, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
        hidden = decoder_hidden(model, input_ids)
        torch.testing.assert_close(logits_from_hidden(model, hidden), expected, rtol=0, atol=0)
        # As the engine calls it: one row of hidden states per sequence, at its last position.
        torch.testing.assert_close(logits_from_hidden(model, hidden[:, -1]), expected[:, -1])
        output_embeddings_alone = model.get_output_embeddings()(hidden)
    # The families with a transform are the ones where the output embeddings alone are wrong.
    assert torch.equal(output_embeddings_alone, expected) == (model_type not in HEAD_TRANSFORMS)
    check_logits_head(model)


def test_every_handled_transform_is_tried() -> None:
    assert set(HEAD_TRANSFORMS) <= set(FAMILIES)


@pytest.mark.parametrize(
    ("model_type", "field", "value"),
    [
        ("llama", "final_logit_softcapping", 30.0),
        ("qwen2", "logit_scale", 0.5),
        ("mistral", "logits_scaling", 8.0),
        ("gpt2", "lm_head_multiplier", 2.0),
    ],
)
def test_a_family_with_an_unhandled_logits_transform_is_refused(model_type: str, field: str, value: float) -> None:
    model = family_model(model_type, **{field: value})
    hidden = torch.zeros(1, 32)
    with pytest.raises(ModelLoadError, match=f"{model_type}.*{field}={value}"):
        logits_from_hidden(model, hidden)


def test_neutral_values_of_transform_fields_are_accepted() -> None:
    model = family_model("llama", logits_scaling=1.0, final_logit_softcapping=None)
    torch.testing.assert_close(logits_from_hidden(model, torch.ones(1, 32)), model.lm_head(torch.ones(1, 32)))


class DoubledLogitsLlama(transformers.LlamaForCausalLM):
    """A family whose forward changes its logits with nothing in its config to say so."""

    def forward(self, *args, **kwargs):
        output = super().forward(*args, **kwargs)
        output.logits = output.logits * 2
        return output


class PaddedVocabularyLlama(transformers.LlamaForCausalLM):
    """A family whose forward cuts its output embeddings' padded rows off its logits."""

    def forward(self, *args, **kwargs):
        output = super().forward(*args, **kwargs)
        output.logits = output.logits[..., : VOCAB_SIZE - 4]
        return output


@pytest.mark.parametrize(
    ("model_class", "difference"),
    [
        (DoubledLogitsLlama, r"max difference \d"),
        (PaddedVocabularyLlama, r"shape \(1, 8, 96\), its forward's \(1, 8, 92\)"),
    ],
)
def test_a_head_that_the_config_does_not_describe_is_refused_by_the_probe(model_class, difference) -> None:
    torch.manual_seed(0)
    model = model_class(transformers.LlamaConfig(**DECODER)).eval()
    with pytest.raises(ModelLoadError, match=f"other logits than its forward \\({difference}"):
        check_logits_head(model)


def saved(model: torch.nn.Module, directory: Path) -> Path:
    model.save_pretrained(str(directory), safe_serialization=True)
    return directory


def test_load_model_checks_the_head(tmp_path: Path) -> None:
    loaded = load_model(saved(family_model("gemma2"), tmp_path / "gemma2"))
    assert loaded.config.final_logit_softcapping == 0.5
    refused = saved(family_model("llama"), tmp_path / "capped-llama")
    config = json.loads((refused / "config.json").read_text())
    (refused / "config.json").write_text(json.dumps({**config, "final_logit_softcapping": 30.0}))
    with pytest.raises(ModelLoadError, match="'llama' sets final_logit_softcapping=30.0"):
        load_model(refused)


def trainer_logprobs(model: torch.nn.Module, prompt: tuple[int, ...], completion: tuple[int, ...]) -> torch.Tensor:
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    return token_logprobs(logits[:, :-1], ids[:, 1:])[0, len(prompt) - 1 :]


@pytest.mark.parametrize("model_type", ["gemma2", "cohere", "granite", "gpt2"])
def test_engine_and_validator_logprobs_equal_the_trainers(model_type: str) -> None:
    """The importance ratio's two sides: the log-probabilities a node reports (torch engine) and
    those the trainer recomputes (transformers' forward) agree; the validator's replay passes."""
    model = family_model(model_type, seed=3)
    engine = TorchEngine(model, stop_token_ids={2}, pad_token_id=0)
    params = SamplingParams(temperature=1.0, max_tokens=12)
    requests = [
        GenerationRequest(prompt, params, rule.derive_sample_seed(5, index, 0))
        for index, prompt in enumerate([(1, 7, 8, 9), (1, 20, 21), (1, 40, 41, 42, 43, 44)])
    ]
    results = engine.generate(requests)
    for request, result in zip(requests, results, strict=True):
        expected = trainer_logprobs(model, request.prompt_token_ids, result.token_ids)
        torch.testing.assert_close(torch.tensor(result.logprobs), expected, atol=1e-5, rtol=1e-5)
    pairs = [(q.prompt_token_ids, r.token_ids) for q, r in zip(requests, results, strict=True)]
    for request, result, output in zip(requests, results, prefill(model, pairs), strict=True):
        expected = trainer_logprobs(model, request.prompt_token_ids, result.token_ids)
        recomputed = torch.log_softmax(torch.from_numpy(output.logits), dim=-1)
        chosen = recomputed[torch.arange(len(result.token_ids)), torch.tensor(result.token_ids)]
        torch.testing.assert_close(chosen, expected, atol=1e-5, rtol=1e-5)
    claims = [
        ClaimedRollout(q.prompt_token_ids, r.token_ids, r.logprobs, r.commitment, q.sampling, q.seed)
        for q, r in zip(requests, results, strict=True)
    ]
    assert all(report.passes() for report in replay(model, claims))
