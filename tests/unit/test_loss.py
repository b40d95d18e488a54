import math

import pytest
import torch
from torch.testing import assert_close

from trainer.loss import group_advantages, informative_groups, policy_gradient_loss, token_logprobs


def naive_advantages(rewards, normalize_std, eps=1e-6):
    out = []
    for group in rewards:
        mean = sum(group) / len(group)
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / len(group))
        out.append([(r - mean) / (std + eps) if normalize_std else r - mean for r in group])
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("normalize_std", [False, True])
def test_advantages_match_naive(normalize_std):
    rewards = [[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [0.2, 0.9, 0.1, 0.3]]
    got = group_advantages(torch.tensor(rewards, dtype=torch.float64), normalize_std=normalize_std)
    assert_close(got, naive_advantages(rewards, normalize_std))


def test_groups_with_equal_rewards_are_not_informative():
    rewards = torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.3, 0.3]])
    assert informative_groups(rewards).tolist() == [False, True, False]


def test_token_logprobs_match_naive():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, dtype=torch.float64)
    tokens = torch.randint(0, 5, (2, 3))
    got = token_logprobs(logits, tokens, temperature=0.7)
    for b in range(2):
        for t in range(3):
            row = logits[b, t] / 0.7
            expected = row[tokens[b, t]] - torch.log(torch.exp(row).sum())
            assert_close(got[b, t], expected.float(), rtol=1e-6, atol=1e-6)


def naive_loss(new, old, adv, mask, low, high, ref=None, kl_coef=0.0):
    num_loss_tokens = max(sum(sum(row) for row in mask), 1)
    total = 0.0
    for b in range(len(new)):
        for t in range(len(new[b])):
            if not mask[b][t]:
                continue
            ratio = math.exp(new[b][t] - old[b][t])
            if not (low <= ratio <= high):
                continue
            term = -ratio * adv[b]
            if ref is not None:
                d = ref[b][t] - new[b][t]
                term += kl_coef * (math.exp(d) - d - 1)
            total += term
    return total / num_loss_tokens


def test_loss_value_and_gradient_match_naive():
    torch.manual_seed(1)
    old = -torch.rand(3, 6, dtype=torch.float64) * 3
    new = (old + torch.randn(3, 6, dtype=torch.float64) * 0.6).requires_grad_(True)
    ref = old + torch.randn(3, 6, dtype=torch.float64) * 0.1
    adv = torch.tensor([0.5, -1.0, 0.25], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0]], dtype=torch.float64)
    result = policy_gradient_loss(new, old, adv, mask, ratio_low=0.5, ratio_high=2.0, ref_logprobs=ref, kl_coef=0.1)
    expected = naive_loss(new.tolist(), old.tolist(), adv.tolist(), mask.tolist(), 0.5, 2.0, ref.tolist(), 0.1)
    assert_close(result.loss.item(), expected)
    result.loss.backward()
    step = 1e-6
    for b, t in [(0, 0), (1, 3), (2, 0), (0, 5)]:
        shifted = new.detach().clone()
        shifted[b, t] += step
        numeric = (
            naive_loss(shifted.tolist(), old.tolist(), adv.tolist(), mask.tolist(), 0.5, 2.0, ref.tolist(), 0.1)
            - expected
        ) / step
        assert_close(new.grad[b, t].item(), numeric, rtol=1e-4, atol=1e-6)


def test_out_of_bounds_tokens_are_masked_and_counted():
    old = torch.zeros(1, 4)
    new = torch.tensor([[0.0, math.log(3.0), math.log(0.1), 0.1]], requires_grad=True)
    result = policy_gradient_loss(new, old, torch.tensor([1.0]), torch.ones(1, 4), ratio_low=0.5, ratio_high=2.0)
    assert result.num_tokens == 2
    assert result.masked_fraction == pytest.approx(0.5)
    result.loss.backward()
    assert new.grad[0, 1] == 0 and new.grad[0, 2] == 0
    assert new.grad[0, 0] < 0


def test_on_policy_gradient_is_reinforce():
    """With new == old the gradient is −A·∇log p / N, the plain policy gradient."""
    old = torch.tensor([[-1.0, -2.0]])
    new = old.clone().requires_grad_(True)
    policy_gradient_loss(new, old, torch.tensor([2.0]), torch.ones(1, 2), ratio_low=0.5, ratio_high=2.0).loss.backward()
    assert_close(new.grad, torch.tensor([[-1.0, -1.0]]))
