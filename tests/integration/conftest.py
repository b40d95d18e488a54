"""Fixtures shared by the integration tests that forge or generate rollouts in the test process."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def engine(tiny_model):
    """A torch engine on the tiny model, stopping at its EOS, and the model's tokenizer."""
    from policy.engine import TorchEngine
    from policy.model import load_model
    from policy.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tiny_model)
    return TorchEngine(load_model(tiny_model), stop_token_ids={tokenizer.eos_token_id}), tokenizer
