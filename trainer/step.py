"""One optimizer step on a batch of accepted groups."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from protocol.types import ReadyGroup
from trainer.batch import TrainingBatch, build_batch
from trainer.config import LossSection, OptimizerSection
from trainer.distributed import SINGLE_PROCESS, Workers, clip_grad_norm, sum_across
from trainer.loss import policy_gradient_loss, token_logprobs


def make_optimizer(model: torch.nn.Module, config: OptimizerSection) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        model.parameters(), lr=config.lr, betas=(config.beta1, config.beta2), weight_decay=config.weight_decay
    )


@dataclass(frozen=True)
class StepMetrics:
    num_groups: int
    num_groups_uninformative: int
    num_sequences: int
    num_loss_tokens: int
    loss: float
    reward_mean: float
    reward_min: float
    reward_max: float
    advantage_mean_abs: float
    masked_fraction: float
    mean_ratio: float
    logprob_mismatch: float
    kl: float
    grad_norm: float
    staleness: dict[int, int]
    step_seconds: float
    tokens_per_second: float
    skipped: bool

    def as_dict(self) -> dict:
        data = dict(self.__dict__)
        data["staleness"] = {str(k): v for k, v in self.staleness.items()}
        return data


def shard_batch(batch: TrainingBatch, rank: int, world_size: int) -> TrainingBatch:
    """Worker `rank`'s share of the batch: a contiguous run of its sequences. A worker left
    without any (fewer sequences than workers) gets the first one with its loss mask zeroed,
    so that it still runs the forward and backward passes the other workers wait for."""
    if world_size == 1:
        return batch
    rows = torch.arange(batch.input_ids.shape[0]).tensor_split(world_size)[rank]
    starved = len(rows) == 0
    if starved:
        rows = torch.zeros(1, dtype=torch.long)
    loss_mask = batch.loss_mask[rows]
    return replace(
        batch,
        input_ids=batch.input_ids[rows],
        attention_mask=batch.attention_mask[rows],
        target_ids=batch.target_ids[rows],
        loss_mask=torch.zeros_like(loss_mask) if starved else loss_mask,
        old_logprobs=batch.old_logprobs[rows],
        advantages=batch.advantages[rows],
        rewards=batch.rewards[rows],
    )


def target_logprobs(model: torch.nn.Module, batch: TrainingBatch, temperature: float) -> torch.Tensor:
    """Log-probabilities of the batch's target tokens under `model` ([sequences, positions]). The
    forward runs in eval mode, which keeps gradients but turns dropout (GPT-2's 0.1, say) and any
    other train-time randomness off: the nodes sampled from the deterministic model, and the
    importance ratio must compare that same function, not a random perturbation of it."""
    device = next(model.parameters()).device
    model.eval()
    logits = model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device)).logits
    return token_logprobs(logits[:, :-1], batch.target_ids.to(device), temperature)


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    groups: Sequence[ReadyGroup],
    *,
    current_version: int,
    temperature: float,
    pad_token_id: int,
    loss_config: LossSection,
    grad_clip: float,
    reference_model: torch.nn.Module | None = None,
    workers: Workers = SINGLE_PROCESS,
) -> StepMetrics:
    """Advantages, loss and one AdamW step over `groups`. When no group has any reward
    spread (nothing to learn) the model is left unchanged and `skipped` is set.

    Under torchrun every worker calls this with the same groups and trains on its shard of
    the sequences; each shard's loss is divided by the batch's number of loss tokens, so
    the summed gradients and the metrics equal those of one process on the whole batch."""
    started = time.perf_counter()
    staleness = Counter(current_version - g.policy_version for g in groups)
    rewards = [r.claimed_reward for g in groups for r in g.group.rollouts]
    batch = build_batch(groups, pad_token_id=pad_token_id, normalize_std=loss_config.normalize_advantage_std)
    common = dict(
        num_groups=len(groups),
        reward_mean=sum(rewards) / len(rewards) if rewards else 0.0,
        reward_min=min(rewards, default=0.0),
        reward_max=max(rewards, default=0.0),
        staleness=dict(sorted(staleness.items())),
    )
    if batch is None:
        return StepMetrics(
            **common,
            num_groups_uninformative=len(groups),
            num_sequences=0,
            num_loss_tokens=0,
            loss=0.0,
            advantage_mean_abs=0.0,
            masked_fraction=0.0,
            mean_ratio=1.0,
            logprob_mismatch=0.0,
            kl=0.0,
            grad_norm=0.0,
            step_seconds=time.perf_counter() - started,
            tokens_per_second=0.0,
            skipped=True,
        )
    device = next(model.parameters()).device
    shard = shard_batch(batch, workers.rank, workers.world_size)
    new_logprobs = target_logprobs(model, shard, temperature)
    ref_logprobs = None
    if reference_model is not None and loss_config.kl_coef > 0:
        with torch.no_grad():
            ref_logprobs = target_logprobs(reference_model, shard, temperature)
    result = policy_gradient_loss(
        new_logprobs,
        shard.old_logprobs.to(device),
        shard.advantages.to(device),
        shard.loss_mask.to(device),
        ratio_low=loss_config.ratio_low,
        ratio_high=loss_config.ratio_high,
        ref_logprobs=ref_logprobs,
        kl_coef=loss_config.kl_coef,
    )
    # policy_gradient_loss divides by the shard's loss tokens; the step divides by the batch's.
    num_step_tokens = batch.num_loss_tokens
    if loss_config.token_mean_over == "all_groups":
        num_step_tokens += batch.num_uninformative_tokens
    loss = result.loss * (max(shard.num_loss_tokens, 1) / max(num_step_tokens, 1))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = clip_grad_norm(model, grad_clip)
    optimizer.step()
    num_shard_tokens = shard.num_loss_tokens
    loss_sum, masked_sum, ratio_sum, mismatch_sum, kl_sum = sum_across(
        workers,
        [
            float(loss.detach()),
            result.masked_fraction * num_shard_tokens,
            result.mean_ratio * num_shard_tokens,
            result.mean_abs_logprob_diff * num_shard_tokens,
            result.kl * num_shard_tokens,
        ],
    )
    num_loss_tokens = batch.num_loss_tokens
    elapsed = time.perf_counter() - started
    num_tokens = int(batch.attention_mask.sum())
    return StepMetrics(
        **common,
        num_groups_uninformative=batch.num_groups_uninformative,
        num_sequences=int(batch.input_ids.shape[0]),
        num_loss_tokens=num_loss_tokens,
        loss=loss_sum,
        advantage_mean_abs=float(batch.advantages.abs().mean()),
        masked_fraction=masked_sum / num_loss_tokens if num_loss_tokens else 0.0,
        mean_ratio=ratio_sum / num_loss_tokens if num_loss_tokens else 1.0,
        logprob_mismatch=mismatch_sum / num_loss_tokens if num_loss_tokens else 0.0,
        kl=kl_sum / num_loss_tokens if num_loss_tokens else 0.0,
        grad_norm=grad_norm,
        step_seconds=elapsed,
        tokens_per_second=num_tokens / elapsed if elapsed > 0 else 0.0,
        skipped=False,
    )
