"""The trainer does not limit itself (issue 17): when its steps are skipped, or too few groups are
ready, it waits with a growing backoff instead of calling the coordinator as fast as it can."""

import dataclasses

from tests.unit.test_train_step import _group, _model
from trainer.checkpoint import TrainerState
from trainer.config import TrainerConfig
from trainer.main import IDLE_BACKOFF, Trainer, TrainingRun
from trainer.step import make_optimizer

NUM_WAITS = 6


class CountingStop:
    """The trainer's stop event: records each wait instead of sleeping; set after NUM_WAITS."""

    def __init__(self):
        self.waits: list[float] = []

    def is_set(self) -> bool:
        return len(self.waits) >= NUM_WAITS

    def wait(self, seconds: float) -> bool:
        self.waits.append(seconds)
        return self.is_set()


class FakeCoordinator:
    """Hands out `groups` on every poll and counts the trainer's calls."""

    def __init__(self, groups):
        self.groups = groups
        self.calls: list[str] = []

    def ready_groups(self, max_groups, max_staleness):
        self.calls.append("ready_groups")
        return self.groups[:max_groups]

    def ack(self, trainer_step, consumed, stale):
        self.calls.append("ack")

    def report_metrics(self, step, metrics_json):
        self.calls.append("report_metrics")


def trainer(tmp_path) -> Trainer:
    config = TrainerConfig(data_dir=tmp_path, groups_per_step=2, checkpoint_every=1000, eval_every=0)
    made = Trainer(config, resume=False)
    made.stop_event = CountingStop()
    return made


def assert_backoff(waits: list[float]) -> None:
    for attempt, wait in enumerate(waits, start=1):
        base = min(IDLE_BACKOFF.max_backoff_s, IDLE_BACKOFF.initial_backoff_s * 2 ** (attempt - 1))
        assert 0.5 * base <= wait < base


def test_skipped_steps_back_off(tmp_path):
    model = _model()
    prompt, completion = [1, 2, 3], [5, 6, 7]
    uninformative = _group(model, prompt, [completion] * 4, [1.0] * 4)  # equal rewards: nothing to learn
    groups = [dataclasses.replace(uninformative, group_id=f"g{index}") for index in range(2)]
    coordinator = FakeCoordinator(groups)
    made = trainer(tmp_path)
    run = TrainingRun(
        client=coordinator,
        model=model,
        optimizer=make_optimizer(model, made.config.optimizer),
        publisher=None,
        evaluator=None,
        temperature=1.0,
        pad_token_id=0,
        version=3,
    )
    made._train(run)
    assert run.state.step == NUM_WAITS
    assert coordinator.calls == ["ready_groups", "ack", "report_metrics"] * NUM_WAITS
    assert_backoff(made.stop_event.waits)


def test_polls_that_find_too_few_groups_back_off(tmp_path):
    coordinator = FakeCoordinator([])
    made = trainer(tmp_path)
    assert made._collect(coordinator, 3, TrainerState())[1] == []
    assert coordinator.calls == ["ready_groups"] * NUM_WAITS
    assert_backoff(made.stop_event.waits)
