"""`rollproof up` starts a coordinator that exits again (its trainer and nodes ride out the gap
under their retry policy), a bounded number of times (issue 17)."""

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from rollproof.launcher import MAX_COORDINATOR_RESTARTS, Launcher, UpOptions
from tests.integration.cluster import wait_for
from tests.integration.test_up import _children_of_run, command_line

NUM_STEPS = 6
STEP_LINE = re.compile(r"step (\d+): reward")


def test_an_exited_coordinator_is_started_again_with_its_arguments(tmp_path):
    launcher = Launcher(
        UpOptions(model=Path("unused"), task="addition", num_nodes=1, num_steps=1, run_dir=tmp_path / "run")
    )
    first = launcher._spawn("coordinator", ["version"], {"ROLLPROOF_TEST_MARK": "1"})
    first.popen.wait(timeout=120)
    try:
        assert launcher.revive_coordinator()
        revived = launcher.child("coordinator")
        assert revived is not first and revived.popen.pid != first.popen.pid
        assert (revived.args, revived.env) == (["version"], {"ROLLPROOF_TEST_MARK": "1"})
        assert [c.name for c in launcher.children] == ["coordinator"]
        revived.popen.wait(timeout=120)
        assert "rollproof" in revived.log_path.read_text()

        launcher.num_coordinator_restarts = MAX_COORDINATOR_RESTARTS
        assert not launcher.revive_coordinator()
        assert launcher.child("coordinator") is revived
    finally:
        launcher.stop()


def _pid_of(data_dir: Path, role: str) -> int | None:
    """The pid of the run's child whose command line holds `role` ("coordinator serve", "trainer run")."""
    for pid in _children_of_run(data_dir):
        cmdline = command_line(pid)
        if cmdline is not None and role in cmdline:
            return pid
    return None


def test_up_keeps_its_trainer_through_a_coordinator_kill(tmp_path, tiny_model):
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
            "--steps",
            str(NUM_STEPS),
            "--trainer-set",
            "groups_per_step=2",
            "--trainer-set",
            "eval_problems=10",
            "--coordinator-set",
            "run.group_size=4",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )

    def trainer_log() -> str:
        logs = list(data_dir.glob("runs/*/logs/trainer.log"))
        return logs[0].read_text(errors="replace") if logs else ""

    try:
        wait_for(lambda: len(STEP_LINE.findall(trainer_log())) >= 2, 240, "two trainer steps")
        trainer_pid, killed_pid = _pid_of(data_dir, "trainer run"), _pid_of(data_dir, "coordinator serve")
        assert trainer_pid is not None and killed_pid is not None
        os.kill(killed_pid, signal.SIGKILL)
        wait_for(lambda: _pid_of(data_dir, "coordinator serve") not in (None, killed_pid), 60, "a new coordinator")
        assert _pid_of(data_dir, "trainer run") == trainer_pid
        output, _ = up.communicate(timeout=600)
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait(timeout=60)
        for pid in _children_of_run(data_dir):
            os.kill(pid, signal.SIGKILL)
    assert up.returncode == 0, output[-3000:]
    run_dir = next(data_dir.glob("runs/*"))
    coordinator_log = (run_dir / "logs" / "coordinator.log").read_text(errors="replace")
    assert coordinator_log.count("coordinator grpc=") == 2  # started, killed, started again
    assert "(TLS)" in coordinator_log
    log = trainer_log()
    assert log.count("resumed at step") == 1, "one trainer process ran the whole run"
    assert [int(step) for step in STEP_LINE.findall(log)] == list(range(1, NUM_STEPS + 1))
