"""`rollproof trainer run`: stream accepted groups, train, publish, acknowledge, checkpoint."""

from __future__ import annotations

import json
import logging
import threading
import time

import grpc

from protocol.codec import BF16State
from protocol.identity import Identity
from protocol.retry import RetryPolicy
from protocol.types import ReadyGroup
from trainer.checkpoint import TrainerState, list_checkpoints, load_checkpoint, save_checkpoint
from trainer.config import TrainerConfig
from trainer.distributed import (
    broadcast_from_main,
    load_training_model,
    published_state,
    start_workers,
    stop_workers,
)

log = logging.getLogger(__name__)

# Waits between polls that find too few groups and after steps skipped for want of signal (so a
# run whose groups all have equal rewards does not spin through them at the coordinator's limit).
IDLE_BACKOFF = RetryPolicy(initial_backoff_s=0.2, max_backoff_s=2.0)


class TrainerKeyMismatchError(ValueError):
    pass


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
        import torch

        from policy.evaluate import evaluate
        from policy.weights import load_bf16_state

        started = time.perf_counter()
        masters = [] if self.is_copy else [p.detach().clone() for p in self.model.parameters()]
        try:
            load_bf16_state(self.model, published)
            result = evaluate(
                self.model.eval(), self.tokenizer, self.task,
                num_problems=self.num_problems, seed=self.seed, max_tokens=self.max_tokens,
            )
        finally:
            with torch.no_grad():
                for parameter, master in zip(self.model.parameters(), masters):
                    parameter.copy_(master)
            if not self.is_copy:
                self.model.train()
        log.info("held-out reward %.3f (%d problems)", result.mean_reward, result.num_problems)
        return {"eval_reward": result.mean_reward, "eval_seconds": time.perf_counter() - started}


class Trainer:
    """One trainer process. Under torchrun (trainer/distributed.py) each rank runs one; rank 0
    alone holds the key and talks to the coordinator, and its stop event stops them all."""

    def __init__(self, config: TrainerConfig, *, resume: bool):
        self.config = config
        self.resume = resume
        if config.threads:
            import torch

            torch.set_num_threads(config.threads)
        self.workers, self.device = start_workers(config.device)
        self.data_dir = config.data_dir.expanduser()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.checkpoint_dir = self.data_dir / "checkpoints"
        self.metrics_path = (config.metrics_file or self.data_dir / "metrics.jsonl").expanduser()
        self.identity = (
            Identity.load_or_create((config.key_file or self.data_dir / "trainer.key").expanduser())
            if self.workers.is_main else None
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
                raise ValueError("wandb_project is set but Weights & Biases is not installed: pip install wandb") from None
            self.wandb_run = wandb.init(project=config.wandb_project, config=config.model_dump(mode="json"))

    def run(self) -> TrainerState:
        try:
            return self._run()
        finally:
            stop_workers(self.workers)

    def _run(self) -> TrainerState:
        from policy.model import freeze_long_lived_objects
        from policy.tokenizer import load_tokenizer
        from trainer.client import TrainerClient
        from trainer.publish import PolicyPublisher
        from trainer.step import make_optimizer

        config, workers = self.config, self.workers
        if config.model is None:
            raise ValueError("model is not set: point it at the run's model directory")
        client = (
            TrainerClient(config.coordinator, self.identity, tls=config.coordinator_tls, stop=self.stop_event)
            if workers.is_main
            else None
        )
        try:
            run_info = client.run_info() if client else None
            if run_info and run_info.trainer_key_fingerprint != self.identity.key_id:
                raise TrainerKeyMismatchError(
                    f"the coordinator accepts trainer key {run_info.trainer_key_fingerprint}, "
                    f"this trainer holds {self.identity.key_id}"
                )
            model = load_training_model(config.model, dtype=config.dtype, device=self.device, workers=workers)
            pad_token_id = load_tokenizer(config.model.expanduser()).pad_token_id or 0
            optimizer = make_optimizer(model, config.optimizer)
            state = TrainerState()
            checkpoints = list_checkpoints(self.checkpoint_dir)
            if checkpoints and not self.resume:
                raise ValueError(f"{self.checkpoint_dir} holds checkpoints: pass --resume, or use another data_dir")
            if checkpoints:
                state = load_checkpoint(checkpoints[-1], model, optimizer, workers=workers)
            version = None
            if client:
                # From step 0 too: groups consumed by steps no checkpoint holds are ready again.
                reply = client.resume(state.step)
                log.info(
                    "resumed at step %d from %s; %d groups consumed after it are ready again",
                    state.step, checkpoints[-1].name if checkpoints else "the initial model", reply.num_groups_restored,
                )
                version = reply.latest_policy_version + 1
            version = broadcast_from_main(workers, version)
            publisher = (
                PolicyPublisher(self.identity, run_info.run_id, client, keyframe_interval=config.keyframe_interval)
                if client else None
            )
            published_bf16 = published_state(model, workers)
            if publisher:
                publisher.publish(version, published_bf16)
                log.info("published policy version %d", version)
            state.latest_published_version = version
            temperature = broadcast_from_main(workers, run_info.sampling.temperature if run_info else None) or 1.0
            evaluator = self._evaluator(model, run_info) if workers.is_main and config.eval_every else None
            if evaluator:
                self._write_metrics({"step": state.step, "policy_version": version, "time": time.time(),
                                     **evaluator.evaluate(published_bf16)})
            freeze_long_lived_objects()
            try:
                version = self._train(client, model, optimizer, publisher, evaluator, state, version, published_bf16,
                                      temperature=temperature, pad_token_id=pad_token_id)
            except grpc.RpcError as error:
                if not self.stop_event.is_set():
                    raise
                log.warning("stopped at step %d while the coordinator does not answer (%s); a restart resumes "
                            "from the last checkpoint", state.step, error.code().name)
                return state
            save_checkpoint(self.checkpoint_dir, model, optimizer, state, workers=workers)
            if workers.is_main:
                log.info("stopped at step %d, policy version %d", state.step, version)
            return state
        finally:
            if client:
                client.close()

    def _train(self, client, model, optimizer, publisher, evaluator, state: TrainerState, version: int,
               published_bf16: BF16State, *, temperature: float, pad_token_id: int) -> int:
        """Train until stopped; returns the latest published version."""
        from trainer.step import train_step

        config, workers = self.config, self.workers
        num_skipped_in_row = 0
        while (batch := self._next_groups(client, version, state)) is not None:
            waited_s, fresh = batch
            metrics = train_step(
                model, optimizer, fresh,
                current_version=version, temperature=temperature, pad_token_id=pad_token_id,
                loss_config=config.loss, grad_clip=config.optimizer.grad_clip, workers=workers,
            )
            state.step += 1
            published, publish_s = None, 0.0
            if not metrics.skipped:
                version += 1
                publish_started = time.perf_counter()
                published_bf16 = published_state(model, workers)
                if publisher:
                    published = publisher.publish(version, published_bf16)
                publish_s = time.perf_counter() - publish_started
                state.latest_published_version = version
            consumed = [g.group_id for g in fresh]
            state.consumed_groups[state.step] = consumed
            if client:
                client.ack(state.step, consumed, [])
                record = {
                    **(evaluator.evaluate(published_bf16)
                       if evaluator and state.step % config.eval_every == 0 else {}),
                    "step": state.step,
                    "policy_version": version,
                    "wait_seconds": waited_s,
                    "publish_seconds": publish_s,
                    "delta_bytes": published.delta.num_blob_bytes if published and published.delta else 0,
                    "num_groups_stale_total": state.num_groups_stale,
                    "time": time.time(),
                    **metrics.as_dict(),
                }
                self._write_metrics(record)
                client.report_metrics(state.step, json.dumps(record))
                log.info(
                    "step %d: reward %.3f, loss %.4f, %d groups, masked %.1f%%, waited %.1fs, version %d",
                    state.step, metrics.reward_mean, metrics.loss, metrics.num_groups,
                    100 * metrics.masked_fraction, waited_s, version,
                )
            if state.step % config.checkpoint_every == 0:
                save_checkpoint(self.checkpoint_dir, model, optimizer, state, workers=workers)
            num_skipped_in_row = num_skipped_in_row + 1 if metrics.skipped else 0
            if client and num_skipped_in_row:
                self.stop_event.wait(IDLE_BACKOFF.backoff_s(num_skipped_in_row))
        return version

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
        if client and not self.stop_event.is_set() and (
            self.config.max_steps == 0 or state.step < self.config.max_steps
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
