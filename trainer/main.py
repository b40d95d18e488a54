"""`rollproof trainer run`: stream accepted groups, train, publish, acknowledge, checkpoint."""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field

import grpc
import torch

from protocol.codec import BF16State
from protocol.identity import load_role_identity
from protocol.retry import RetryPolicy
from protocol.types import ReadyGroup
from trainer.checkpoint import TrainerState, list_checkpoints, load_checkpoint, save_checkpoint
from trainer.client import TrainerClient
from trainer.config import TrainerConfig
from trainer.distributed import (
    broadcast_from_main,
    load_training_model,
    published_state,
    start_workers,
    stop_workers,
)
from trainer.publish import PolicyPublisher, PublishedVersion
from trainer.step import StepMetrics, make_optimizer, train_step

log = logging.getLogger(__name__)

# Waits between polls that find too few groups and after steps skipped for want of signal (so a
# run whose groups all have equal rewards does not spin through them at the coordinator's limit).
IDLE_BACKOFF = RetryPolicy(initial_backoff_s=0.2, max_backoff_s=2.0)


class TrainerKeyMismatchError(ValueError):
    """The coordinator accepts another trainer key than the one this trainer holds."""


def split_by_staleness(
    groups: list[ReadyGroup], current_version: int, max_staleness: int
) -> tuple[list[ReadyGroup], list[ReadyGroup]]:
    """(fresh, stale): a group is fresh when its policy is at most max_staleness versions old."""
    fresh = [g for g in groups if current_version - g.policy_version <= max_staleness]
    stale = [g for g in groups if current_version - g.policy_version > max_staleness]
    return fresh, stale


class PublishedPolicyEvaluator:
    """Held-out reward of the published policy: `model` takes the published bf16 state for the
    evaluation. When `model` is the training model (`is_copy` false) its weights are put back
    afterwards."""

    def __init__(self, model, model_dir, run_info, num_problems: int, *, is_copy: bool = False):
        from envs import get_task
        from policy.tokenizer import load_tokenizer

        self.model = model
        self.is_copy = is_copy
        self.tokenizer = load_tokenizer(model_dir)
        self.task = get_task(run_info.task)
        self.seed = run_info.run_seed
        self.max_tokens = run_info.sampling.max_tokens
        self.num_problems = num_problems

    def evaluate(self, published: BF16State) -> dict:
        from policy.evaluate import evaluate
        from policy.weights import load_bf16_state

        started = time.perf_counter()
        masters = [] if self.is_copy else [p.detach().clone() for p in self.model.parameters()]
        try:
            load_bf16_state(self.model, published)
            result = evaluate(
                self.model,
                self.tokenizer,
                self.task,
                num_problems=self.num_problems,
                seed=self.seed,
                max_tokens=self.max_tokens,
            )
        finally:
            if not self.is_copy:
                with torch.no_grad():
                    for parameter, master in zip(self.model.parameters(), masters, strict=True):
                        parameter.copy_(master)
        log.info("held-out reward %.3f (%d problems)", result.mean_reward, result.num_problems)
        return {"eval_reward": result.mean_reward, "eval_seconds": time.perf_counter() - started}


@dataclass
class TrainingRun:
    """What the steps of one run share. `client`, `publisher` and `evaluator` exist on rank 0 only
    (`evaluator` only when eval_every is set)."""

    client: TrainerClient | None
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    publisher: PolicyPublisher | None
    evaluator: PublishedPolicyEvaluator | None
    temperature: float
    pad_token_id: int
    state: TrainerState = field(default_factory=TrainerState)
    version: int = 0
    published_bf16: BF16State | None = None


@dataclass(frozen=True)
class StepOutcome:
    """One step as rank 0 records it."""

    metrics: StepMetrics
    waited_s: float
    published: PublishedVersion | None
    publish_s: float


class Trainer:
    """One trainer process. Under torchrun (trainer/distributed.py) each rank runs one; rank 0
    alone holds the key and talks to the coordinator, and its stop event stops them all.

    A run is `_setup` (run info, model, optimizer), `_resume` (checkpoint, coordinator, first
    publish), then `_step` on every rank and `_record` on rank 0 until stopped (`_train`)."""

    def __init__(self, config: TrainerConfig, *, resume: bool):
        self.config = config
        self.resume = resume
        if config.threads:
            torch.set_num_threads(config.threads)
        self.workers, self.device = start_workers(config.device)
        self.data_dir = config.data_dir.expanduser()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.checkpoint_dir = self.data_dir / "checkpoints"
        self.metrics_path = (config.metrics_file or self.data_dir / "metrics.jsonl").expanduser()
        self.key_path = (config.key_file or self.data_dir / "trainer.key").expanduser()
        self.identity = None
        if self.workers.is_main:
            self.identity, created = load_role_identity(config.key_file, self.data_dir / "trainer.key")
            if created:
                log.warning(
                    "created a new trainer key %s (key id %s): the coordinator must be started with "
                    "--trainer-key-fingerprint %s; to use an existing key pass --key-file",
                    self.key_path,
                    self.identity.key_id,
                    self.identity.key_id,
                )
        self.stop_event = threading.Event()
        self.prometheus = None
        self.wandb_run = None
        if not self.workers.is_main:
            return
        if config.metrics_port:
            from trainer.metrics import serve_metrics

            self.prometheus = serve_metrics(config.metrics_port)
        if config.wandb_project:
            try:
                import wandb
            except ImportError:
                raise ValueError(
                    "wandb_project is set but Weights & Biases is not installed: pip install wandb"
                ) from None
            self.wandb_run = wandb.init(project=config.wandb_project, config=config.model_dump(mode="json"))

    def run(self) -> TrainerState:
        try:
            return self._run()
        finally:
            stop_workers(self.workers)

    def _run(self) -> TrainerState:
        from policy.model import freeze_long_lived_objects

        if self.config.model is None:
            raise ValueError("model is not set: point it at the run's model directory")
        client = (
            TrainerClient(self.config.coordinator, self.identity, tls=self.config.coordinator_tls, stop=self.stop_event)
            if self.workers.is_main
            else None
        )
        try:
            run = self._setup(client)
            self._resume(run)
            freeze_long_lived_objects()
            try:
                self._train(run)
            except grpc.RpcError as error:
                if not self.stop_event.is_set():
                    raise
                log.warning(
                    "stopped at step %d while the coordinator does not answer (%s); a restart resumes "
                    "from the last checkpoint",
                    run.state.step,
                    error.code().name,
                )
                return run.state
            save_checkpoint(self.checkpoint_dir, run.model, run.optimizer, run.state, workers=self.workers)
            if client:
                log.info("stopped at step %d, policy version %d", run.state.step, run.version)
            return run.state
        finally:
            if client:
                client.close()

    def _setup(self, client: TrainerClient | None) -> TrainingRun:
        """The run's model, optimizer and sampling temperature on every rank; on rank 0 the run
        info (checked against this trainer's key), the publisher and the evaluator."""
        from policy.tokenizer import load_tokenizer

        config = self.config
        assert config.model is not None
        run_info = client.run_info() if client else None
        if run_info and run_info.trainer_key_fingerprint != self.identity.key_id:
            raise TrainerKeyMismatchError(
                f"the coordinator accepts trainer key {run_info.trainer_key_fingerprint}, but this trainer's key "
                f"{self.key_path} is {self.identity.key_id}: pass --key-file with the key whose id is "
                f"{run_info.trainer_key_fingerprint} (the one `rollproof keygen` printed), "
                f"or copy it to {self.key_path}"
            )
        model = load_training_model(config.model, dtype=config.dtype, device=self.device, workers=self.workers)
        pad_token_id = load_tokenizer(config.model.expanduser()).pad_token_id or 0
        optimizer = make_optimizer(model, config.optimizer)
        temperature = broadcast_from_main(self.workers, run_info.sampling.temperature if run_info else None) or 1.0
        return TrainingRun(
            client=client,
            model=model,
            optimizer=optimizer,
            publisher=(
                PolicyPublisher(self.identity, run_info.run_id, client, keyframe_interval=config.keyframe_interval)
                if client
                else None
            ),
            evaluator=self._evaluator(model, run_info) if client and config.eval_every else None,
            temperature=temperature,
            pad_token_id=pad_token_id,
        )

    def _resume(self, run: TrainingRun) -> None:
        """Load the newest checkpoint, have the coordinator put back the groups no checkpoint
        consumed, and publish the model as the version after the latest published."""
        checkpoints = list_checkpoints(self.checkpoint_dir)
        if checkpoints and not self.resume:
            raise ValueError(f"{self.checkpoint_dir} holds checkpoints: pass --resume, or use another data_dir")
        if checkpoints:
            run.state = load_checkpoint(checkpoints[-1], run.model, run.optimizer, workers=self.workers)
        version = None
        if run.client:
            # From step 0 too: groups consumed by steps no checkpoint holds are ready again.
            reply = run.client.resume(run.state.step)
            log.info(
                "resumed at step %d from %s; %d groups consumed after it are ready again",
                run.state.step,
                checkpoints[-1].name if checkpoints else "the initial model",
                reply.num_groups_restored,
            )
            version = reply.latest_policy_version + 1
        run.version = broadcast_from_main(self.workers, version)
        run.published_bf16 = published_state(run.model, self.workers)
        if run.publisher:
            run.publisher.publish(run.version, run.published_bf16)
            log.info("published policy version %d", run.version)
        run.state.latest_published_version = run.version
        if run.evaluator:
            self._write_metrics(
                {
                    "step": run.state.step,
                    "policy_version": run.version,
                    "time": time.time(),
                    **run.evaluator.evaluate(run.published_bf16),
                }
            )

    def _train(self, run: TrainingRun) -> None:
        """Step until stopped (stop event or max_steps), checkpointing every checkpoint_every steps
        and backing off after steps skipped for want of signal."""
        num_skipped_in_row = 0
        while (batch := self._next_groups(run.client, run.version, run.state)) is not None:
            waited_s, fresh = batch
            outcome = self._step(run, fresh, waited_s)
            if run.client:
                self._record(run, outcome)
            if run.state.step % self.config.checkpoint_every == 0:
                save_checkpoint(self.checkpoint_dir, run.model, run.optimizer, run.state, workers=self.workers)
            num_skipped_in_row = num_skipped_in_row + 1 if outcome.metrics.skipped else 0
            if run.client and num_skipped_in_row:
                self.stop_event.wait(IDLE_BACKOFF.backoff_s(num_skipped_in_row))

    def _step(self, run: TrainingRun, fresh: list[ReadyGroup], waited_s: float) -> StepOutcome:
        """One optimizer step on every rank on `fresh`, and, unless skipped, the next version
        published."""
        config = self.config
        metrics = train_step(
            run.model,
            run.optimizer,
            fresh,
            current_version=run.version,
            temperature=run.temperature,
            pad_token_id=run.pad_token_id,
            loss_config=config.loss,
            grad_clip=config.optimizer.grad_clip,
            workers=self.workers,
        )
        run.state.step += 1
        run.state.consumed_groups[run.state.step] = [g.group_id for g in fresh]
        published, publish_s = None, 0.0
        if not metrics.skipped:
            run.version += 1
            publish_started = time.perf_counter()
            run.published_bf16 = published_state(run.model, self.workers)
            if run.publisher:
                published = run.publisher.publish(run.version, run.published_bf16)
            publish_s = time.perf_counter() - publish_started
            run.state.latest_published_version = run.version
        return StepOutcome(metrics, waited_s, published, publish_s)

    def _record(self, run: TrainingRun, outcome: StepOutcome) -> None:
        """Rank 0: acknowledge the step's groups, evaluate when due, and report the step's
        metrics (metrics file, Prometheus, W&B, the coordinator, the log)."""
        assert run.client is not None
        state, metrics = run.state, outcome.metrics
        run.client.ack(state.step, state.consumed_groups[state.step], [])
        due = run.evaluator and state.step % self.config.eval_every == 0
        published = outcome.published
        record = {
            **(run.evaluator.evaluate(run.published_bf16) if due else {}),
            "step": state.step,
            "policy_version": run.version,
            "wait_seconds": outcome.waited_s,
            "publish_seconds": outcome.publish_s,
            "delta_bytes": published.delta.num_blob_bytes if published and published.delta else 0,
            "num_groups_stale_total": state.num_groups_stale,
            "time": time.time(),
            **metrics.as_dict(),
        }
        self._write_metrics(record)
        run.client.report_metrics(state.step, json.dumps(record))
        log.info(
            "step %d: reward %.3f, loss %.4f, %d groups, masked %.1f%%, waited %.1fs, version %d",
            state.step,
            metrics.reward_mean,
            metrics.loss,
            metrics.num_groups,
            100 * metrics.masked_fraction,
            outcome.waited_s,
            run.version,
        )

    def _evaluator(self, model, run_info) -> PublishedPolicyEvaluator:
        """Held-out evaluation on rank 0: of the training model itself in a plain run; under
        torchrun, of an unsharded copy that takes each published state."""
        from policy.model import load_model

        config = self.config
        if self.workers.sharded:
            model = load_model(config.model, dtype=config.dtype, device=self.device)
        return PublishedPolicyEvaluator(
            model, config.model.expanduser(), run_info, config.eval_problems, is_copy=self.workers.sharded
        )

    def _next_groups(self, client, version: int, state: TrainerState) -> tuple[float, list[ReadyGroup]] | None:
        """The next step's groups and how long rank 0 waited for them, on every rank; None
        when rank 0 stops (stop event or max_steps)."""
        batch = None
        if (
            client
            and not self.stop_event.is_set()
            and (self.config.max_steps == 0 or state.step < self.config.max_steps)
        ):
            waited_s, fresh = self._collect(client, version, state)
            batch = (waited_s, fresh) if fresh else None
        return broadcast_from_main(self.workers, batch)

    def _collect(self, client, version: int, state: TrainerState) -> tuple[float, list[ReadyGroup]]:
        """Wait until groups_per_step fresh groups are ready; acknowledge stale ones as stale."""
        started = time.perf_counter()
        num_polls = 0
        while not self.stop_event.is_set():
            num_polls += 1
            groups = client.ready_groups(self.config.groups_per_step, self.config.max_staleness)
            fresh, stale = split_by_staleness(groups, version, self.config.max_staleness)
            if stale:
                client.ack(state.step, [], [g.group_id for g in stale])
                state.num_groups_stale += len(stale)
            if len(fresh) >= self.config.groups_per_step:
                return time.perf_counter() - started, fresh
            self.stop_event.wait(IDLE_BACKOFF.backoff_s(num_polls))
        return time.perf_counter() - started, []

    def _write_metrics(self, record: dict) -> None:
        with open(self.metrics_path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.prometheus is not None:
            self.prometheus.update(record)
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in record.items() if isinstance(v, int | float)}, step=record["step"])
