import torch
from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

from protocol.types import FinishReason, ReadyGroup, Rollout, RolloutGroup
from trainer.batch import build_batch
from trainer.config import LossSection, OptimizerSection
from trainer.loss import token_logprobs
from trainer.step import make_optimizer, target_logprobs, train_step

VOCAB = 16


def _model():
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    return Qwen2ForCausalLM(config)


def _gpt2():
    """GPT-2's defaults leave dropout at 0.1 (residual, embedding and attention)."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64)
    assert (config.resid_pdrop, config.embd_pdrop, config.attn_pdrop) == (0.1, 0.1, 0.1)
    return GPT2LMHeadModel(config)


def _sequence_logprobs(model, prompt, completion):
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    return token_logprobs(logits[:, :-1], ids[:, 1:])[0, len(prompt) - 1 :].tolist()


def _group(model, prompt, completions, rewards):
    rollouts = []
    for index, (completion, reward) in enumerate(zip(completions, rewards, strict=True)):
        rollouts.append(
            Rollout(
                sample_index=index,
                token_ids=tuple(completion),
                sampled_mask=(True,) * len(completion),
                logprobs=tuple(_sequence_logprobs(model, prompt, completion)),
                commitment=b"",
                finish_reason=FinishReason.STOP,
                claimed_reward=reward,
            )
        )
    return ReadyGroup("g", 3, 0, tuple(prompt), RolloutGroup(0, tuple(rollouts)), "n")


def test_steps_raise_the_probability_of_rewarded_completions():
    model = _model()
    optimizer = make_optimizer(model, OptimizerSection(lr=3e-2))
    prompt, good, bad = [1, 2, 3], [5, 6, 7], [8, 9, 10]
    before = sum(_sequence_logprobs(model, prompt, good))
    for _ in range(5):
        group = _group(model, prompt, [good, bad, good, bad], [1.0, 0.0, 1.0, 0.0])
        metrics = train_step(
            model,
            optimizer,
            [group],
            current_version=4,
            temperature=1.0,
            pad_token_id=0,
            loss_config=LossSection(),
            grad_clip=1.0,
        )
        assert not metrics.skipped
    assert sum(_sequence_logprobs(model, prompt, good)) > before + 1.0
    assert metrics.staleness == {1: 1}
    assert metrics.logprob_mismatch < 1e-4
    assert metrics.num_loss_tokens == 12


def test_uninformative_batch_leaves_the_model_alone():
    model = _model()
    optimizer = make_optimizer(model, OptimizerSection())
    before = [p.detach().clone() for p in model.parameters()]
    group = _group(model, [1, 2], [[5], [6]], [1.0, 1.0])
    metrics = train_step(
        model,
        optimizer,
        [group],
        current_version=3,
        temperature=1.0,
        pad_token_id=0,
        loss_config=LossSection(),
        grad_clip=1.0,
    )
    assert metrics.skipped and metrics.num_groups_uninformative == 1
    for a, b in zip(before, model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_shards_partition_the_batch_and_an_empty_shard_trains_on_nothing():
    from trainer.step import shard_batch

    model = _model()
    groups = [
        _group(model, [1, 2], [[5, 6], [7], [8, 9, 10]], [1.0, 0.0, 0.5]),
        _group(model, [3], [[4], [5, 5], [6]], [0.0, 1.0, 0.0]),
    ]
    batch = build_batch(groups, pad_token_id=0)
    assert shard_batch(batch, 0, 1) is batch
    for world_size in (2, 4):
        shards = [shard_batch(batch, rank, world_size) for rank in range(world_size)]
        for field in (
            "input_ids",
            "attention_mask",
            "target_ids",
            "loss_mask",
            "old_logprobs",
            "advantages",
            "rewards",
        ):
            assert torch.equal(torch.cat([getattr(s, field) for s in shards]), getattr(batch, field)), field
        assert sum(s.num_loss_tokens for s in shards) == batch.num_loss_tokens
    starved = [shard_batch(batch, rank, 8) for rank in range(8)]
    assert [s.input_ids.shape[0] for s in starved] == [1] * 8
    assert [s.num_loss_tokens for s in starved[6:]] == [0, 0]
    assert torch.equal(starved[7].input_ids, batch.input_ids[:1])


def test_the_training_forward_runs_without_dropout_and_keeps_gradients():
    model = _gpt2().eval()
    batch = build_batch([_group(model, [1, 2, 3], [[5, 6, 7], [8, 9]], [1.0, 0.0])], pad_token_id=0)
    model.train()  # whatever mode the caller left it in
    first = target_logprobs(model, batch, 1.0)
    second = target_logprobs(model, batch, 1.0)
    assert first.requires_grad
    assert torch.equal(first, second)
    model.train()
    with_dropout = [model(input_ids=batch.input_ids).logits for _ in range(2)]
    assert not torch.equal(*with_dropout)  # what the step would see in train mode


def test_a_step_on_gpt2_sees_the_nodes_logprobs_exactly():
    """The nodes sample from the model without dropout; before the update the step's ratio is 1."""
    model = _gpt2().eval()
    group = _group(model, [1, 2, 3], [[5, 6, 7], [8, 9, 10], [5, 6], [11]], [1.0, 0.0, 0.5, 0.0])
    model.train()
    metrics = train_step(
        model,
        make_optimizer(model, OptimizerSection(lr=1e-3)),
        [group],
        current_version=3,
        temperature=1.0,
        pad_token_id=0,
        loss_config=LossSection(),
        grad_clip=1.0,
    )
    assert not metrics.skipped
    assert metrics.logprob_mismatch < 1e-6
    assert abs(metrics.mean_ratio - 1.0) < 1e-6
    assert metrics.masked_fraction == 0.0


def _gradients_of_a_step(model, groups, token_mean_over: str) -> list[torch.Tensor]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    train_step(
        model,
        optimizer,
        groups,
        current_version=3,
        temperature=1.0,
        pad_token_id=0,
        loss_config=LossSection(token_mean_over=token_mean_over),
        grad_clip=1e9,
    )
    return [p.grad.clone() for p in model.parameters()]


def test_the_token_mean_counts_the_uninformative_groups_tokens_as_dapo_over_the_whole_batch():
    model = _model()
    prompt = [1, 2, 3]
    informative = _group(model, prompt, [[5, 6, 7], [8, 9], [5, 6], [8]], [1.0, 0.0, 1.0, 0.0])
    uninformative = _group(model, [4, 2], [[5, 6, 7, 9], [9, 9, 9], [7], [5, 5]], [1.0] * 4)
    groups = [informative, uninformative]
    model.zero_grad()
    reference_loss = 0.0
    num_tokens = 0
    for group in groups:
        rewards = [r.claimed_reward for r in group.group.rollouts]
        for rollout in group.group.rollouts:
            advantage = rollout.claimed_reward - sum(rewards) / len(rewards)
            ids = torch.tensor([list(group.prompt_token_ids) + list(rollout.token_ids)])
            logits = model(input_ids=ids).logits
            new = token_logprobs(logits[:, :-1], ids[:, 1:])[0, len(group.prompt_token_ids) - 1 :]
            ratio = torch.exp(new - torch.tensor(rollout.logprobs))
            reference_loss = reference_loss + (-ratio * advantage).sum()
            num_tokens += len(rollout.token_ids)
    (reference_loss / num_tokens).backward()
    reference = [p.grad.clone() for p in model.parameters()]
    for got, want in zip(_gradients_of_a_step(model, groups, "all_groups"), reference, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    num_informative_tokens = 8
    scale = num_tokens / num_informative_tokens
    for got, want in zip(_gradients_of_a_step(model, groups, "informative_groups"), reference, strict=True):
        torch.testing.assert_close(got, want * scale, rtol=1e-4, atol=1e-7)
