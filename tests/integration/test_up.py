"""`rollproof up` as a user runs it: starts everything, trains, Ctrl-C stops every child."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from tests.integration.cluster import wait_for


def command_line(pid: int) -> str | None:
    """A live process's command line, its arguments joined by spaces; None once it is gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None


def _children_of_run(run_root) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        cmdline = command_line(int(entry))
        if cmdline is not None and str(run_root) in cmdline and "rollproof.cli" in cmdline:
            pids.append(int(entry))
    return pids


def test_up_trains_and_ctrl_c_stops_every_child(tmp_path, tiny_model):
    data_dir = tmp_path / "up"
    up = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rollproof.cli",
            "up",
            "--model",
            str(tiny_model),
            "--data-dir",
            str(data_dir),
            "--trainer-set",
            "groups_per_step=2",
            "--trainer-set",
            "eval_problems=10",
            "--coordinator-set",
            "run.group_size=4",
            "--node-set",
            "display_name=up-node",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:

        def trained_steps():
            metrics = list(data_dir.glob("runs/*/trainer/metrics.jsonl"))
            if not metrics:
                return 0
            return max((json.loads(line)["step"] for line in metrics[0].read_text().splitlines() if line), default=0)

        wait_for(lambda: trained_steps() >= 2, 240, "two trainer steps")
        assert len(set(_children_of_run(data_dir)) - {up.pid}) == 4  # coordinator, trainer, two nodes
        os.kill(up.pid, signal.SIGINT)
        output, _ = up.communicate(timeout=120)
    finally:
        if up.poll() is None:
            os.kill(up.pid, signal.SIGTERM)
            try:
                up.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(up.pid, signal.SIGKILL)
        for pid in _children_of_run(data_dir):
            os.kill(pid, signal.SIGKILL)
    assert up.returncode == 0, output[-3000:]
    assert "held-out reward of the published policy" in output
    assert "dashboard" in output
    time.sleep(0.5)
    assert _children_of_run(data_dir) == []
    run_dir = next(data_dir.glob("runs/*"))
    assert list((run_dir / "trainer" / "checkpoints").glob("step-*")), "the trainer checkpoints when stopped"
    with sqlite3.connect(next(run_dir.glob("**/coordinator.sqlite3"))) as store:
        names = [name for (name,) in store.execute("SELECT display_name FROM nodes")]
    assert names == ["up-node", "up-node"]  # --node-set reaches every node


@pytest.mark.slow
def test_up_raises_the_held_out_reward_of_the_default_model(tmp_path):
    """The issue's main claim, shortened: `rollproof up` on the bootstrapped default model and task,
    200 trainer steps (about 3 minutes on 2 cores), the held-out reward of the published policy rises."""
    data_dir = tmp_path / "up"
    result = subprocess.run(
        [sys.executable, "-m", "rollproof.cli", "up", "--steps", "200", "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = next(data_dir.glob("runs/*/trainer/metrics.jsonl"))
    rewards = [
        record["eval_reward"] for record in map(json.loads, metrics.read_text().splitlines()) if "eval_reward" in record
    ]
    first, last = rewards[0], sum(rewards[-3:]) / 3
    assert last >= first + 0.15, rewards
