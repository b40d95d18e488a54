"""Turning accepted rollout groups into padded training tensors."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from protocol.types import ReadyGroup
from trainer.loss import group_advantages, informative_groups


@dataclass(frozen=True)
class TrainingBatch:
    input_ids: torch.Tensor  # [B, L] prompt + completion, right-padded
    attention_mask: torch.Tensor  # [B, L]
    target_ids: torch.Tensor  # [B, L-1] input_ids shifted left: the token each position predicts
    loss_mask: torch.Tensor  # [B, L-1] 1 where the target is a token the node sampled
    old_logprobs: torch.Tensor  # [B, L-1] node-reported log-probabilities at loss positions
    advantages: torch.Tensor  # [B]
    rewards: torch.Tensor  # [B]
    num_groups_used: int
    num_groups_uninformative: int
    num_uninformative_tokens: int  # sampled tokens of the uninformative groups, left out of the tensors

    @property
    def num_loss_tokens(self) -> int:
        return int(self.loss_mask.sum())


def build_batch(
    groups: Sequence[ReadyGroup], *, pad_token_id: int, normalize_std: bool = False
) -> TrainingBatch | None:
    """Sequences of the informative groups with their advantages; None when no group teaches anything."""
    rewards = [[r.claimed_reward for r in sorted(g.group.rollouts, key=lambda r: r.sample_index)] for g in groups]
    group_sizes = {len(r) for r in rewards}
    if len(group_sizes) > 1:
        raise ValueError(f"groups of different sizes in one batch: {sorted(group_sizes)}")
    reward_tensor = torch.tensor(rewards, dtype=torch.float32)
    keep = informative_groups(reward_tensor) if groups else torch.zeros(0, dtype=torch.bool)
    if not bool(keep.any()):
        return None
    advantages = group_advantages(reward_tensor[keep], normalize_std=normalize_std)
    kept_groups = [g for g, k in zip(groups, keep.tolist(), strict=True) if k]
    dropped_groups = [g for g, k in zip(groups, keep.tolist(), strict=True) if not k]
    num_uninformative_tokens = sum(sum(r.sampled_mask) for g in dropped_groups for r in g.group.rollouts)
    sequences = []
    for group, group_advantage in zip(kept_groups, advantages, strict=True):
        for rollout in sorted(group.group.rollouts, key=lambda r: r.sample_index):
            sequences.append((group.prompt_token_ids, rollout, float(group_advantage[rollout.sample_index])))
    max_len = max(len(p) + len(r.token_ids) for p, r, _ in sequences)
    num_seqs = len(sequences)
    input_ids = torch.full((num_seqs, max_len), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((num_seqs, max_len), dtype=torch.long)
    loss_mask = torch.zeros((num_seqs, max_len - 1), dtype=torch.float32)
    old_logprobs = torch.zeros((num_seqs, max_len - 1), dtype=torch.float32)
    for row, (prompt, rollout, _) in enumerate(sequences):
        tokens = list(prompt) + list(rollout.token_ids)
        input_ids[row, : len(tokens)] = torch.tensor(tokens)
        attention_mask[row, : len(tokens)] = 1
        sampled_positions = [len(prompt) + i - 1 for i, m in enumerate(rollout.sampled_mask) if m]
        loss_mask[row, sampled_positions] = 1.0
        old_logprobs[row, sampled_positions] = torch.tensor(rollout.logprobs, dtype=torch.float32)
    return TrainingBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        target_ids=input_ids[:, 1:],
        loss_mask=loss_mask,
        old_logprobs=old_logprobs,
        advantages=torch.tensor([a for _, _, a in sequences], dtype=torch.float32),
        rewards=torch.tensor([r.claimed_reward for _, r, _ in sequences], dtype=torch.float32),
        num_groups_used=len(kept_groups),
        num_groups_uninformative=len(groups) - len(kept_groups),
        num_uninformative_tokens=num_uninformative_tokens,
    )
