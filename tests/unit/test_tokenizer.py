"""The character tokenizer, saved as a standard HF tokenizer, loads unchanged through AutoTokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest

from policy.model import TinyModelShape, create_tiny_model
from policy.tokenizer import (
    BOS_ID,
    CHARACTERS,
    EOS_ID,
    PAD_ID,
    TOKENIZER_CLASS,
    UNK_ID,
    VOCAB,
    VOCAB_SIZE,
    build_char_tokenizer,
    load_tokenizer,
)
from tests.unit.test_model_families import char_tokenizer_model_dir

SAMPLES = ["12+345=", "  two  spaces ", "rev:abc=", "sort:3141=", "a\nb c", "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~", ""]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tiny")
    create_tiny_model(directory, shape=TinyModelShape(hidden_size=32, intermediate_size=64, num_hidden_layers=1))
    return directory


def expected_ids(text: str) -> list[int]:
    """The naive reference: BOS, then one id per character, <unk> for characters outside the vocabulary."""
    return [BOS_ID] + [VOCAB.get(character, UNK_ID) for character in text]


def test_vocabulary_layout() -> None:
    assert (PAD_ID, BOS_ID, EOS_ID, UNK_ID) == (0, 1, 2, 3)
    assert VOCAB_SIZE == 4 + len(CHARACTERS) == 100
    assert sorted(VOCAB.values()) == list(range(VOCAB_SIZE))


def test_auto_tokenizer_round_trips_exactly(model_dir: Path) -> None:
    tokenizer = load_tokenizer(model_dir)
    assert type(tokenizer).__name__ in ("TokenizersBackend", "PreTrainedTokenizerFast")
    for text in SAMPLES:
        ids = tokenizer(text).input_ids
        assert ids == expected_ids(text)
        assert tokenizer(text, add_special_tokens=False).input_ids == expected_ids(text)[1:]
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
        assert tokenizer.decode(ids[1:] + [EOS_ID], skip_special_tokens=True) == text


def test_auto_tokenizer_matches_the_raw_tokenizers_object(model_dir: Path) -> None:
    tokenizer = load_tokenizer(model_dir)
    raw = build_char_tokenizer()
    for text in SAMPLES:
        assert tokenizer(text).input_ids == raw.encode(text).ids


def test_special_tokens_and_sizes(model_dir: Path) -> None:
    from transformers import AutoConfig

    tokenizer = load_tokenizer(model_dir)
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (
        PAD_ID,
        BOS_ID,
        EOS_ID,
        UNK_ID,
    )
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (PAD_ID, BOS_ID, EOS_ID)
    assert len(tokenizer) == VOCAB_SIZE <= config.vocab_size
    assert tokenizer.convert_ids_to_tokens([PAD_ID, BOS_ID, EOS_ID, UNK_ID]) == ["<pad>", "<bos>", "<eos>", "<unk>"]
    assert tokenizer("é").input_ids == [BOS_ID, UNK_ID]


def test_saved_files_are_standard(model_dir: Path) -> None:
    import json

    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == TOKENIZER_CLASS == "PreTrainedTokenizerFast"
    assert (model_dir / "tokenizer.json").is_file()


def test_left_padding_for_batched_generation(model_dir: Path) -> None:
    tokenizer = load_tokenizer(model_dir)
    batch = tokenizer(["1+1=", "10+10="], padding=True)
    assert batch.input_ids[0] == [PAD_ID, PAD_ID] + expected_ids("1+1=")
    assert batch.attention_mask[0] == [0, 0] + [1] * 5


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_other_families_load_the_character_tokenizer_exactly(tmp_path: Path, family: str) -> None:
    """AutoTokenizer rebuilds a qwen2 directory's tokenizer as a Qwen2Tokenizer (spaces dropped);
    load_tokenizer reads the tokenizer.json the directory declares."""
    tokenizer = load_tokenizer(char_tokenizer_model_dir(family, tmp_path))
    for text in SAMPLES:
        assert tokenizer(text).input_ids == expected_ids(text)
        assert tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True) == text
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.padding_side) == (PAD_ID, EOS_ID, "left")
