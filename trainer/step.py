"""One optimizer step on a batch of accepted groups."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from protocol.types import ReadyGroup
from trainer.batch import build_batch
from trainer.config import LossSection, OptimizerSection
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
) -> StepMetrics:
    """Advantages, loss and one AdamW step over `groups`. When no group has any reward
    spread (nothing to learn) the model is left unchanged and `skipped` is set."""
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
            **common, num_groups_uninformative=len(groups), num_sequences=0, num_loss_tokens=0, loss=0.0,
            advantage_mean_abs=0.0, masked_fraction=0.0, mean_ratio=1.0, logprob_mismatch=0.0, kl=0.0,
            grad_norm=0.0, step_seconds=time.perf_counter() - started, tokens_per_second=0.0, skipped=True,
        )
    device = next(model.parameters()).device
    model.train()
    logits = model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device)).logits
    new_logprobs = token_logprobs(logits[:, :-1], batch.target_ids.to(device), temperature)
    ref_logprobs = None
    if reference_model is not None and loss_config.kl_coef > 0:
        with torch.no_grad():
            ref_logits = reference_model(
                input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device)
            ).logits
            ref_logprobs = token_logprobs(ref_logits[:, :-1], batch.target_ids.to(device), temperature)
    result = policy_gradient_loss(
        new_logprobs,
        batch.old_logprobs.to(device),
        batch.advantages.to(device),
        batch.loss_mask.to(device),
        ratio_low=loss_config.ratio_low,
        ratio_high=loss_config.ratio_high,
        ref_logprobs=ref_logprobs,
        kl_coef=loss_config.kl_coef,
    )
    optimizer.zero_grad(set_to_none=True)
    result.loss.backward()
    grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip))
    optimizer.step()
    elapsed = time.perf_counter() - started
    num_tokens = int(batch.attention_mask.sum())
    return StepMetrics(
        **common,
        num_groups_uninformative=batch.num_groups_uninformative,
        num_sequences=int(batch.input_ids.shape[0]),
        num_loss_tokens=batch.num_loss_tokens,
        loss=float(result.loss.detach()),
        advantage_mean_abs=float(batch.advantages.abs().mean()),
        masked_fraction=result.masked_fraction,
        mean_ratio=result.mean_ratio,
        logprob_mismatch=result.mean_abs_logprob_diff,
        kl=result.kl,
        grad_norm=grad_norm,
        step_seconds=elapsed,
        tokens_per_second=num_tokens / elapsed if elapsed > 0 else 0.0,
        skipped=False,
    )
