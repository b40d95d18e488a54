"""The character-level tokenizer of the default tiny model, saved as a standard Hugging Face
tokenizer (tokenizer.json + tokenizer_config.json, class PreTrainedTokenizerFast), so that
`transformers.AutoTokenizer` and vLLM load the model directory unchanged.

Ids: the special tokens first (<pad> 0, <bos> 1, <eos> 2, <unk> 3), then one id per character:
newline, then printable ASCII (space to `~`). Encoding adds <bos> in front; any other character
maps to <unk>.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)
CHARACTERS = "\n" + "".join(chr(code) for code in range(32, 127))
VOCAB = {token: token_id for token_id, token in enumerate((*SPECIAL_TOKENS, *CHARACTERS))}
VOCAB_SIZE = len(VOCAB)
PAD_ID, BOS_ID, EOS_ID, UNK_ID = (VOCAB[token] for token in SPECIAL_TOKENS)
TOKENIZER_CLASS = "PreTrainedTokenizerFast"


def build_char_tokenizer() -> Any:
    """The `tokenizers.Tokenizer`: every character is one word of a WordLevel vocabulary."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    tokenizer = Tokenizer(models.WordLevel(vocab=VOCAB, unk_token=UNK_TOKEN))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A $B", special_tokens=[(BOS_TOKEN, BOS_ID)]
    )
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return tokenizer


def save_char_tokenizer(directory: Path, model_max_length: int) -> None:
    """Write tokenizer.json and tokenizer_config.json into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    build_char_tokenizer().save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": TOKENIZER_CLASS,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": UNK_TOKEN,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": True,
        "padding_side": "left",
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def load_tokenizer(directory: Path) -> Any:
    """The tokenizer of a local model directory, never downloading. A directory whose
    tokenizer_config.json declares the generic class (TOKENIZER_CLASS: "tokenizer.json is the whole
    tokenizer") gets exactly its tokenizer.json; AutoTokenizer would pick a class by model type for
    some families (qwen2, phi3, ...) and rebuild that class's tokenizer over the vocabulary, which
    turns the character tokenizer into a byte-level BPE that drops spaces. Any other directory loads
    through AutoTokenizer."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    directory = Path(directory)
    config_path = directory / "tokenizer_config.json"
    declared = json.loads(config_path.read_text()).get("tokenizer_class") if config_path.is_file() else None
    if declared == TOKENIZER_CLASS and (directory / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(str(directory), local_files_only=True)
    return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
