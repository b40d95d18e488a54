"""`rollproof bootstrap`: a loadable, cached, deterministic warm-up of the tiny model."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from envs import Problem, registry
from envs.base import GeneratedTask, HashStream
from envs.synthetic import exact_match_reward
from policy.bootstrap import (
    REPORT_FILE,
    BootstrapError,
    BootstrapSettings,
    bootstrapped_model_dir,
    cached_model_dir,
    ensure_bootstrapped,
)
from policy.model import TinyModelShape, load_model, summarize_model
from policy.tokenizer import load_tokenizer

TINY_SETTINGS = BootstrapSettings(
    num_steps=3,
    batch_size=8,
    num_warmup_steps=1,
    num_eval_problems=8,
    shape=TinyModelShape(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
)


def test_small_bootstrap_makes_a_loadable_directory_then_hits_the_cache(tmp_path: Path) -> None:
    first = ensure_bootstrapped(TINY_SETTINGS, cache_root=tmp_path)
    assert not first.cached
    assert first.directory == cached_model_dir(TINY_SETTINGS, tmp_path)
    assert first.directory.name == f"addition-{TINY_SETTINGS.fingerprint()}"
    assert sorted(path.name for path in first.directory.parent.iterdir()) == [first.directory.name]
    model = load_model(first.directory, dtype="bfloat16")
    assert summarize_model(model).hidden_size == 32
    assert load_tokenizer(first.directory)("1+2=").input_ids[0] == model.config.bos_token_id
    assert 0.0 <= first.report["eval_reward_after"] <= 1.0
    assert first.report["num_eval_problems"] == 8

    second = ensure_bootstrapped(TINY_SETTINGS, cache_root=tmp_path)
    assert second.cached
    assert second.directory == first.directory
    assert second.report == first.report


@dataclass(frozen=True)
class ConstantAnswerTask(GeneratedTask):
    """`"q123="` → `"7"`: learnt within a few steps."""

    name: str = "constant-answer"
    description: str = "always answer 7"

    def generate(self, stream: HashStream) -> Problem:
        prompt = f"q{stream.below(1000)}="
        return Problem(prompt=prompt, answer="7", key=prompt)

    def reward(self, problem: Problem, completion: str) -> float:
        return exact_match_reward(problem.answer, completion)


def test_bootstrap_stops_once_the_validation_reward_reaches_its_target(tmp_path: Path, monkeypatch) -> None:
    """The warm-up stops at the first check that reaches the target, and trains every step when no
    target is set."""
    monkeypatch.setitem(registry._FACTORIES, ConstantAnswerTask.name, ConstantAnswerTask)  # this test only
    settings = replace(
        TINY_SETTINGS,
        task=ConstantAnswerTask.name,
        num_steps=200,
        check_every=5,
        stop_at_reward=0.9,
        num_check_problems=8,
    )
    stopped = ensure_bootstrapped(settings, out_dir=tmp_path / "stopped").report
    assert stopped["num_steps_trained"] % 5 == 0 and stopped["num_steps_trained"] < 200
    assert stopped["check_reward"] >= 0.9
    full = ensure_bootstrapped(replace(settings, num_steps=20, stop_at_reward=None), out_dir=tmp_path / "full").report
    assert full["num_steps_trained"] == 20 and full["check_reward"] is None


def test_bootstrap_is_deterministic(tmp_path: Path) -> None:
    first = ensure_bootstrapped(TINY_SETTINGS, out_dir=tmp_path / "a")
    second = ensure_bootstrapped(TINY_SETTINGS, out_dir=tmp_path / "b")
    weights = [(result.directory / "model.safetensors").read_bytes() for result in (first, second)]
    assert weights[0] == weights[1]
    other_seed = ensure_bootstrapped(replace(TINY_SETTINGS, seed=1), out_dir=tmp_path / "c")
    assert (other_seed.directory / "model.safetensors").read_bytes() != weights[0]


def test_settings_change_the_fingerprint_and_a_foreign_directory_is_refused(tmp_path: Path) -> None:
    assert TINY_SETTINGS.fingerprint() != replace(TINY_SETTINGS, num_steps=4).fingerprint()
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / REPORT_FILE).write_text('{"fingerprint": "someone-else"}')
    with pytest.raises(BootstrapError, match="delete it or choose another"):
        ensure_bootstrapped(TINY_SETTINGS, out_dir=occupied)
    with pytest.raises(BootstrapError, match="num_steps"):
        BootstrapSettings(num_steps=0)
    with pytest.raises(BootstrapError, match="stop_at_reward"):
        BootstrapSettings(stop_at_reward=1.5)
    with pytest.raises(ValueError, match="unknown task"):
        ensure_bootstrapped(BootstrapSettings(task="nope"), cache_root=tmp_path)


def test_cli_prints_the_cached_path_at_once(tmp_path: Path, rollproof_command: list[str]) -> None:
    # A fake cache entry for the settings the flags select: the real making is tested above.
    settings = BootstrapSettings(num_steps=1, seed=5)
    entry = cached_model_dir(settings, tmp_path)
    entry.mkdir(parents=True)
    report = {
        "fingerprint": settings.fingerprint(),
        "eval_reward_before": 0.0,
        "eval_reward_after": 0.25,
        "model": {"num_parameters": 1},
        "train_seconds": 1.0,
    }
    (entry / REPORT_FILE).write_text(json.dumps(report))
    command = [*rollproof_command, "bootstrap", "--steps", "1", "--seed", "5", "--data-dir", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=True)
    lines = result.stdout.strip().splitlines()
    assert lines[-1] == str(entry)
    assert lines[-2].startswith("cached: held-out greedy reward 0.000 before, 0.250 after")


def test_bootstrapped_model_dir_reuses_the_cache_entry_of_the_default_settings(tmp_path: Path) -> None:
    entry = cached_model_dir(BootstrapSettings(task="sort"), tmp_path)
    entry.mkdir(parents=True)
    (entry / REPORT_FILE).write_text(json.dumps({"fingerprint": BootstrapSettings(task="sort").fingerprint()}))
    assert bootstrapped_model_dir("sort", cache_root=tmp_path) == entry


def test_cli_unknown_task_is_a_user_error(tmp_path: Path, rollproof_command: list[str]) -> None:
    result = subprocess.run(
        [*rollproof_command, "bootstrap", "--task", "nope", "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert "unknown task 'nope'" in result.stderr


@pytest.mark.slow
def test_default_bootstrap_leaves_room_for_reinforcement_learning(tmp_path: Path) -> None:
    result = ensure_bootstrapped(BootstrapSettings(), cache_root=tmp_path)
    assert result.report["eval_reward_before"] < 0.05
    assert 0.15 <= result.report["eval_reward_after"] <= 0.6
