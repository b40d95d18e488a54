import dataclasses
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import zstandard

from protocol import codec, manifest
from protocol.codec import MalformedPayloadError
from protocol.identity import Identity
from protocol.manifest import (
    BaseStateMismatchError,
    BlobHashError,
    BlobSizeError,
    DecompressedSizeError,
    MalformedBlobError,
    MalformedManifestError,
    ManifestSignatureError,
    ManifestSignerError,
    MissingBaseError,
    MissingBlobError,
    StaleVersionError,
    StateHashMismatchError,
    WrongRunError,
)
from protocol.proto import policy_pb2
from protocol.types import BlobRef, Codec, PolicyManifest, SignedManifest, TensorSpec
from tests.unit.test_codec import perturb, random_bf16_state

VECTORS = json.loads((Path(__file__).parent.parent / "vectors" / "policy.json").read_text())
RUN = "run-a"
TRAINER = Identity.from_seed(bytes(range(32)))
SHAPES = {"embed": (300, 64), "layer.0.weight": (64, 200), "norm": (64,)}


def blob_map(update):
    return {ref.hash: blob for ref, blob in zip(update.manifest.blobs, update.blobs, strict=True)}


@pytest.fixture(scope="module")
def versions():
    rng = np.random.default_rng(0)
    states = [random_bf16_state(rng, SHAPES)]
    for _ in range(3):
        states.append(perturb(rng, states[-1], 0.02))
    return states


class Node:
    """What a node holds: a version, its bf16 state and that state's hash."""

    def __init__(self):
        self.version = None
        self.state = None
        self.state_hash = None

    def apply(self, signed, blobs):
        update = manifest.open_update(
            signed,
            blobs,
            trainer_public_key=TRAINER.public_key,
            run_id=RUN,
            current_version=self.version,
            current_specs=None if self.state is None else codec.tensor_specs(self.state),
        )
        self.state = manifest.apply_update(self.state, update, held_state_hash=self.state_hash)
        self.version, self.state_hash = update.manifest.version, update.manifest.state_hash

    def fingerprint(self):
        return self.version, None if self.state is None else codec.state_hash(self.state)


def keyframe(state, version=1, **kwargs):
    update = manifest.build_keyframe(RUN, version, state, created_at_ms=1000, **kwargs)
    return manifest.sign_manifest(TRAINER, update.manifest), blob_map(update), update


def delta(base, state, version, base_version, **kwargs):
    update = manifest.build_delta(RUN, version, base_version, base, state, created_at_ms=1000, **kwargs)
    return manifest.sign_manifest(TRAINER, update.manifest), blob_map(update), update


@pytest.fixture
def node_at_v1(versions):
    node = Node()
    signed, blobs, _ = keyframe(versions[0])
    node.apply(signed, blobs)
    return node


def test_keyframe_then_delta_chain_is_bit_exact(versions, node_at_v1):
    for version, (base, new) in enumerate(itertools.pairwise(versions), start=2):
        signed, blobs, update = delta(base, new, version, version - 1)
        assert update.manifest.base_state_hash == codec.state_hash(base)
        assert update.manifest.state_hash == codec.state_hash(new)
        node_at_v1.apply(signed, blobs)
        assert node_at_v1.version == version
        for name in new:
            np.testing.assert_array_equal(node_at_v1.state[name], new[name])
        assert node_at_v1.state_hash == codec.state_hash(node_at_v1.state)


def test_keyframe_is_smaller_than_raw_and_blobs_are_capped(versions):
    state = random_bf16_state(np.random.default_rng(9), {"big": (3_000_000,)})
    update = manifest.build_keyframe(RUN, 1, state)
    assert len(update.blobs) == 2
    assert all(ref.uncompressed_size <= manifest.MAX_BLOB_UNCOMPRESSED_BYTES for ref in update.manifest.blobs)
    assert sum(len(blob) for blob in update.blobs) <= 0.8 * 2 * state["big"].size
    assert all(
        ref.hash == manifest.blob_hash(blob) for ref, blob in zip(update.manifest.blobs, update.blobs, strict=True)
    )


def test_payload_sections_split_into_blobs_and_back():
    sections = [[b"ab", b"cdefg"], [b"h" * 11], [], [b"ijk"]]
    for chunk_size in (1, 3, 7, 100):
        refs, blobs = manifest.compress_payload(
            (iter(section) for section in sections), manifest.DELTA_ZSTD_PARAMETERS, chunk_size=chunk_size
        )
        assert [ref.uncompressed_size for ref in refs[:-1]] == [chunk_size] * (len(refs) - 1)
        payload = manifest.read_payload(refs, dict(zip([ref.hash for ref in refs], blobs, strict=True)))
        assert payload == b"abcdefg" + b"h" * 11 + b"ijk"


def test_signature_covers_domain_and_exact_bytes(versions):
    signed, _, update = keyframe(versions[0])
    assert signed.manifest_bytes == manifest.manifest_bytes(update.manifest)
    assert manifest.verify_manifest(signed, TRAINER.public_key) == update.manifest
    round_tripped = manifest.signed_manifest_from_bytes(manifest.signed_manifest_to_bytes(signed))
    assert round_tripped == signed


def expect_refused(node, error_type, signed, blobs, match=None):
    before = node.fingerprint()
    with pytest.raises(error_type, match=match):
        node.apply(signed, blobs)
    assert node.fingerprint() == before


def test_flipped_byte_in_blob(versions, node_at_v1):
    signed, blobs, update = delta(versions[0], versions[1], 2, 1)
    first = update.manifest.blobs[0].hash
    corrupted = bytearray(blobs[first])
    corrupted[len(corrupted) // 2] ^= 0x01
    expect_refused(node_at_v1, BlobHashError, signed, {**blobs, first: bytes(corrupted)}, "does not match its hash")


def test_blob_of_wrong_size(versions, node_at_v1):
    signed, blobs, update = delta(versions[0], versions[1], 2, 1)
    first = update.manifest.blobs[0].hash
    expect_refused(node_at_v1, BlobSizeError, signed, {**blobs, first: blobs[first] + b"\x00"}, "the manifest says")


def test_missing_blob(versions, node_at_v1):
    signed, blobs, update = delta(versions[0], versions[1], 2, 1)
    del blobs[update.manifest.blobs[0].hash]
    expect_refused(node_at_v1, MissingBlobError, signed, blobs)


def test_manifest_signed_by_another_key(versions, node_at_v1):
    _, blobs, update = delta(versions[0], versions[1], 2, 1)
    forged = manifest.sign_manifest(Identity.generate(), update.manifest)
    expect_refused(node_at_v1, ManifestSignerError, forged, blobs, "not by the pinned trainer key")
    swapped_key = dataclasses.replace(forged, signer_public_key=TRAINER.public_key)
    expect_refused(node_at_v1, ManifestSignatureError, swapped_key, blobs)


def test_manifest_edited_after_signing(versions, node_at_v1):
    signed, blobs, _ = delta(versions[0], versions[1], 2, 1)
    message = policy_pb2.PolicyManifest.FromString(signed.manifest_bytes)
    message.version = 3
    edited = dataclasses.replace(signed, manifest_bytes=message.SerializeToString())
    expect_refused(node_at_v1, ManifestSignatureError, edited, blobs, "edited after signing")


def test_older_version_replayed_as_new(versions, node_at_v1):
    signed_v2, blobs_v2, _ = delta(versions[0], versions[1], 2, 1)
    node_at_v1.apply(signed_v2, blobs_v2)
    expect_refused(node_at_v1, StaleVersionError, signed_v2, blobs_v2, "already holds version 2")
    signed_v1, blobs_v1, _ = keyframe(versions[0])
    expect_refused(node_at_v1, StaleVersionError, signed_v1, blobs_v1)


def test_delta_against_a_base_the_node_does_not_hold(versions, node_at_v1):
    signed, blobs, _ = delta(versions[1], versions[2], 3, 2)
    expect_refused(node_at_v1, MissingBaseError, signed, blobs, "fetch the update path")
    expect_refused(Node(), MissingBaseError, signed, blobs, "holds no version")
    signed_key, blobs_key, _ = keyframe(versions[2], version=3)
    node_at_v1.apply(signed_key, blobs_key)
    assert node_at_v1.version == 3


def test_wrong_run(versions, node_at_v1):
    update = manifest.build_delta("run-b", 2, 1, versions[0], versions[1])
    expect_refused(node_at_v1, WrongRunError, manifest.sign_manifest(TRAINER, update.manifest), blob_map(update))


def test_keyframe_with_a_wrong_state_hash_leaves_the_state_untouched(versions, node_at_v1):
    update = manifest.build_keyframe(RUN, 5, versions[3])
    lying = dataclasses.replace(update.manifest, state_hash=bytes(32))
    expect_refused(node_at_v1, StateHashMismatchError, manifest.sign_manifest(TRAINER, lying), blob_map(update))


def test_delta_made_against_other_contents_of_the_base_version(versions, node_at_v1):
    """A trainer that restarted from an older checkpoint republishes version 1 differently:
    its delta to version 2 names the right base version but not the node's base contents."""
    signed, blobs, _ = delta(versions[2], versions[1], 2, 1)
    expect_refused(node_at_v1, BaseStateMismatchError, signed, blobs, "other contents")
    assert issubclass(BaseStateMismatchError, MissingBaseError)
    unknown_hash = Node()
    unknown_hash.version, unknown_hash.state = node_at_v1.version, node_at_v1.state
    expect_refused(unknown_hash, BaseStateMismatchError, signed, blobs)


def test_a_delta_result_is_not_rehashed_but_binds_the_next_delta(versions, node_at_v1):
    """A delta's state_hash is taken as signed (its result is fixed by base and payload); a
    wrong one is caught by the next full hash, or by the next delta's base_state_hash."""
    update = manifest.build_delta(RUN, 2, 1, versions[0], versions[1])
    lying = dataclasses.replace(update.manifest, state_hash=bytes(32))
    node_at_v1.apply(manifest.sign_manifest(TRAINER, lying), blob_map(update))
    assert codec.state_hash(node_at_v1.state) != node_at_v1.state_hash
    signed, blobs, _ = delta(versions[1], versions[2], 3, 2)
    expect_refused(node_at_v1, BaseStateMismatchError, signed, blobs)


def signed_delta_with_blob(blob, uncompressed_size, tensors=(TensorSpec(name="w", shape=(100_000,)),)):
    ref = BlobRef(hash=manifest.blob_hash(blob), size=len(blob), uncompressed_size=uncompressed_size)
    bogus = PolicyManifest(
        run_id=RUN,
        version=2,
        base_version=1,
        codec=Codec.DELTA,
        tensors=tensors,
        blobs=(ref,),
        state_hash=bytes(32),
        created_at_ms=0,
        base_state_hash=bytes(32),
    )
    return manifest.sign_manifest(TRAINER, bogus), {ref.hash: blob}


def zstd_bomb(num_zero_mib):
    compressor = zstandard.ZstdCompressor(level=1).compressobj()
    zeros = bytes(1 << 20)
    return b"".join(compressor.compress(zeros) for _ in range(num_zero_mib)) + compressor.flush()


def test_blob_exceeding_its_declared_uncompressed_size_is_refused_not_unpacked():
    bomb = zstd_bomb(256)
    assert len(bomb) < manifest.MAX_BLOB_BYTES
    signed, blobs = signed_delta_with_blob(bomb, 1000)
    node = Node()
    node.version, node.state = 1, {"w": np.zeros(100_000, dtype=np.uint16)}
    expect_refused(node, DecompressedSizeError, signed, blobs, "more than the 1000 bytes")
    with_header = zstandard.ZstdCompressor().compress(bytes(2000))
    signed, blobs = signed_delta_with_blob(with_header, 1000)
    expect_refused(node, DecompressedSizeError, signed, blobs)


def test_blob_shorter_than_declared_or_not_zstd():
    node = Node()
    node.version, node.state = 1, {"w": np.zeros(100_000, dtype=np.uint16)}
    signed, blobs = signed_delta_with_blob(zstandard.ZstdCompressor().compress(bytes(500)), 1000)
    expect_refused(node, MalformedBlobError, signed, blobs, "decompresses to 500 bytes")
    signed, blobs = signed_delta_with_blob(b"not a zstd frame", 1000)
    expect_refused(node, MalformedBlobError, signed, blobs, "not a valid zstd")


def test_signed_but_malformed_payload():
    node = Node()
    node.version, node.state = 1, {"w": np.zeros(100_000, dtype=np.uint16)}
    signed, blobs = signed_delta_with_blob(zstandard.ZstdCompressor().compress(b"\x05\x01\x01\x00"), 4)
    expect_refused(node, MalformedPayloadError, signed, blobs)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"run_id": ""}, "run_id"),
        ({"base_version": 0}, "keyframe has base_version == version"),
        ({"codec": Codec.DELTA, "base_version": 1}, "must be below"),
        ({"codec": Codec.DELTA, "base_version": 0}, "a delta needs 32"),
        ({"base_state_hash": bytes(32)}, "a keyframe needs 0"),
        ({"tensors": (TensorSpec("b", (2,)), TensorSpec("a", (2,)))}, "sorted"),
        ({"tensors": (TensorSpec("a", (2,)), TensorSpec("a", (2,)))}, "unique"),
        ({"tensors": (TensorSpec("a", (1 << 30, 1 << 20)),)}, "more than"),
        ({"state_hash": b"short"}, "state_hash"),
        ({"blobs": (BlobRef(bytes(32), manifest.MAX_BLOB_BYTES + 1, 8),)}, "size"),
        ({"blobs": (BlobRef(bytes(32), 10, manifest.MAX_BLOB_UNCOMPRESSED_BYTES + 1),)}, "uncompressed_size"),
        ({"blobs": (BlobRef(bytes(31), 10, 8),)}, "hash"),
        ({"blobs": (BlobRef(bytes(32), 10, 6),)}, "the tensors need 8"),
    ],
)
def test_manifest_structure_is_checked_after_the_signature(change, message):
    good = PolicyManifest(
        run_id=RUN,
        version=1,
        base_version=1,
        codec=Codec.KEYFRAME,
        tensors=(TensorSpec("a", (2,)), TensorSpec("b", (2,))),
        blobs=(BlobRef(bytes(32), 10, 8),),
        state_hash=bytes(32),
        created_at_ms=0,
    )
    manifest.verify_manifest(manifest.sign_manifest(TRAINER, good), TRAINER.public_key)
    signed = manifest.sign_manifest(TRAINER, dataclasses.replace(good, **change))
    with pytest.raises(MalformedManifestError, match=message):
        manifest.verify_manifest(signed, TRAINER.public_key)


def test_unparseable_manifest_bytes_are_malformed():
    garbage = b"\xff\xff\xff"
    signed = SignedManifest(
        manifest_bytes=garbage,
        signer_public_key=TRAINER.public_key,
        signature=TRAINER.sign(manifest.manifest_signing_bytes(garbage)),
    )
    with pytest.raises(MalformedManifestError, match="does not decode"):
        manifest.verify_manifest(signed, TRAINER.public_key)


def test_vectors():
    """Trainer and node compute the same payloads, hashes and manifest bytes."""
    base, new = (
        {name: np.array(tensor["bits"], dtype=np.uint16).reshape(tensor["shape"]) for name, tensor in state.items()}
        for state in VECTORS["states"]
    )
    assert [codec.state_hash(base).hex(), codec.state_hash(new).hex()] == VECTORS["state_hashes_hex"]
    keyframe_payload = b"".join(b"".join(section) for section in codec.keyframe_sections(base))
    assert keyframe_payload.hex() == VECTORS["keyframe_payload_hex"]
    delta_payload = b"".join(b"".join(section) for section in codec.delta_sections(base, new))
    assert delta_payload.hex() == VECTORS["delta_payload_hex"]
    held = {name: bits.copy() for name, bits in base.items()}
    codec.apply_changes_in_place(held, codec.decode_delta_payload(delta_payload, codec.tensor_specs(new)))
    assert codec.state_hash(held) == codec.state_hash(new)

    trainer = Identity.from_seed(bytes.fromhex(VECTORS["trainer_seed_hex"]))
    serialized = bytes.fromhex(VECTORS["delta_manifest_hex"])
    signed = SignedManifest(serialized, trainer.public_key, bytes.fromhex(VECTORS["delta_signature_hex"]))
    delta_manifest = manifest.verify_manifest(signed, trainer.public_key)
    assert delta_manifest.base_state_hash == codec.state_hash(base)
    assert delta_manifest.state_hash == codec.state_hash(new)
    assert delta_manifest.tensors == codec.tensor_specs(new)
    assert manifest.manifest_bytes(delta_manifest) == serialized
    assert manifest.sign_manifest(trainer, delta_manifest) == signed
