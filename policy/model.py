"""Loading a Hugging Face causal LM from a local directory, and making the default tiny model.

Any causal LM directory (config.json + safetensors weights + tokenizer files) loads with
`load_model`; nothing is downloaded. `create_tiny_model` writes the default tiny model: a
Llama-style decoder over the character tokenizer of `policy.tokenizer`. (Llama, not Qwen2:
transformers 5 ignores a saved tokenizer for model_type qwen2 and builds a Qwen2Tokenizer over
the vocabulary instead, which breaks the character tokenizer.)
"""

from __future__ import annotations

import gc
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from policy.tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, save_char_tokenizer

DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}


def freeze_long_lived_objects() -> None:
    """Move every object alive now into the garbage collector's permanent generation. Each role
    calls it once its model is loaded: torch, transformers and the model live as long as the
    process, and a full collection that scans them stops every thread for ~0.2 s (220 ms measured
    with the validator's model loaded), landing on whatever request or check is in flight. Garbage
    without reference cycles is still freed at once; cycles among the objects alive now never are."""
    gc.freeze()


class ModelLoadError(ValueError):
    """A model directory, dtype or device that cannot be used."""


@dataclass(frozen=True)
class TinyModelShape:
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 3
    num_attention_heads: int = 4
    max_position_embeddings: int = 128


@dataclass(frozen=True)
class ModelSummary:
    model_type: str
    num_parameters: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    vocab_size: int
    max_position_embeddings: int
    dtype: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def torch_dtype(name: str) -> Any:
    import torch

    canonical = DTYPE_NAMES.get(name.lower())
    if canonical is None:
        raise ModelLoadError(f"unknown dtype {name!r}; use one of: {', '.join(sorted(DTYPE_NAMES))}")
    return getattr(torch, canonical)


def check_device(device: str) -> None:
    """Refuse a device this process cannot use (imports torch only for an accelerator)."""
    if device == "cpu":
        return
    if not device.startswith("cuda"):
        raise ModelLoadError(f"unknown device {device!r}; use 'cpu', 'cuda' or 'cuda:N'")
    import torch

    if not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} requested but this torch build sees no CUDA device")


def check_model_directory(directory: Path) -> None:
    """Refuse, saying what to pass instead, a path that is not a Hugging Face model directory."""
    if not directory.exists():
        raise ModelLoadError(f"model directory {directory} does not exist")
    if not directory.is_dir():
        raise ModelLoadError(f"{directory} is a file, not a model directory (the directory holding config.json)")
    is_checkpoint = (directory / "optimizer.pt").is_file() or any(directory.glob("step-*/optimizer.pt"))
    if is_checkpoint:
        raise ModelLoadError(
            f"{directory} is a trainer checkpoint, not a model directory: write one from a published version "
            "with `rollproof trainer export --policy-dir <coordinator data dir>/policy --model <base model> --out DIR`"
        )
    if not (directory / "config.json").is_file():
        raise ModelLoadError(f"{directory} is not a model directory: it has no config.json")
    if not any(directory.glob("*.safetensors")):
        raise ModelLoadError(f"{directory} has no *.safetensors weights")


def load_model(directory: Path, *, dtype: str = "float32", device: str = "cpu") -> Any:
    """A causal LM from `directory` in `dtype` on `device`, in eval mode; never downloads."""
    from transformers import AutoModelForCausalLM

    directory = Path(directory).expanduser()
    check_model_directory(directory)
    check_device(device)
    model = AutoModelForCausalLM.from_pretrained(
        str(directory), dtype=torch_dtype(dtype), local_files_only=True, use_safetensors=True
    )
    return model.to(device).eval()


def summarize_model(model: Any) -> ModelSummary:
    config = model.config
    return ModelSummary(
        model_type=config.model_type,
        num_parameters=sum(parameter.numel() for parameter in model.parameters()),
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        vocab_size=config.vocab_size,
        max_position_embeddings=config.max_position_embeddings,
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
    )


def tiny_model_config(shape: TinyModelShape) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_attention_heads,
        max_position_embeddings=shape.max_position_embeddings,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )


def create_tiny_model(directory: Path, *, shape: TinyModelShape = TinyModelShape(), seed: int = 0) -> Any:
    """Initialise the tiny model from `seed`, write it with its tokenizer to `directory`, return it."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_model_config(shape))
    save_model(model, directory)
    return model


def save_model(model: Any, directory: Path) -> None:
    """Write `model` (safetensors) and the character tokenizer into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory), safe_serialization=True)
    save_char_tokenizer(directory, model_max_length=model.config.max_position_embeddings)
