"""kill -9 of the coordinator, the trainer and a node at random points of a real run, each
restarted, then the proof from the store (issue 17): no accepted group lost, none trained twice,
versions and steps gap-free, every spooled batch stored once, credit matching the groups, and a
trainer that outlived every coordinator kill."""

from __future__ import annotations

import random
import re
import time
from collections import Counter
from pathlib import Path

import pytest

from node.daemon import read_status
from protocol.identity import Identity
from tests.integration.cluster import Cluster, Process, wait_for

GROUPS_PER_STEP = 2
# No backlog limit: the nodes never wait for the trainer, so a coordinator kill finds them generating.
# The reverse task gives partial credit, so even the untrained model's groups have a reward spread:
# steps train and publish versions (kills land in publishing too), rather than being skipped.
COORDINATOR_SETTINGS = [
    "--set",
    "run.task=reverse",
    "--set",
    "run.group_size=4",
    "--set",
    "run.prompts_per_lease=2",
    "--set",
    "run.sampling.max_tokens=8",
    "--set",
    "run.max_backlog_groups=0",
]
NODE_FLAGS = ["--batch-size", "8"]
STEP_LINE = re.compile(r"step (\d+): reward")
RESENT_LINE = re.compile(r"re-sending spooled batch ([0-9a-f]{16})")
PROGRESS_TIMEOUT_S = 300
NODE_ID_LINE = "node id: "
SPOOL_WAIT_S = 20
MAX_SPOOL_TRIES = 8


class ChaosRun:
    """One coordinator, one trainer and two nodes; `kill` hits one of them with SIGKILL and starts
    it again. node-1 is the node that gets killed; node-2 keeps work coming."""

    def __init__(self, root: Path, model_dir: Path, *, checkpoint_every: int):
        identity = Identity.generate()
        (root / "trainer").mkdir()
        identity.save(root / "trainer" / "trainer.key")
        self.root = root
        self.cluster = Cluster(root, model_dir, identity)
        self.trainer_args = [
            "trainer",
            "run",
            "--coordinator",
            self.cluster.address,
            "--model",
            str(model_dir),
            "--data-dir",
            str(root / "trainer"),
            "--set",
            f"groups_per_step={GROUPS_PER_STEP}",
            "--set",
            f"checkpoint_every={checkpoint_every}",
            "--set",
            "eval_every=0",
        ]
        self.num_starts = {"coordinator": 0, "trainer": 0, "node-1": 0}
        self.processes: dict[str, Process] = {}
        self.num_kills: Counter[str] = Counter()
        self.num_coordinator_kills_survived = 0

    def start(self) -> None:
        self._start("coordinator")
        self._start("trainer")
        self._start("node-1")
        self.cluster.start_node("node-2", *NODE_FLAGS)

    def _start(self, role: str) -> None:
        self.num_starts[role] += 1
        if role == "coordinator":
            self.processes[role] = self.cluster.start_coordinator(*COORDINATOR_SETTINGS)
        elif role == "trainer":
            resume = ["--resume"] if self.num_starts[role] > 1 else []
            self.processes[role] = self.cluster.spawn(f"trainer-{self.num_starts[role]}", [*self.trainer_args, *resume])
        else:
            self.processes[role] = self.cluster.start_node(role, *NODE_FLAGS)
            wait_for(
                lambda: self.node_log().count(NODE_ID_LINE) == self.num_starts[role],
                PROGRESS_TIMEOUT_S,
                "node-1 to register",
            )

    def node_log(self) -> str:
        return (self.root / "node-1.log").read_text(errors="replace")

    def trainer_steps(self) -> list[int]:
        """The steps the running trainer process has logged."""
        return [int(step) for step in STEP_LINE.findall(self.processes["trainer"].log())]

    def wait_for_a_new_step(self) -> None:
        trainer = self.processes["trainer"]
        num_steps = len(self.trainer_steps())
        wait_for(
            lambda: len(self.trainer_steps()) > num_steps or trainer.popen.poll() is not None,
            PROGRESS_TIMEOUT_S,
            "the trainer to make a step",
            interval_s=0.2,
        )
        assert trainer.popen.poll() is None, f"the trainer exited:\n{trainer.log()[-3000:]}"

    def kill9(self, role: str) -> None:
        self.processes[role].kill9()
        self.num_kills[role] += 1

    def kill(self, role: str, rng: random.Random) -> None:
        if role == "spooled":
            self.kill_a_node_holding_a_spooled_batch()
            return
        self.kill9(role)
        if role == "coordinator":
            time.sleep(rng.uniform(0.0, 3.0))  # the outage
            self.restart_coordinator()
        else:
            self._start(role)

    def restart_coordinator(self) -> None:
        """Start the killed coordinator again; the trainer that was running makes its next step."""
        trainer = self.processes["trainer"]
        self._start("coordinator")
        self.wait_for_a_new_step()
        assert self.processes["trainer"] is trainer and trainer.popen.poll() is None
        self.num_coordinator_kills_survived += 1

    def kill_a_node_holding_a_spooled_batch(self) -> None:
        """Right after node-1 finished a batch (it is likely generating the next), kill -9 the
        coordinator; when node-1 spools a batch it cannot submit, kill -9 it too. Both restart, and
        node-1 re-sends the batch. A try in which node-1 spools nothing restarts the coordinator and
        tries again."""
        spool = self.root / "node-1" / "spool"
        for _ in range(MAX_SPOOL_TRIES):
            num_tokens = read_status(self.root / "node-1").num_tokens_generated
            wait_for(
                lambda num_tokens=num_tokens: read_status(self.root / "node-1").num_tokens_generated > num_tokens,
                PROGRESS_TIMEOUT_S,
                "node-1 to generate",
                interval_s=0.1,
            )
            num_resent = len(RESENT_LINE.findall(self.node_log()))
            self.kill9("coordinator")
            try:
                wait_for(lambda: list(spool.glob("*.batch")), SPOOL_WAIT_S, "node-1 to spool a batch", interval_s=0.1)
            except AssertionError:
                self.restart_coordinator()
                continue
            self.kill9("node-1")
            self.restart_coordinator()
            self._start("node-1")
            wait_for(
                lambda num_resent=num_resent: len(RESENT_LINE.findall(self.node_log())) > num_resent,
                PROGRESS_TIMEOUT_S,
                "node-1 to re-send its spooled batch",
            )
            return
        raise AssertionError(f"node-1 spooled no batch in {MAX_SPOOL_TRIES} coordinator outages")

    def stop(self) -> None:
        """Nodes, then the trainer (it checkpoints), then the coordinator, each by its pid."""
        for process in reversed(self.cluster.processes):
            if process.name.startswith("node"):
                process.terminate(timeout_s=60)
        self.processes["trainer"].terminate(timeout_s=120)
        self.cluster.stop_all()

    def last_checkpoint_step(self) -> int:
        steps = [int(p.name.split("-")[1]) for p in (self.root / "trainer" / "checkpoints").glob("step-*")]
        return max(steps, default=0)


def run_chaos(root: Path, model_dir: Path, schedule: list[str], *, seed: int, checkpoint_every: int) -> ChaosRun:
    rng = random.Random(seed)
    run = ChaosRun(root, model_dir, checkpoint_every=checkpoint_every)
    try:
        run.start()
        run.wait_for_a_new_step()
        for role in schedule:
            time.sleep(rng.uniform(0.0, 2.0))  # a random point of the run
            run.kill(role, rng)
            run.wait_for_a_new_step()
    finally:
        run.stop()
    return run


def assert_nothing_lost_or_repeated(run: ChaosRun) -> str:
    """The proof from the store; returns its figures as one line."""
    query = run.cluster.query
    last_checkpoint = run.last_checkpoint_step()
    assert last_checkpoint >= 1

    # Trained exactly once: the ledger holds a group at most once, every step of the final trainer's
    # history consumed exactly its groups, and no step beyond its last checkpoint holds any.
    ledger = query("SELECT group_id, trainer_step FROM group_consumptions")
    assert len({group_id for group_id, _ in ledger}) == len(ledger)
    per_step = Counter(step for _, step in ledger)
    assert sorted(per_step) == list(range(1, last_checkpoint + 1)), "trainer steps must be gap-free"
    assert set(per_step.values()) == {GROUPS_PER_STEP}

    # No accepted group lost: consumed groups are exactly the ledger's; every accepted rollout is in
    # a stored group.
    consumed = {group_id for (group_id,) in query("SELECT group_id FROM groups WHERE state = 'consumed'")}
    assert consumed == {group_id for group_id, _ in ledger}
    ((num_accepted,),) = query("SELECT COALESCE(SUM(num_accepted), 0) FROM submissions")
    ((num_grouped,),) = query("SELECT COALESCE(SUM(num_rollouts), 0) FROM groups")
    assert num_accepted == num_grouped > 0

    versions = [version for (version,) in query("SELECT version FROM policy_versions ORDER BY version")]
    assert versions == list(range(1, len(versions) + 1)), "policy versions must be gap-free"
    metric_steps = [step for (step,) in query("SELECT step FROM trainer_metrics ORDER BY step")]
    assert metric_steps == list(range(1, len(metric_steps) + 1)) and len(metric_steps) >= last_checkpoint

    # Spool re-sent exactly once: a batch (and a lease) is stored once, and every batch a node
    # re-sent after its restart is stored.
    assert not query("SELECT lease_id FROM submissions GROUP BY lease_id HAVING COUNT(*) > 1")
    stored = {bytes(batch_hash).hex() for (batch_hash,) in query("SELECT batch_hash FROM submissions")}
    node_log = (run.root / "node-1.log").read_text(errors="replace")
    for prefix in RESENT_LINE.findall(node_log):
        assert sum(batch_hash.startswith(prefix) for batch_hash in stored) == 1
    assert not list((run.root / "node-1" / "spool").glob("*.batch"))

    # Credit: one contribution per stored group, of its node, tokens and rollouts.
    assert not query(
        "SELECT g.group_id FROM groups g LEFT JOIN contributions c ON c.group_id = g.group_id "
        "WHERE c.group_id IS NULL OR c.node_id != g.node_id OR c.num_tokens != g.num_tokens "
        "OR c.num_rollouts != g.num_rollouts"
    )
    ((num_contributions,),) = query("SELECT COUNT(*) FROM contributions")
    ((num_groups,),) = query("SELECT COUNT(*) FROM groups")
    assert num_contributions == num_groups
    num_by_state = dict(query("SELECT state, COUNT(*) FROM groups GROUP BY state"))
    return (
        f"kills {dict(run.num_kills)}, coordinator kills survived by the trainer {run.num_coordinator_kills_survived}; "
        f"{num_groups} groups {num_by_state} of {num_accepted} accepted rollouts, {len(ledger)} consumed once "
        f"in steps 1..{last_checkpoint}, versions 1..{len(versions)}, {len(metric_steps)} metric rows, "
        f"{len(RESENT_LINE.findall(node_log))} spooled batches re-sent and stored once, "
        f"{num_contributions} contributions"
    )


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_chaos_kills_of_every_role_lose_and_repeat_nothing(tmp_path, tiny_model):
    rng = random.Random(17)
    schedule = ["coordinator", "trainer", "node-1"] * 5
    rng.shuffle(schedule)
    schedule.insert(0, "spooled")  # first, while node-1 works without a lease cap or a long backoff to wait out
    run = run_chaos(tmp_path, tiny_model, schedule, seed=17, checkpoint_every=3)
    assert min(run.num_kills[role] for role in ("coordinator", "trainer", "node-1")) >= 5, run.num_kills
    assert run.num_coordinator_kills_survived == run.num_kills["coordinator"] == run.num_starts["coordinator"] - 1
    assert run.num_starts["trainer"] == 6 and run.num_starts["node-1"] == 7
    assert RESENT_LINE.search(run.node_log())
    ((num_versions,),) = run.cluster.query("SELECT COUNT(*) FROM policy_versions")
    assert num_versions > run.num_starts["trainer"], "steps should have published versions, not only trainer starts"
    print(assert_nothing_lost_or_repeated(run))


def test_a_coordinator_restart_and_a_trainer_kill_before_its_first_checkpoint_lose_nothing(tmp_path, tiny_model):
    """The short variant: the trainer rides out a coordinator restart, then is killed before any
    checkpoint and resumes at step 0."""
    run = run_chaos(tmp_path, tiny_model, ["coordinator", "trainer"], seed=5, checkpoint_every=1000)
    assert run.num_coordinator_kills_survived == 1
    assert "resumed at step 0 from the initial model" in run.cluster.root.joinpath("trainer-2.log").read_text()
    print(assert_nothing_lost_or_repeated(run))
