import torch

from trainer.checkpoint import TrainerState, list_checkpoints, load_checkpoint, save_checkpoint


def _model_and_optimizer(seed):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def test_round_trip_restores_everything(tmp_path):
    model, optimizer = _model_and_optimizer(0)
    state = TrainerState(step=7, latest_published_version=9, consumed_groups={7: ["g1", "g2"]}, num_groups_stale=3)
    save_checkpoint(tmp_path, model, optimizer, state)
    expected_random = torch.rand(3)

    other_model, other_optimizer = _model_and_optimizer(1)
    restored = load_checkpoint(list_checkpoints(tmp_path)[-1], other_model, other_optimizer)
    assert restored == state
    for a, b in zip(model.parameters(), other_model.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(
        optimizer.state_dict()["state"][0]["exp_avg"], other_optimizer.state_dict()["state"][0]["exp_avg"]
    )
    torch.testing.assert_close(torch.rand(3), expected_random)


def test_keeps_the_newest_and_ignores_partial_writes(tmp_path):
    model, optimizer = _model_and_optimizer(0)
    for step in range(1, 6):
        save_checkpoint(tmp_path, model, optimizer, TrainerState(step=step), keep=2)
    (tmp_path / "step-00000099").mkdir()
    (tmp_path / ".tmp-step-00000100-1").mkdir()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000004", "step-00000005"]
