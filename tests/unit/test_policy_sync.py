import asyncio

import torch

from coordinator.blobstore import BlobStore
from node.policy_sync import REFUSED_UPDATE_BACKOFF, PolicySync
from protocol import manifest
from protocol.proto import service_pb2
from tests.unit.test_weights import RUN, TRAINER, assert_model_holds, blob_map, tiny_qwen2, trainer_versions
from trainer.publish import PolicyPublisher


class StoreClient:
    """The coordinator's two policy calls, answered from its blob store."""

    def __init__(self, store: BlobStore):
        self.store = store

    async def update_path(self, from_version: int):
        return self.store.update_path(from_version or None)

    async def fetch_blob(self, blob_hash: bytes, size: int) -> bytes:
        return self.store.read_blob(blob_hash)


async def direct(what, make_call):
    return await make_call()


def following(tmp_path, **kwargs):
    store = BlobStore(tmp_path / "policy", run_id=RUN, trainer_public_key=TRAINER.public_key)
    model = tiny_qwen2(seed=5)
    run_info = service_pb2.RunInfo(run_id=RUN, trainer_public_key=TRAINER.public_key)
    return store, model, PolicySync(model, StoreClient(store), run_info, **kwargs)


def test_a_node_whose_state_lost_its_hash_recovers_through_a_keyframe(tmp_path):
    versions = trainer_versions(3)
    store, model, sync = following(tmp_path, full_check_interval=2)
    publisher = PolicyPublisher(TRAINER, RUN, store, keyframe_interval=3)
    for version, state in enumerate(versions[:2], start=1):
        publisher.publish(version, state)
        assert asyncio.run(sync.sync(direct)) and sync.version == version
    assert sync.node_policy.num_unchecked_deltas == 1
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[1, 2] *= -1
    publisher.publish(3, versions[2])
    assert asyncio.run(sync.sync(direct)) and sync.version == 3
    assert "StateHashMismatchError" in sync.last_error
    assert sync.node_policy.num_unchecked_deltas == 0
    assert_model_holds(model, versions[2])


def test_a_delta_against_other_contents_is_refused_when_the_node_state_is_intact(tmp_path):
    versions = trainer_versions(3)
    store, model, sync = following(tmp_path)
    PolicyPublisher(TRAINER, RUN, store).publish(1, versions[0])
    asyncio.run(sync.sync(direct))
    forked = manifest.build_delta(RUN, 2, 1, versions[2], versions[1])
    store.put_version(manifest.sign_manifest(TRAINER, forked.manifest), blob_map(forked))
    assert not asyncio.run(sync.sync(direct))
    assert sync.version == 1 and "BaseStateMismatchError" in sync.last_error
    assert_model_holds(model, versions[0])


class DeltaOnlyClient(StoreClient):
    """A broken coordinator: every update path, the keyframe path too, is one delta whose base
    the node does not hold. Counts the calls."""

    def __init__(self, store: BlobStore, delta):
        super().__init__(store)
        self.delta = delta
        self.num_update_path_calls = 0

    async def update_path(self, from_version: int):
        self.num_update_path_calls += 1
        return [self.delta]


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_missing_base_costs_a_bounded_number_of_calls_then_backs_off(tmp_path):
    versions = trainer_versions(2)
    store = BlobStore(tmp_path / "policy", run_id=RUN, trainer_public_key=TRAINER.public_key)
    publisher = PolicyPublisher(TRAINER, RUN, store)
    publisher.publish(1, versions[0])
    publisher.publish(2, versions[1])
    client = DeltaOnlyClient(store, store.signed_manifest(2, manifest.Codec.DELTA))
    clock = FakeClock()
    run_info = service_pb2.RunInfo(run_id=RUN, trainer_public_key=TRAINER.public_key)
    sync = PolicySync(tiny_qwen2(seed=5), client, run_info, clock=clock)

    for _ in range(100):
        assert not asyncio.run(sync.sync(direct))
    assert client.num_update_path_calls == 2  # the path, then the keyframe path once
    assert "MissingBaseError" in sync.last_error and sync.version == 0

    clock.now += REFUSED_UPDATE_BACKOFF.max_backoff_s
    for _ in range(100):
        asyncio.run(sync.sync(direct))
    assert client.num_update_path_calls == 4
    assert sync.num_refusals_in_row == 2
