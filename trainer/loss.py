"""The RL objective as pure functions: group-relative advantages, importance ratios against
the node-reported log-probabilities with out-of-bounds tokens masked, token-level
policy-gradient loss, optional KL penalty to a reference policy."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def group_advantages(rewards: torch.Tensor, *, normalize_std: bool = False, eps: float = 1e-6) -> torch.Tensor:
    """rewards [num_groups, group_size] → reward minus its group's mean (÷ group std if asked)."""
    centered = rewards - rewards.mean(dim=1, keepdim=True)
    if normalize_std:
        centered = centered / (rewards.std(dim=1, keepdim=True, unbiased=False) + eps)
    return centered


def informative_groups(rewards: torch.Tensor) -> torch.Tensor:
    """[num_groups] bool: groups whose rewards are not all equal (zero advantage teaches nothing)."""
    return (rewards.max(dim=1).values - rewards.min(dim=1).values) > 0


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """logits [B, T, V] predicting tokens [B, T] → log p(token) under softmax(logits / temperature)."""
    scaled = logits.float() / (temperature if temperature > 0 else 1.0)
    return torch.gather(scaled.log_softmax(dim=-1), 2, tokens.unsqueeze(-1)).squeeze(-1)


@dataclass(frozen=True)
class PolicyLoss:
    loss: torch.Tensor
    num_tokens: int  # tokens that carry gradient
    masked_fraction: float  # of loss tokens, the fraction masked for an out-of-bounds ratio
    mean_ratio: float
    mean_abs_logprob_diff: float  # |trainer − node| log-prob mismatch over loss tokens
    kl: float


def policy_gradient_loss(
    new_logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    ratio_low: float,
    ratio_high: float,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
) -> PolicyLoss:
    """Token-level importance-weighted policy gradient.

    new_logprobs [B, T] (trainer, with grad), old_logprobs [B, T] (reported by the node that
    sampled), advantages [B] (one per sequence), loss_mask [B, T] (1 on sampled completion
    tokens). Tokens whose ratio exp(new − old) lies outside [ratio_low, ratio_high] are
    masked out entirely (IcePop-style): they neither push nor are clipped. The loss is the
    sum over kept tokens divided by the number of loss tokens in the batch, so every token
    weighs the same whatever the length of its sequence.
    """
    loss_mask = loss_mask.to(new_logprobs.dtype)
    log_ratio = new_logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    in_bounds = ((ratio >= ratio_low) & (ratio <= ratio_high)).to(new_logprobs.dtype).detach()
    keep = loss_mask * in_bounds
    num_loss_tokens = loss_mask.sum().clamp(min=1.0)
    per_token = -ratio * advantages.unsqueeze(1)
    kl_value = torch.zeros((), dtype=new_logprobs.dtype)
    if ref_logprobs is not None and kl_coef > 0:
        ref_minus_new = ref_logprobs - new_logprobs
        kl_per_token = torch.exp(ref_minus_new) - ref_minus_new - 1.0  # k3 estimator, ≥ 0
        per_token = per_token + kl_coef * kl_per_token
        kl_value = (kl_per_token * loss_mask).sum().detach() / num_loss_tokens
    loss = (per_token * keep).sum() / num_loss_tokens
    with torch.no_grad():
        total = float(loss_mask.sum())
        masked_fraction = float((loss_mask * (1 - in_bounds)).sum()) / total if total else 0.0
        mean_ratio = float((ratio * loss_mask).sum()) / total if total else 1.0
        mismatch = float((log_ratio.abs() * loss_mask).sum()) / total if total else 0.0
    return PolicyLoss(
        loss=loss,
        num_tokens=int(keep.sum()),
        masked_fraction=masked_fraction,
        mean_ratio=mean_ratio,
        mean_abs_logprob_diff=mismatch,
        kl=float(kl_value),
    )
