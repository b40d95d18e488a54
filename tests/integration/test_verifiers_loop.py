"""The `verifiers` environments that ship with rollproof, through the real loop (`rollproof up` on the
untrained tiny model): the single-turn taskset `rollproof-copy` and the multi-turn env `rollproof-guess`.
The coordinator fully checks every submission, re-deriving each environment turn and each reward; both
runs take two trainer steps with every rollout accepted."""

from __future__ import annotations

import functools
import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from protocol import convert
from protocol.proto import rollout_pb2
from protocol.types import Rollout
from tests.integration.cluster import wait_for

pytest.importorskip("verifiers.v1")

SINGLE_TURN = "verifiers:rollproof-copy"
MULTI_TURN = "verifiers:rollproof-guess"
NUM_STEPS = 2
GUESS_HINTS = {"\n<\n", "\n>\n", "\n?\n"}


def start_up(task: str, data_dir: Path, model: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rollproof.cli",
            "up",
            "--model",
            str(model),
            "--task",
            task,
            "--steps",
            str(NUM_STEPS),
            "--nodes",
            "1",
            "--data-dir",
            str(data_dir),
            "--trainer-set",
            "groups_per_step=2",
            "--trainer-set",
            "eval_problems=4",
            "--coordinator-set",
            "run.group_size=4",
            "--coordinator-set",
            "validation.num_initial_checks=1000000",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def coordinator_endpoints(data_dir: Path) -> list[Path]:
    return list(data_dir.glob("runs/*/coordinator/endpoints.json"))


def run_dir(data_dir: Path) -> Path:
    return next(data_dir.glob("runs/*"))


def query(data_dir: Path, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(next(run_dir(data_dir).glob("**/coordinator.sqlite3"))) as store:
        return store.execute(sql).fetchall()


def accepted_rollouts(data_dir: Path) -> list[Rollout]:
    return [
        rollout
        for (group_bytes,) in query(data_dir, "SELECT group_bytes FROM groups")
        for rollout in convert.group_from_proto(rollout_pb2.RolloutGroup.FromString(group_bytes)).rollouts
    ]


def environment_texts(rollout: Rollout, tokenizer: Any) -> list[str]:
    """Each maximal run of environment (unsampled) tokens of `rollout`, decoded."""
    texts: list[str] = []
    current: list[int] = []
    for token_id, sampled in zip(rollout.token_ids, rollout.sampled_mask, strict=True):
        if not sampled:
            current.append(token_id)
        elif current:
            texts.append(tokenizer.decode(current))
            current = []
    if current:
        texts.append(tokenizer.decode(current))
    return texts


def test_verifiers_single_and_multi_turn_environments_train_through_the_loop(tmp_path: Path, tiny_model: Path) -> None:
    from policy.tokenizer import load_tokenizer

    data_dirs = {task: tmp_path / task.replace(":", "-") for task in (SINGLE_TURN, MULTI_TURN)}
    runs: dict[str, subprocess.Popen[str]] = {}
    try:
        for task, data_dir in data_dirs.items():
            runs[task] = start_up(task, data_dir, tiny_model)
            # The next run starts once this one's coordinator holds its ports.
            wait_for(functools.partial(coordinator_endpoints, data_dir), 120, f"{task}'s coordinator")
        outputs = {task: up.communicate(timeout=240)[0] for task, up in runs.items()}
    finally:
        for up in runs.values():
            if up.poll() is None:
                up.terminate()  # `up` stops every child it started, as on Ctrl-C
                try:
                    up.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(up.pid, signal.SIGKILL)
                    up.wait(timeout=30)
    for task, data_dir in data_dirs.items():
        assert runs[task].returncode == 0, outputs[task][-3000:]
        metrics = (run_dir(data_dir) / "trainer" / "metrics.jsonl").read_text().splitlines()
        assert max(json.loads(line)["step"] for line in metrics if line) == NUM_STEPS, task
        ((accepted, rejected),) = query(data_dir, "SELECT SUM(num_accepted), SUM(num_rejected) FROM submissions")
        assert accepted > 0 and rejected == 0, (task, accepted, rejected)
        checks = query(data_dir, "SELECT passed FROM validation_results")
        assert checks and all(passed for (passed,) in checks), task

    tokenizer = load_tokenizer(tiny_model)
    single_turn = accepted_rollouts(data_dirs[SINGLE_TURN])
    assert single_turn and all(all(rollout.sampled_mask) for rollout in single_turn)
    environment_turns = [
        text for rollout in accepted_rollouts(data_dirs[MULTI_TURN]) for text in environment_texts(rollout, tokenizer)
    ]
    assert environment_turns and set(environment_turns) <= GUESS_HINTS, environment_turns
