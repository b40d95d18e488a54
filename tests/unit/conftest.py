"""A real Coordinator over a real SQLite store, without processes or a network."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from coordinator.blobstore import BlobStore
from coordinator.config import CoordinatorConfig
from coordinator.core import Coordinator, RunSetup
from coordinator.store import open_store, sqlite_url
from coordinator.versions import PolicyVersions
from envs import get_task
from protocol.identity import Identity

OPERATOR_TOKEN = "operator-secret-token-1234"
T0 = 1_750_000_000_000


class Clock:
    def __init__(self, now_ms: int):
        self.now_ms = now_ms

    def __call__(self) -> int:
        return self.now_ms


@pytest.fixture
def make_coordinator(tmp_path: Path) -> Iterator[Callable[..., Coordinator]]:
    """make_coordinator(tokenizer=None, **config) → a Coordinator at time T0 with that
    CoordinatorConfig (a tokenizer is needed only to lease prompts)."""
    stores = []

    def make(tokenizer=None, **config) -> Coordinator:
        trainer = Identity.generate()
        data_dir = tmp_path / f"coordinator-{len(stores)}"
        data_dir.mkdir()
        config = CoordinatorConfig(data_dir=data_dir, operator_token=OPERATOR_TOKEN, **config)
        store = open_store(sqlite_url(data_dir))
        stores.append(store)
        setup = RunSetup(
            task=get_task("addition"),
            tokenizer=tokenizer,
            model_name="tiny-test-model",
            vocab_size=64,
            eos_token_id=0,
            num_parameters=1000,
            trainer_public_key=trainer.public_key,
        )
        blobs = BlobStore(data_dir / "policy", run_id="demo", trainer_public_key=trainer.public_key)
        return Coordinator(config, store, setup, PolicyVersions(blobs, store, trainer.public_key), clock=Clock(T0))

    yield make
    for store in stores:
        store.close()


@pytest.fixture
def coordinator(make_coordinator) -> Coordinator:
    return make_coordinator()
