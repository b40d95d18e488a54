"""completion_text: the Rust backend's decode is used only where it is transformers' own decode."""

from __future__ import annotations

import random

import pytest

from policy.scoring import completion_text, decodes_through_backend
from policy.tokenizer import EOS_ID, SPECIAL_TOKENS, VOCAB, VOCAB_SIZE, load_tokenizer, save_char_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    directory = tmp_path_factory.mktemp("tokenizer")
    save_char_tokenizer(directory, model_max_length=512)
    return load_tokenizer(directory)


def test_the_default_tokenizer_decodes_through_its_backend(tokenizer):
    assert decodes_through_backend(tokenizer)


def test_backend_text_equals_decode_for_random_sequences_with_special_tokens(tokenizer):
    rng = random.Random(0)
    num_special = len(SPECIAL_TOKENS)
    for _ in range(3000):
        length = rng.choice([0, 1, 2, 5, 17, 64, 300])
        token_ids = [
            rng.randrange(num_special) if rng.random() < 0.2 else rng.randrange(VOCAB_SIZE) for _ in range(length)
        ]
        assert completion_text(tokenizer, token_ids) == tokenizer.decode(token_ids, skip_special_tokens=True)
    assert completion_text(tokenizer, (VOCAB["7"], EOS_ID)) == "7"


def test_tokenizer_that_cleans_up_spaces_goes_through_decode(tokenizer, monkeypatch):
    monkeypatch.setattr(tokenizer, "clean_up_tokenization_spaces", True)
    assert not decodes_through_backend(tokenizer)


class _OwnDecode:
    """A tokenizer with its own decode: never bypassed."""

    clean_up_tokenization_spaces = False

    def decode(self, token_ids, skip_special_tokens):
        return f"decoded {list(token_ids)} {skip_special_tokens}"


def test_other_tokenizers_go_through_decode(tokenizer):
    assert not decodes_through_backend(_OwnDecode())
    assert completion_text(_OwnDecode(), (1, 2)) == "decoded [1, 2] True"
    subclass = type("Overriding", (type(tokenizer),), {"decode": lambda self, ids, **kw: "own"})
    assert not decodes_through_backend(object.__new__(subclass))
