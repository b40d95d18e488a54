"""Loading a Hugging Face causal LM from a local directory, and making the default tiny model.

Any causal LM directory (config.json + safetensors weights + tokenizer files) loads with
`load_model`; nothing is downloaded. `create_tiny_model` writes the default tiny model: a
Llama-style decoder over the character tokenizer of `policy.tokenizer` (which `save_model` writes
beside any model, and `policy.tokenizer.load_tokenizer` reads back exactly whatever the family).

Every role computes logits from the decoder's final hidden states with `logits_from_hidden`, which
applies the family's head exactly as transformers' forward does; `load_model` refuses a family whose
logits it does not reproduce.
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
    """A causal LM from `directory` in `dtype` on `device`, in eval mode; never downloads. Refuses a
    family whose logits `logits_from_hidden` does not reproduce."""
    from transformers import AutoModelForCausalLM

    directory = Path(directory).expanduser()
    check_model_directory(directory)
    check_device(device)
    model = AutoModelForCausalLM.from_pretrained(
        str(directory), dtype=torch_dtype(dtype), local_files_only=True, use_safetensors=True
    )
    model = model.to(device).eval()
    check_logits_head(model)
    return model


def _multiply_by_logit_scale(config: Any, logits: Any) -> Any:
    return logits * config.logit_scale


def _divide_by_logits_scaling(config: Any, logits: Any) -> Any:
    return logits / config.logits_scaling


def _multiply_by_logits_scaling(config: Any, logits: Any) -> Any:
    return logits * config.logits_scaling


def _final_logit_softcap(config: Any, logits: Any) -> Any:
    import torch

    cap = config.final_logit_softcapping
    if cap is None:
        return logits
    return torch.tanh(logits / cap) * cap


# What each family's causal-LM forward does to its output embeddings' result, by model_type, in the
# order of operations of transformers' modeling code (models/<family>/modeling_<family>.py), so that
# the result is bit for bit that of `model(...).logits`. A family not listed applies nothing.
HEAD_TRANSFORMS = {
    "cohere": _multiply_by_logit_scale,
    "cohere2": _multiply_by_logit_scale,
    "cohere2_moe": _multiply_by_logit_scale,
    "granite": _divide_by_logits_scaling,
    "granitemoe": _divide_by_logits_scaling,
    "granitemoeshared": _divide_by_logits_scaling,
    "granitemoehybrid": _divide_by_logits_scaling,
    "granite_swa": _divide_by_logits_scaling,
    "granitemoe_swa": _divide_by_logits_scaling,
    "hyperclovax": _multiply_by_logits_scaling,
    "gemma2": _final_logit_softcap,
    "gemma3_text": _final_logit_softcap,
    "gemma3n_text": _final_logit_softcap,
    "gemma4_text": _final_logit_softcap,
    "vaultgemma": _final_logit_softcap,
    "nanochat": _final_logit_softcap,
}
# Config fields by which other families change their logits, with the values that change nothing:
# a model of a family not in HEAD_TRANSFORMS that sets one otherwise is refused.
HEAD_TRANSFORM_FIELDS = {
    "logit_scale": (None, 1, 1.0),
    "logits_scaling": (None, 1, 1.0),
    "lm_head_multiplier": (None, 1, 1.0),
    "output_multiplier": (None, 1, 1.0),
    "logits_mup_width_multiplier": (None, 1, 1.0),
    "final_logit_softcapping": (None,),
    "logits_soft_cap": (None,),
    "output_logit_soft_cap": (None,),
}


def logits_from_hidden(model: Any, hidden: Any) -> Any:
    """The logits that `model(...).logits` gives for the decoder's final hidden states `hidden`
    ([..., hidden_size]): its output embeddings, then its family's transform (Cohere's logit scale,
    Granite's logits scaling, Gemma 2/3's final soft-capping). Every role that computes logits from
    hidden states (the torch engine, the validator's prefill, evaluation) calls this; the trainer's
    forward is transformers' own, and `check_logits_head` holds the two equal.
    Raises ModelLoadError for a family whose config changes its logits in a way not handled here."""
    logits = model.get_output_embeddings()(hidden)
    transform = HEAD_TRANSFORMS.get(model.config.model_type)
    if transform is not None:
        return transform(model.config, logits)
    _refuse_unhandled_head_transform(model.config)
    return logits


def _refuse_unhandled_head_transform(config: Any) -> None:
    text_config = config.get_text_config()
    for source in (config,) if text_config is config else (config, text_config):
        for field, neutral in HEAD_TRANSFORM_FIELDS.items():
            value = getattr(source, field, None)
            if value not in neutral:
                raise ModelLoadError(
                    f"model type {config.model_type!r} sets {field}={value!r}, a transform of its logits that "
                    "rollproof does not reproduce from hidden states (its nodes and validator would disagree "
                    "with its trainer); the model types whose logit transform rollproof applies: "
                    + ", ".join(sorted(HEAD_TRANSFORMS))
                )


def check_logits_head(model: Any, num_probe_tokens: int = 8) -> None:
    """Refuse a model whose logits from `logits_from_hidden` over its decoder's final hidden states
    differ from its own forward's (a family whose head does more than its config says)."""
    import torch

    input_ids = torch.arange(num_probe_tokens, device=model.device)[None] % model.config.get_text_config().vocab_size
    with torch.inference_mode():
        expected = model(input_ids=input_ids).logits
        hidden = model.get_decoder()(input_ids=input_ids).last_hidden_state
        actual = logits_from_hidden(model, hidden)
    try:
        torch.testing.assert_close(actual, expected)
    except AssertionError:
        difference = (
            f"max difference {float((actual.float() - expected.float()).abs().max()):.3g}"
            if actual.shape == expected.shape
            else f"shape {tuple(actual.shape)}, its forward's {tuple(expected.shape)}"
        )
        raise ModelLoadError(
            f"model type {model.config.model_type!r}: its output embeddings over its decoder's hidden states "
            f"give other logits than its forward ({difference}); rollproof's engines and "
            "validator cannot serve this family"
        ) from None


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
