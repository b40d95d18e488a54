"""Loading models from local directories, in fp32 and bf16, and the default tiny model's shape."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from policy.model import (
    ModelLoadError,
    TinyModelShape,
    create_tiny_model,
    load_model,
    summarize_model,
    tiny_model_config,
    torch_dtype,
)
from policy.tokenizer import VOCAB_SIZE, load_tokenizer
from tests.unit.test_model_families import char_tokenizer_model_dir

SMALL_SHAPE = TinyModelShape(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tiny")
    create_tiny_model(directory, shape=SMALL_SHAPE, seed=3)
    return directory


def test_default_tiny_model_is_a_small_llama() -> None:
    from transformers import LlamaForCausalLM

    config = tiny_model_config(TinyModelShape())
    num_parameters = sum(parameter.numel() for parameter in LlamaForCausalLM(config).parameters())
    assert config.model_type == "llama"
    assert config.vocab_size == VOCAB_SIZE
    assert config.tie_word_embeddings
    assert 100_000 < num_parameters < 3_000_000


def test_directory_holds_config_safetensors_and_tokenizer(model_dir: Path) -> None:
    names = {path.name for path in model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not any(name.endswith(".bin") for name in names)


@pytest.mark.parametrize(("dtype", "expected"), [("float32", torch.float32), ("bf16", torch.bfloat16)])
def test_load_in_each_dtype_gives_the_saved_weights(model_dir: Path, dtype: str, expected: torch.dtype) -> None:
    reference = create_tiny_model(model_dir.parent / f"again-{dtype}", shape=SMALL_SHAPE, seed=3)
    model = load_model(model_dir, dtype=dtype)
    assert not model.training
    summary = summarize_model(model)
    assert summary.dtype == str(expected).removeprefix("torch.")
    assert (summary.hidden_size, summary.num_hidden_layers, summary.vocab_size) == (32, 2, VOCAB_SIZE)
    for (name, loaded), (_, made) in zip(model.state_dict().items(), reference.state_dict().items(), strict=True):
        torch.testing.assert_close(loaded, made.to(expected), rtol=0, atol=0, msg=name)


def test_loaded_model_runs_a_forward_pass(model_dir: Path) -> None:
    model = load_model(model_dir, dtype="bfloat16")
    tokenizer = load_tokenizer(model_dir)
    encoded = tokenizer(["12+3="], return_tensors="pt")
    with torch.no_grad():
        logits = model(**encoded).logits
    assert logits.shape == (1, 6, VOCAB_SIZE)
    assert logits.dtype == torch.bfloat16


def test_same_seed_same_weights_different_seed_different_weights(tmp_path: Path) -> None:
    first = create_tiny_model(tmp_path / "a", shape=SMALL_SHAPE, seed=1).state_dict()
    second = create_tiny_model(tmp_path / "b", shape=SMALL_SHAPE, seed=1).state_dict()
    third = create_tiny_model(tmp_path / "c", shape=SMALL_SHAPE, seed=2).state_dict()
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert not torch.equal(first["model.embed_tokens.weight"], third["model.embed_tokens.weight"])


@pytest.mark.parametrize("model_type", ["qwen2", "gpt2"])
def test_other_families_over_the_character_tokenizer_load_and_run(tmp_path: Path, model_type: str) -> None:
    model = load_model(char_tokenizer_model_dir(model_type, tmp_path, seed=3))
    assert model.config.model_type == model_type
    encoded = load_tokenizer(tmp_path)(["12+3="], return_tensors="pt")
    with torch.no_grad():
        assert model(**encoded).logits.shape == (1, 6, VOCAB_SIZE)


def test_user_errors(model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path)
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        torch_dtype("float8")
    with pytest.raises(ModelLoadError, match="unknown device"):
        load_model(model_dir, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="no CUDA device"):
            load_model(model_dir, device="cuda")
