"""kill -9 of the trainer mid-run, then --resume (issue 6)."""

import json
import os
import signal
import sqlite3

from protocol.identity import Identity
from tests.integration.cluster import Cluster, wait_for

TRAINER_FLAGS = [
    "--set",
    "groups_per_step=2",
    "--set",
    "checkpoint_every=10",
    "--set",
    "eval_every=0",
]


def steps_logged(cluster: Cluster) -> list[int]:
    path = cluster.root / "trainer" / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def consumptions(cluster: Cluster) -> list[tuple[str, int]]:
    connection = sqlite3.connect(cluster.coordinator_dir / "coordinator.sqlite3", timeout=30)
    try:
        return connection.execute("SELECT group_id, trainer_step FROM group_consumptions").fetchall()
    finally:
        connection.close()


def test_trainer_killed_and_resumed_trains_no_group_twice(tmp_path, tiny_model):
    identity = Identity.generate()
    (tmp_path / "trainer").mkdir()
    identity.save(tmp_path / "trainer" / "trainer.key")
    cluster = Cluster(tmp_path, tiny_model, identity)
    trainer_args = [
        "trainer",
        "run",
        "--coordinator",
        cluster.address,
        "--model",
        str(tiny_model),
        "--data-dir",
        str(tmp_path / "trainer"),
        *TRAINER_FLAGS,
    ]
    try:
        cluster.start_coordinator(
            "--set", "run.group_size=4", "--set", "run.prompts_per_lease=2", "--set", "run.sampling.max_tokens=8"
        )
        trainer = cluster.spawn("trainer", trainer_args)
        cluster.start_node("node-1", "--batch-size", "8")
        wait_for(lambda: max(steps_logged(cluster), default=0) >= 12, 240, "12 trainer steps", interval_s=0.05)
        os.kill(trainer.popen.pid, signal.SIGSTOP)  # a still picture: checkpoint at 10, steps after it consumed
        trainer.kill9()
        consumed_before = consumptions(cluster)
        last_checkpoint = max(int(p.name.split("-")[1]) for p in (tmp_path / "trainer" / "checkpoints").glob("step-*"))
        assert any(step > last_checkpoint for _, step in consumed_before), "the kill should lose some steps"

        resumed = cluster.spawn("trainer-resumed", [*trainer_args, "--resume"])
        wait_for(lambda: "resumed at step" in resumed.log(), 120, "the trainer to resume")
        assert f"resumed at step {last_checkpoint}" in resumed.log()
        wait_for(lambda: steps_logged(cluster).count(last_checkpoint + 1) >= 2, 240, "training to continue")

        ledger = consumptions(cluster)
        group_ids = [group_id for group_id, _ in ledger]
        assert len(group_ids) == len(set(group_ids)), "a group was consumed twice"
        lost = {g for g, step in consumed_before if step > last_checkpoint}
        kept = {g for g, step in consumed_before if step <= last_checkpoint}
        assert kept <= set(group_ids), "groups of checkpointed steps must stay consumed"
        assert all(step <= last_checkpoint for g, step in ledger if g in kept)
        assert not any(g in lost and step <= last_checkpoint for g, step in ledger)
        node_log = (tmp_path / "node-1.log").read_text()
        assert "keyframe" in node_log
    finally:
        cluster.stop_all()
