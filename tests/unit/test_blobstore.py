import numpy as np
import pytest

from coordinator.blobstore import BlobRangeError, BlobStore, NoUpdatePathError, UnknownBlobError, VersionOrderError
from protocol import codec, manifest
from protocol.identity import Identity
from protocol.manifest import BlobHashError, ManifestSignerError
from protocol.types import Codec
from tests.unit.test_codec import perturb, random_bf16_state
from trainer.publish import PolicyPublisher, PublishError

RUN = "run-store"
TRAINER = Identity.from_seed(bytes([7]) * 32)
SHAPES = {"embed": (200, 32), "layer.weight": (32, 64), "norm": (32,)}


def open_store(root, **kwargs):
    return BlobStore(root, run_id=RUN, trainer_public_key=TRAINER.public_key, **kwargs)


@pytest.fixture
def states():
    rng = np.random.default_rng(0)
    result = {1: random_bf16_state(rng, SHAPES)}
    for version in range(2, 8):
        result[version] = perturb(rng, result[version - 1], 0.01)
    return result


@pytest.fixture
def published(tmp_path, states):
    """Versions 1..7 published with a keyframe every 3 versions, 2 keyframes kept."""
    store = open_store(tmp_path / "policy", num_keyframes_kept=2)
    publisher = PolicyPublisher(TRAINER, RUN, store, keyframe_interval=3)
    for version, state in states.items():
        publisher.publish(version, state)
    return store


def catch_up(store, version, state):
    """Apply the store's update path like a node does; the node's final version and state."""
    for signed in store.update_path(version):
        listed = manifest.verify_manifest(signed, TRAINER.public_key)
        blobs = {ref.hash: store.read_blob(ref.hash) for ref in listed.blobs}
        update = manifest.open_update(
            signed,
            blobs,
            trainer_public_key=TRAINER.public_key,
            run_id=RUN,
            current_version=version,
            current_specs=None,
        )
        state = manifest.apply_update(state, update)
        version = update.manifest.version
    return version, state


def path_of(store, version):
    return [
        (m.version, m.codec)
        for m in (manifest.verify_manifest(s, TRAINER.public_key) for s in store.update_path(version))
    ]


def test_retention_keeps_newest_keyframes_and_the_deltas_after_them(published):
    assert published.versions() == [
        (3, Codec.KEYFRAME),
        (4, Codec.DELTA),
        (5, Codec.DELTA),
        (6, Codec.KEYFRAME),
        (6, Codec.DELTA),
        (7, Codec.DELTA),
    ]
    referenced = {
        ref.hash
        for version, codec_ in published.versions()
        for ref in manifest.verify_manifest(published.signed_manifest(version, codec_), TRAINER.public_key).blobs
    }
    on_disk = {bytes.fromhex(path.name) for path in (published.root / "blobs").glob("*/*")}
    assert on_disk == referenced


def test_update_paths(published):
    assert path_of(published, None) == [(6, Codec.KEYFRAME), (7, Codec.DELTA)]
    assert path_of(published, 1) == [(6, Codec.KEYFRAME), (7, Codec.DELTA)]
    assert path_of(published, 4) == [(5, Codec.DELTA), (6, Codec.DELTA), (7, Codec.DELTA)]
    assert path_of(published, 7) == []
    with pytest.raises(NoUpdatePathError, match="newer than the latest"):
        published.update_path(8)


def test_late_joiner_and_lagging_node_reach_the_latest_state_bit_for_bit(published, states):
    expected = codec.state_hash(states[7])
    version, state = catch_up(published, None, None)
    assert (version, codec.state_hash(state)) == (7, expected)
    lagging = {name: bits.copy() for name, bits in states[4].items()}
    version, state = catch_up(published, 4, lagging)
    assert (version, codec.state_hash(state)) == (7, expected)


def test_reopened_store_serves_the_same_versions(published):
    reopened = open_store(published.root)
    assert reopened.versions() == published.versions()
    assert reopened.update_path(None) == published.update_path(None)


def test_refusals(tmp_path, states):
    store = open_store(tmp_path / "policy")
    first = manifest.build_delta(RUN, 2, 1, states[1], states[2])
    with pytest.raises(VersionOrderError, match="must be a keyframe"):
        store.put_version(manifest.sign_manifest(TRAINER, first.manifest), _blobs(first))
    keyframe = manifest.build_keyframe(RUN, 5, states[5])
    blobs = _blobs(keyframe)
    with pytest.raises(ManifestSignerError):
        store.put_version(manifest.sign_manifest(Identity.generate(), keyframe.manifest), blobs)
    corrupted = {blob_hash: data[:-1] + bytes([data[-1] ^ 1]) for blob_hash, data in blobs.items()}
    with pytest.raises(BlobHashError):
        store.put_version(manifest.sign_manifest(TRAINER, keyframe.manifest), corrupted)
    with pytest.raises(UnknownBlobError, match="neither given nor stored"):
        store.put_version(manifest.sign_manifest(TRAINER, keyframe.manifest), {})
    signed = manifest.sign_manifest(TRAINER, keyframe.manifest)
    store.put_version(signed, blobs)
    store.put_version(signed, blobs)
    with pytest.raises(VersionOrderError, match="a different keyframe"):
        store.put_version(manifest.sign_manifest(TRAINER, manifest.build_keyframe(RUN, 5, states[6]).manifest), {})
    older = manifest.build_keyframe(RUN, 4, states[4])
    with pytest.raises(VersionOrderError, match="older than the latest"):
        store.put_version(manifest.sign_manifest(TRAINER, older.manifest), _blobs(older))
    skipping = manifest.build_delta(RUN, 7, 6, states[6], states[7])
    with pytest.raises(VersionOrderError, match="the store's version before it is 5"):
        store.put_version(manifest.sign_manifest(TRAINER, skipping.manifest), _blobs(skipping))
    other_run = manifest.build_keyframe("another-run", 9, states[6])
    with pytest.raises(VersionOrderError, match="another-run"):
        store.put_version(manifest.sign_manifest(TRAINER, other_run.manifest), {})
    assert store.versions() == [(5, Codec.KEYFRAME)]


def _hashes(update):
    return [ref.hash for ref in update.manifest.blobs]


def _blobs(update):
    return dict(zip(_hashes(update), update.blobs, strict=True))


def test_uploaded_blobs_then_manifest_and_orphans_removed_on_reopen(tmp_path, states):
    store = open_store(tmp_path / "policy")
    keyframe = manifest.build_keyframe(RUN, 1, states[1])
    for blob_hash, blob in zip(_hashes(keyframe), keyframe.blobs, strict=True):
        assert store.put_blob(blob_hash, blob)
        assert not store.put_blob(blob_hash, blob)
    with pytest.raises(ValueError, match="do not hash"):
        store.put_blob(bytes(32), b"x")
    store.put_version(manifest.sign_manifest(TRAINER, keyframe.manifest), {})
    orphan = b"an upload whose manifest never came"
    store.put_blob(manifest.blob_hash(orphan), orphan)
    reopened = open_store(store.root)
    assert not reopened.has_blob(manifest.blob_hash(orphan))
    assert all(reopened.has_blob(blob_hash) for blob_hash in _hashes(keyframe))


def test_blob_chunks_from_an_offset(tmp_path):
    store = open_store(tmp_path / "policy")
    data = bytes(range(256)) * 40
    blob_hash = manifest.blob_hash(data)
    store.put_blob(blob_hash, data)
    assert b"".join(store.iter_blob_chunks(blob_hash, chunk_bytes=1000)) == data
    assert b"".join(store.iter_blob_chunks(blob_hash, offset=777, chunk_bytes=100)) == data[777:]
    assert b"".join(store.iter_blob_chunks(blob_hash, offset=10, length=5)) == data[10:15]
    assert b"".join(store.iter_blob_chunks(blob_hash, offset=len(data))) == b""
    with pytest.raises(BlobRangeError):
        store.iter_blob_chunks(blob_hash, offset=len(data) + 1)
    with pytest.raises(BlobRangeError):
        store.iter_blob_chunks(blob_hash, offset=10, length=len(data))
    with pytest.raises(UnknownBlobError):
        store.iter_blob_chunks(bytes(32))


def test_publisher_refuses_non_increasing_versions(tmp_path, states):
    store = open_store(tmp_path / "policy")
    publisher = PolicyPublisher(TRAINER, RUN, store, keyframe_interval=5)
    first = publisher.publish(1, states[1])
    assert first.delta is None and first.keyframe is not None
    second = publisher.publish(2, states[2])
    assert second.keyframe is None and second.delta.num_blob_bytes < first.keyframe.num_blob_bytes / 20
    with pytest.raises(PublishError, match="not newer"):
        publisher.publish(2, states[3])
    resumed = PolicyPublisher(TRAINER, RUN, store, keyframe_interval=5)
    resumed.resume(2, states[2])
    assert resumed.publish(3, states[3]).delta.manifest.base_version == 2


def test_a_restarted_trainer_keyframe_breaks_the_delta_chain(tmp_path, states):
    store = open_store(tmp_path / "policy")
    publisher = PolicyPublisher(TRAINER, RUN, store, keyframe_interval=100)
    for version in (1, 2, 3):
        publisher.publish(version, states[version])
    restarted = PolicyPublisher(TRAINER, RUN, store, keyframe_interval=100)
    for version in (4, 5):
        restarted.publish(version, states[version])
    assert path_of(store, 2) == [(4, Codec.KEYFRAME), (5, Codec.DELTA)]
    assert path_of(store, 4) == [(5, Codec.DELTA)]
    version, state = catch_up(store, 2, {name: bits.copy() for name, bits in states[2].items()})
    assert (version, codec.state_hash(state)) == (5, codec.state_hash(states[5]))
