"""How a completion's tokens become the text a task's verifier scores. Nodes and the
coordinator both call this, so they score the same string."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def completion_text(tokenizer: Any, token_ids: Sequence[int]) -> str:
    """The completion as text: special tokens (the final EOS among them) are dropped."""
    return tokenizer.decode(list(token_ids), skip_special_tokens=True)
