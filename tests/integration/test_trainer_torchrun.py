"""The trainer under torchrun with FSDP2: 2 gloo processes on the CPU (issue 6)."""

import json
import pickle
import sys
from pathlib import Path

import pytest
import torch

from protocol.identity import Identity
from protocol.types import FinishReason, ReadyGroup, Rollout, RolloutGroup
from tests.integration.cluster import Cluster, wait_for

pytestmark = pytest.mark.slow

TORCHRUN = ("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2")
WORKER = Path(__file__).with_name("fsdp_step_worker.py")


def _groups(model) -> list[ReadyGroup]:
    """Three informative groups of three rollouts: nine sequences of different lengths, so
    that the two ranks get shards of 5 and 4 sequences."""
    from trainer.loss import token_logprobs

    generator = torch.Generator().manual_seed(0)
    groups = []
    for group_index in range(3):
        prompt = torch.randint(5, 90, (3 + group_index,), generator=generator).tolist()
        rollouts = []
        for sample_index, reward in enumerate([1.0, 0.0, 0.5]):
            completion = torch.randint(5, 90, (2 + sample_index + group_index,), generator=generator).tolist()
            ids = torch.tensor([prompt + completion])
            with torch.no_grad():
                logprobs = token_logprobs(model(input_ids=ids).logits[:, :-1], ids[:, 1:])[0, len(prompt) - 1 :]
            rollouts.append(
                Rollout(
                    sample_index=sample_index,
                    token_ids=tuple(completion),
                    sampled_mask=(True,) * len(completion),
                    logprobs=tuple((logprobs + 0.05).tolist()),
                    commitment=b"",
                    finish_reason=FinishReason.STOP,
                    claimed_reward=reward,
                )
            )
        groups.append(ReadyGroup(f"g{group_index}", 1, 0, tuple(prompt), RolloutGroup(0, tuple(rollouts)), "n"))
    return groups


def test_one_fsdp_step_on_two_ranks_equals_the_single_process_step(tmp_path, tiny_model):
    import subprocess

    from policy.model import load_model
    from trainer.config import LossSection, OptimizerSection
    from trainer.step import make_optimizer, train_step

    lr, grad_clip = 1e-3, 0.05
    model = load_model(tiny_model)
    groups = _groups(model)
    (tmp_path / "groups.pkl").write_bytes(pickle.dumps(groups))
    log_path = tmp_path / "torchrun.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                *TORCHRUN,
                str(WORKER),
                "--model",
                str(tiny_model),
                "--groups",
                str(tmp_path / "groups.pkl"),
                "--out",
                str(tmp_path / "fsdp.pt"),
                "--lr",
                str(lr),
                "--grad-clip",
                str(grad_clip),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            assert process.wait(timeout=300) == 0, log_path.read_text()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    sharded = torch.load(tmp_path / "fsdp.pt")

    initial = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    metrics = train_step(
        model,
        make_optimizer(model, OptimizerSection(lr=lr)),
        groups,
        current_version=1,
        temperature=1.0,
        pad_token_id=0,
        loss_config=LossSection(),
        grad_clip=grad_clip,
    ).as_dict()
    assert metrics["grad_norm"] > grad_clip, "the test should exercise clipping by the global norm"
    assert sorted(sharded["weights"]) == sorted(initial)
    for name, parameter in model.named_parameters():
        assert not torch.equal(parameter.detach(), initial[name]) or name == "model.embed_tokens.weight"
        torch.testing.assert_close(sharded["weights"][name], parameter.detach(), msg=name)
    for key in ("loss", "grad_norm", "masked_fraction", "mean_ratio", "logprob_mismatch"):
        assert sharded["metrics"][key] == pytest.approx(metrics[key], rel=1e-4, abs=1e-6), key
    for key in ("num_sequences", "num_loss_tokens", "num_groups"):
        assert sharded["metrics"][key] == metrics[key]


def _steps_logged(data_dir: Path) -> list[dict]:
    path = data_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_trainer_under_torchrun_trains_publishes_and_resumes(tmp_path):
    from policy.bootstrap import bootstrapped_model_dir

    model_dir = bootstrapped_model_dir()  # warmed up: most groups have a reward spread to learn from
    identity = Identity.generate()
    data_dir = tmp_path / "trainer"
    data_dir.mkdir()
    identity.save(data_dir / "trainer.key")
    cluster = Cluster(tmp_path, model_dir, identity)
    trainer_args = [
        "trainer",
        "run",
        "--coordinator",
        cluster.address,
        "--model",
        str(model_dir),
        "--data-dir",
        str(data_dir),
        "--set",
        "groups_per_step=2",
        "--set",
        "eval_every=0",
        "--set",
        "checkpoint_every=2",
        "--set",
        "dtype=bfloat16",
    ]
    try:
        cluster.start_coordinator(
            "--set", "run.group_size=4", "--set", "run.prompts_per_lease=2", "--set", "run.sampling.max_tokens=8"
        )
        cluster.start_node("node-1", "--batch-size", "8")
        first = cluster.spawn("trainer", [*trainer_args, "--max-steps", "3"], launcher=TORCHRUN)
        assert first.popen.wait(timeout=600) == 0, first.log()
        assert [r["step"] for r in _steps_logged(data_dir)] == [1, 2, 3]
        assert "trainer key id" in first.log()

        resumed = cluster.spawn("trainer-resumed", [*trainer_args, "--max-steps", "5", "--resume"], launcher=TORCHRUN)
        assert resumed.popen.wait(timeout=600) == 0, resumed.log()
        assert "resumed at step 3" in resumed.log()
        records = _steps_logged(data_dir)
        assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
        trained = [r for r in records if not r["skipped"]]
        assert trained and all(r["num_sequences"] > 0 and r["num_loss_tokens"] > 0 for r in trained)

        latest = max(int(p.name.split(".")[0]) for p in (cluster.coordinator_dir / "policy" / "manifests").iterdir())
        assert latest == records[-1]["policy_version"] >= 3
        wait_for(
            lambda: f"policy version {latest} applied" in (tmp_path / "node-1.log").read_text(),
            120,
            "the node to apply the newest version",
        )
        ledger = [g for (g,) in cluster.query("SELECT group_id FROM group_consumptions")]
        assert len(ledger) == len(set(ledger)) == 10

        running = cluster.spawn("trainer-stopped", [*trainer_args, "--resume"], launcher=TORCHRUN)
        wait_for(lambda: len(_steps_logged(data_dir)) >= 6, 300, "a step after the second resume")
        running.terminate(timeout_s=120)  # SIGTERM to torchrun, which passes it to every rank
        stopped_at = int(running.log().split("stopped at step ")[1].split(",")[0])
        assert stopped_at >= 6 and (data_dir / "checkpoints" / f"step-{stopped_at:08d}").is_dir()
    finally:
        cluster.stop_all()
