"""How a completion's tokens become the text a task's verifier scores. Nodes and the
coordinator both call this, so they score the same string."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from typing import Any


@cache
def _class_decodes_through_backend(cls: type) -> bool:
    """Whether instances of `cls` decode a list of ints with transformers' own `decode` and
    `_decode` of a fast tokenizer, which hand the ids to the Rust backend's `decode` unchanged."""
    try:
        from transformers import PreTrainedTokenizerFast
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
    except ImportError:
        return False
    return (
        issubclass(cls, PreTrainedTokenizerFast)
        and cls.decode is PreTrainedTokenizerBase.decode
        and cls._decode is PreTrainedTokenizerFast._decode
    )


def decodes_through_backend(tokenizer: Any) -> bool:
    """Whether `tokenizer.decode(ids, skip_special_tokens=True)` is exactly the backend's decode:
    the class keeps transformers' decode path and the tokenizer does no clean-up of spaces after it."""
    return _class_decodes_through_backend(type(tokenizer)) and tokenizer.clean_up_tokenization_spaces is False


def completion_text(tokenizer: Any, token_ids: Sequence[int]) -> str:
    """The completion as text: special tokens (the final EOS among them) are dropped.
    Calls the Rust backend directly where that is transformers' own decode path (2/3 of the
    cost of `decode` is its Python layers; for a list of Python ints `decode` passes it on
    unchanged); any other tokenizer goes through `decode`."""
    if decodes_through_backend(tokenizer):
        return tokenizer.backend_tokenizer.decode(list(token_ids), skip_special_tokens=True)
    return tokenizer.decode(list(token_ids), skip_special_tokens=True)
