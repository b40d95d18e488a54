"""Pure parts of the supervised warm-up: the batch layout and the learning-rate schedule."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from envs import Problem
from policy.bootstrap import IGNORE_INDEX, BootstrapError, BootstrapSettings, learning_rate_at, supervised_batch
from policy.model import TinyModelShape, create_tiny_model
from policy.tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB, load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    directory: Path = tmp_path_factory.mktemp("tiny")
    create_tiny_model(directory, shape=TinyModelShape(hidden_size=32, intermediate_size=64, num_hidden_layers=1))
    return load_tokenizer(directory)


def ids(text: str) -> list[int]:
    return [VOCAB[character] for character in text]


def test_supervised_batch_masks_the_prompt_and_pads_on_the_right(tokenizer) -> None:
    problems = [Problem("1+2=", "3", "1+2="), Problem("10+20=", "30", "10+20=")]
    batch = supervised_batch(problems, tokenizer, max_length=64)
    first = [BOS_ID, *ids("1+2="), *ids("3"), EOS_ID]
    second = [BOS_ID, *ids("10+20="), *ids("30"), EOS_ID]
    padding = len(second) - len(first)
    assert batch["input_ids"].tolist() == [first + [PAD_ID] * padding, second]
    assert batch["attention_mask"].tolist() == [[1] * len(first) + [0] * padding, [1] * len(second)]
    ignored = [IGNORE_INDEX]
    assert batch["labels"].tolist() == [
        ignored * 5 + [*ids("3"), EOS_ID] + ignored * padding,
        ignored * 7 + [*ids("30"), EOS_ID],
    ]
    assert batch["input_ids"].dtype == torch.int64


def test_supervised_batch_refuses_problems_longer_than_the_model(tokenizer) -> None:
    with pytest.raises(BootstrapError, match="tokens but the model takes 8"):
        supervised_batch([Problem("123+456=", "579", "k")], tokenizer, max_length=8)


def test_learning_rate_schedule_warms_up_then_decays_to_the_floor() -> None:
    settings = BootstrapSettings(
        num_steps=100, num_warmup_steps=10, learning_rate=1.0, final_learning_rate_fraction=0.1
    )
    assert learning_rate_at(settings, 0) == pytest.approx(0.1)
    assert learning_rate_at(settings, 9) == pytest.approx(1.0)
    assert learning_rate_at(settings, 10) == pytest.approx(1.0)
    assert learning_rate_at(settings, 55) == pytest.approx(0.55)
    assert learning_rate_at(settings, 100) == pytest.approx(0.1)


def test_settings_fingerprint_covers_every_field() -> None:
    base = BootstrapSettings()
    assert base.fingerprint() == BootstrapSettings().fingerprint()
    changed = [
        BootstrapSettings(task="sort"),
        BootstrapSettings(seed=1),
        BootstrapSettings(num_steps=base.num_steps + 1),
        BootstrapSettings(learning_rate=base.learning_rate * 2),
        BootstrapSettings(shape=TinyModelShape(hidden_size=64)),
    ]
    assert len({settings.fingerprint() for settings in changed} | {base.fingerprint()}) == len(changed) + 1
