import torch

from protocol.types import FinishReason, ReadyGroup, Rollout, RolloutGroup
from trainer.batch import build_batch


def _rollout(index, tokens, reward, mask=None):
    mask = mask or (True,) * len(tokens)
    return Rollout(
        sample_index=index,
        token_ids=tuple(tokens),
        sampled_mask=mask,
        logprobs=tuple(-0.1 * (i + 1) for i in range(sum(mask))),
        commitment=b"",
        finish_reason=FinishReason.STOP,
        claimed_reward=reward,
    )


def _group(group_id, prompt, rollouts):
    return ReadyGroup(group_id, 1, 0, tuple(prompt), RolloutGroup(0, tuple(rollouts)), "n")


def test_layout_of_tokens_masks_and_logprobs():
    groups = [
        _group("a", [7, 8], [_rollout(1, [5, 1], 0.0), _rollout(0, [4, 4, 1], 1.0)]),
        _group("b", [9], [_rollout(0, [3], 0.5), _rollout(1, [3], 0.5)]),
    ]
    batch = build_batch(groups, pad_token_id=0)
    assert batch.num_groups_used == 1 and batch.num_groups_uninformative == 1
    assert batch.input_ids.tolist() == [[7, 8, 4, 4, 1], [7, 8, 5, 1, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert batch.target_ids.tolist() == [[8, 4, 4, 1], [8, 5, 1, 0]]
    assert batch.loss_mask.tolist() == [[0, 1, 1, 1], [0, 1, 1, 0]]
    torch.testing.assert_close(batch.old_logprobs[0], torch.tensor([0.0, -0.1, -0.2, -0.3]))
    torch.testing.assert_close(batch.advantages, torch.tensor([0.5, -0.5]))


def test_environment_tokens_are_not_trained_on():
    rollout = _rollout(0, [4, 30, 31, 5, 1], 1.0, mask=(True, False, False, True, True))
    batch = build_batch([_group("a", [7], [rollout, _rollout(1, [1], 0.0)])], pad_token_id=0)
    assert batch.loss_mask[0].tolist() == [1, 0, 0, 1, 1]
    torch.testing.assert_close(batch.old_logprobs[0], torch.tensor([-0.1, 0.0, 0.0, -0.2, -0.3]))


def test_nothing_to_learn_gives_none():
    assert build_batch([_group("a", [7], [_rollout(0, [1], 1.0), _rollout(1, [1], 1.0)])], pad_token_id=0) is None
    assert build_batch([], pad_token_id=0) is None
