"""Policy updates on the wire: manifests, their signatures, and the blobs they name.

The trainer cuts an update's payload (protocol/codec.py) into chunks of at most
MAX_BLOB_UNCOMPRESSED_BYTES, compresses each into one zstd blob named by its SHA-256, and
signs a PolicyManifest listing the tensors, the blobs (hash, size, uncompressed size) in
payload order, and the hash of the resulting state. The signature covers
MANIFEST_DOMAIN || the serialized PolicyManifest bytes, exactly as they travel.

A node pins the trainer's public key and opens an update with `open_update`, which checks
in this order: signer, signature, manifest structure, run, version (no replay of an older
version), base (a delta applies only to the version it was made against), tensor layout,
every blob's size and hash, decompression bounded by the declared sizes, payload layout.
`apply_update` then builds the new bf16 state; on any failure the current state is left as
it was and a PolicyUpdateError subclass says why.

What the state hash checks, and when. Every manifest carries `state_hash`, the hash of the
full state it results in (codec.state_hash), whatever its codec; a delta also carries
`base_state_hash`, the state_hash of the state it was made against. A keyframe's decoded
state is hashed in full and must match. A delta is bound to its base by content: it applies
only when `base_state_hash` equals the hash of the state the node holds, which the node knows
without hashing (it is the `state_hash` of the update that brought it there). Its result is
then fixed: the payload is authenticated byte for byte (blob hashes in the signed manifest),
it has exactly one decoding, and XOR application is deterministic, so the node takes the
manifest's `state_hash` as its new state's hash without rehashing 2 bytes per weight (the
cost that dominated applying a delta). What this defers is the detection of a bug on either
side or of local memory corruption: a node rehashes its full state now and then
(policy/weights.py NodePolicy.check_state_hash), and whenever it adopts a state from its
own disk.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import zstandard
from google.protobuf.message import DecodeError

from protocol import convert
from protocol.codec import (
    BF16State,
    PolicyUpdateError,
    StateLayoutError,
    TensorChange,
    apply_changes_in_place,
    check_state_matches,
    decode_delta_payload,
    decode_keyframe_payload,
    delta_sections,
    keyframe_payload_size,
    keyframe_sections,
    max_delta_payload_size,
    state_hash,
    tensor_specs,
)
from protocol.envelope import now_ms
from protocol.identity import Identity, key_id, verify_signature
from protocol.proto import policy_pb2
from protocol.types import BlobRef, Codec, PolicyManifest, SignedManifest, TensorSpec

MANIFEST_DOMAIN = b"rollproof/v1/policy-manifest\x00"
HASH_BYTES = 32
MAX_BLOB_UNCOMPRESSED_BYTES = 4 * 1024 * 1024
# zstd's worst case for incompressible input (ZSTD_COMPRESSBOUND) plus frame headers.
MAX_BLOB_BYTES = MAX_BLOB_UNCOMPRESSED_BYTES + (MAX_BLOB_UNCOMPRESSED_BYTES >> 8) + 1024
MAX_ZSTD_WINDOW_BYTES = 8 * 1024 * 1024
MAX_STATE_ELEMENTS = 1 << 40
# A delta's payload (a few MiB) is cut finer than the cap so that a node decompresses its
# blobs in parallel; the zstd tables each blob restarts cost ~0.03%.
DELTA_BLOB_UNCOMPRESSED_BYTES = 1024 * 1024
KEYFRAME_ZSTD_PARAMETERS = zstandard.ZstdCompressionParameters.from_level(3)
# Delta payloads are small, skewed streams: zstd's optimal parser (btopt) with a small search
# codes them near their entropy, where the fast levels lose 0.5 bit per symbol to short matches.
DELTA_ZSTD_PARAMETERS = zstandard.ZstdCompressionParameters(
    window_log=17,
    hash_log=12,
    chain_log=12,
    search_log=1,
    min_match=4,
    target_length=16,
    strategy=zstandard.STRATEGY_BTOPT,
)
# zstd and hashlib release the GIL, so blobs compress, hash and decompress in parallel.
_BLOB_POOL = ThreadPoolExecutor(max_workers=4, thread_name_prefix="policy-blobs")


class MalformedManifestError(PolicyUpdateError):
    code = "malformed_manifest"


class ManifestSignerError(PolicyUpdateError):
    code = "wrong_signer"


class ManifestSignatureError(PolicyUpdateError):
    code = "bad_signature"


class WrongRunError(PolicyUpdateError):
    code = "wrong_run"


class StaleVersionError(PolicyUpdateError):
    code = "stale_version"


class MissingBaseError(PolicyUpdateError):
    """A delta against a version this node does not hold: fetch the update path
    (newest keyframe plus the deltas after it) instead."""

    code = "missing_base"


class MissingBlobError(PolicyUpdateError):
    code = "missing_blob"


class BlobSizeError(PolicyUpdateError):
    code = "blob_size"


class BlobHashError(PolicyUpdateError):
    code = "blob_hash"


class DecompressedSizeError(PolicyUpdateError):
    """A blob decompresses to more bytes than the manifest declares: refused before
    unpacking past the declared size."""

    code = "decompressed_size"


class MalformedBlobError(PolicyUpdateError):
    code = "malformed_blob"


class BaseStateMismatchError(MissingBaseError):
    """A delta made against other contents than the state the node holds under that version
    (e.g. a trainer that restarted from an older checkpoint and republished the version)."""

    code = "base_state"


class StateHashMismatchError(PolicyUpdateError):
    code = "state_hash"


@dataclass(frozen=True)
class PolicyUpdate:
    """An unsigned update: its manifest and blobs, in manifest order."""

    manifest: PolicyManifest
    blobs: tuple[bytes, ...]


@dataclass(frozen=True)
class OpenedUpdate:
    """A verified update, decoded: the full state for a keyframe, the changes for a delta."""

    manifest: PolicyManifest
    keyframe_state: BF16State | None
    changes: tuple[TensorChange, ...]


# ---- blobs ----


def blob_hash(data: bytes | bytearray | memoryview) -> bytes:
    return hashlib.sha256(data).digest()


def check_blob(ref: BlobRef, data: bytes | bytearray | memoryview) -> None:
    if len(data) != ref.size:
        raise BlobSizeError(f"blob {ref.hash.hex()} has {len(data)} bytes, the manifest says {ref.size}")
    if blob_hash(data) != ref.hash:
        raise BlobHashError(f"blob {ref.hash.hex()} does not match its hash (corrupted or substituted)")


def decompress_blob_into(ref: BlobRef, data: bytes | bytearray | memoryview, out: memoryview) -> None:
    """Decompress `data` into `out` (exactly ref.uncompressed_size bytes), never producing
    more than that plus one byte, whatever sizes the zstd frame header claims."""
    assert len(out) == ref.uncompressed_size
    # ZstdDecompressor.decompress() trusts the frame header's content size over
    # max_output_size, so only the stream reader gives a hard cap.
    decompressor = zstandard.ZstdDecompressor(max_window_size=MAX_ZSTD_WINDOW_BYTES)
    try:
        with decompressor.stream_reader(data, read_across_frames=True, read_size=1 << 16) as reader:
            num_read = 0
            while num_read < len(out):
                num_new = reader.readinto(out[num_read:])
                if num_new == 0:
                    break
                num_read += num_new
            excess = reader.read(1)
    except zstandard.ZstdError as error:
        raise MalformedBlobError(f"blob {ref.hash.hex()} is not a valid zstd stream: {error}") from None
    if excess:
        raise DecompressedSizeError(
            f"blob {ref.hash.hex()} decompresses to more than the {ref.uncompressed_size} bytes its manifest declares"
        )
    if num_read != len(out):
        raise MalformedBlobError(
            f"blob {ref.hash.hex()} decompresses to {num_read} bytes, the manifest declares {ref.uncompressed_size}"
        )


def _chunks(sections: Iterable[Iterable[bytes]], chunk_size: int) -> Iterator[list[bytes]]:
    """Cut the concatenated sections into chunks of `chunk_size` bytes (the last may be
    shorter); each chunk is the list of its runs, one per section it touches."""
    runs: list[bytes] = []
    run: list[memoryview] = []
    num_pending = 0
    for section in sections:
        for piece in section:
            view = memoryview(piece)
            while view:
                take = min(len(view), chunk_size - num_pending)
                run.append(view[:take])
                num_pending += take
                view = view[take:]
                if num_pending == chunk_size:
                    yield [*runs, b"".join(run)]
                    runs, run, num_pending = [], [], 0
        if run:
            runs.append(b"".join(run))
            run = []
    if runs:
        yield runs


def _compress_runs(runs: list[bytes], parameters: zstandard.ZstdCompressionParameters) -> bytes:
    """One zstd frame, with a block boundary between runs."""
    compressor = zstandard.ZstdCompressor(compression_params=parameters).compressobj(size=sum(map(len, runs)))
    parts = []
    for index, run in enumerate(runs):
        parts.append(compressor.compress(run))
        if index < len(runs) - 1:
            parts.append(compressor.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK))
    parts.append(compressor.flush())
    return b"".join(parts)


def compress_payload(
    sections: Iterable[Iterable[bytes]],
    parameters: zstandard.ZstdCompressionParameters,
    *,
    chunk_size: int = MAX_BLOB_UNCOMPRESSED_BYTES,
) -> tuple[tuple[BlobRef, ...], tuple[bytes, ...]]:
    """Cut a payload into chunks, compress each into a blob; the refs and blobs in order."""
    if not 0 < chunk_size <= MAX_BLOB_UNCOMPRESSED_BYTES:
        raise ValueError(f"chunk_size must be in 1..{MAX_BLOB_UNCOMPRESSED_BYTES}")
    chunks = list(_chunks(sections, chunk_size))
    blobs = tuple(_BLOB_POOL.map(lambda runs: _compress_runs(runs, parameters), chunks))
    refs = tuple(
        BlobRef(hash=blob_hash(blob), size=len(blob), uncompressed_size=sum(map(len, runs)))
        for blob, runs in zip(blobs, chunks, strict=True)
    )
    return refs, blobs


def read_payload(refs: Sequence[BlobRef], blobs: Mapping[bytes, bytes]) -> bytearray:
    """Check every blob against its ref and decompress them, in order, into one payload."""
    offsets = np.cumsum([0] + [ref.uncompressed_size for ref in refs]).tolist()
    payload = bytearray(offsets[-1])
    view = memoryview(payload)

    def read_one(index: int) -> None:
        ref = refs[index]
        data = blobs.get(ref.hash)
        if data is None:
            raise MissingBlobError(f"blob {ref.hash.hex()} was not fetched")
        check_blob(ref, data)
        decompress_blob_into(ref, data, view[offsets[index] : offsets[index + 1]])

    list(_BLOB_POOL.map(read_one, range(len(refs))))
    return payload


# ---- building and signing ----


def _build_update(
    run_id: str,
    version: int,
    base_version: int,
    codec: Codec,
    sections: Iterable[Iterable[bytes]],
    zstd_parameters: zstandard.ZstdCompressionParameters,
    chunk_size: int,
    state: BF16State,
    base_state_hash: bytes,
    created_at_ms: int | None,
) -> PolicyUpdate:
    refs, blobs = compress_payload(sections, zstd_parameters, chunk_size=chunk_size)
    manifest = PolicyManifest(
        run_id=run_id,
        version=version,
        base_version=base_version,
        codec=codec,
        tensors=tensor_specs(state),
        blobs=refs,
        state_hash=state_hash(state),
        created_at_ms=now_ms() if created_at_ms is None else created_at_ms,
        base_state_hash=base_state_hash,
    )
    check_manifest_structure(manifest)
    return PolicyUpdate(manifest=manifest, blobs=blobs)


def build_keyframe(run_id: str, version: int, state: BF16State, *, created_at_ms: int | None = None) -> PolicyUpdate:
    return _build_update(
        run_id,
        version,
        version,
        Codec.KEYFRAME,
        keyframe_sections(state),
        KEYFRAME_ZSTD_PARAMETERS,
        MAX_BLOB_UNCOMPRESSED_BYTES,
        state,
        b"",
        created_at_ms,
    )


def build_delta(
    run_id: str,
    version: int,
    base_version: int,
    base_state: BF16State,
    state: BF16State,
    *,
    base_state_hash: bytes | None = None,
    created_at_ms: int | None = None,
) -> PolicyUpdate:
    """The delta taking `base_state` to `state`. `base_state_hash`: state_hash(base_state),
    when the caller already has it (a publisher does: it is the previous manifest's)."""
    return _build_update(
        run_id,
        version,
        base_version,
        Codec.DELTA,
        delta_sections(base_state, state),
        DELTA_ZSTD_PARAMETERS,
        DELTA_BLOB_UNCOMPRESSED_BYTES,
        state,
        state_hash(base_state) if base_state_hash is None else base_state_hash,
        created_at_ms,
    )


def manifest_bytes(manifest: PolicyManifest) -> bytes:
    return convert.manifest_to_proto(manifest).SerializeToString(deterministic=True)


def manifest_signing_bytes(serialized_manifest: bytes) -> bytes:
    return MANIFEST_DOMAIN + serialized_manifest


def sign_manifest(identity: Identity, manifest: PolicyManifest) -> SignedManifest:
    serialized = manifest_bytes(manifest)
    return SignedManifest(
        manifest_bytes=serialized,
        signer_public_key=identity.public_key,
        signature=identity.sign(manifest_signing_bytes(serialized)),
    )


def signed_manifest_to_bytes(signed: SignedManifest) -> bytes:
    return convert.signed_manifest_to_proto(signed).SerializeToString(deterministic=True)


def signed_manifest_from_bytes(data: bytes) -> SignedManifest:
    message = policy_pb2.SignedManifest()
    try:
        message.ParseFromString(data)
    except DecodeError as error:
        raise MalformedManifestError(f"signed manifest does not parse: {error}") from None
    return convert.signed_manifest_from_proto(message)


# ---- verifying ----


def check_manifest_structure(manifest: PolicyManifest) -> None:
    """Field bounds a manifest must meet whoever signed it."""
    _check_header(manifest)
    _check_tensors(manifest)
    _check_blobs(manifest)


def _check_header(manifest: PolicyManifest) -> None:
    if not manifest.run_id:
        raise MalformedManifestError("run_id is empty")
    if manifest.codec == Codec.KEYFRAME and manifest.base_version != manifest.version:
        raise MalformedManifestError(
            f"a keyframe has base_version == version, got {manifest.base_version} != {manifest.version}"
        )
    if manifest.codec == Codec.DELTA and manifest.base_version >= manifest.version:
        raise MalformedManifestError(
            f"a delta's base_version ({manifest.base_version}) must be below its version ({manifest.version})"
        )
    if len(manifest.state_hash) != HASH_BYTES:
        raise MalformedManifestError(f"state_hash has {len(manifest.state_hash)} bytes, expected {HASH_BYTES}")
    expected_base_hash_bytes = HASH_BYTES if manifest.codec == Codec.DELTA else 0
    if len(manifest.base_state_hash) != expected_base_hash_bytes:
        raise MalformedManifestError(
            f"base_state_hash has {len(manifest.base_state_hash)} bytes; a {manifest.codec.name.lower()} needs "
            f"{expected_base_hash_bytes}"
        )


def _check_tensors(manifest: PolicyManifest) -> None:
    names = [spec.name for spec in manifest.tensors]
    if any(not name for name in names):
        raise MalformedManifestError("a tensor has an empty name")
    if names != sorted(set(names)):
        raise MalformedManifestError("tensor names must be unique and sorted")
    if sum(math.prod(spec.shape) for spec in manifest.tensors) > MAX_STATE_ELEMENTS:
        raise MalformedManifestError(f"the tensors hold more than {MAX_STATE_ELEMENTS} elements")


def _check_blobs(manifest: PolicyManifest) -> None:
    for index, ref in enumerate(manifest.blobs):
        if len(ref.hash) != HASH_BYTES:
            raise MalformedManifestError(f"blobs[{index}].hash has {len(ref.hash)} bytes, expected {HASH_BYTES}")
        if not 0 < ref.size <= MAX_BLOB_BYTES:
            raise MalformedManifestError(f"blobs[{index}].size {ref.size} is outside 1..{MAX_BLOB_BYTES}")
        if not 0 < ref.uncompressed_size <= MAX_BLOB_UNCOMPRESSED_BYTES:
            raise MalformedManifestError(
                f"blobs[{index}].uncompressed_size {ref.uncompressed_size} is outside 1..{MAX_BLOB_UNCOMPRESSED_BYTES}"
            )
    payload_size = sum(ref.uncompressed_size for ref in manifest.blobs)
    if manifest.codec == Codec.KEYFRAME and payload_size != keyframe_payload_size(manifest.tensors):
        raise MalformedManifestError(
            f"keyframe blobs declare {payload_size} bytes; the tensors need {keyframe_payload_size(manifest.tensors)}"
        )
    if manifest.codec == Codec.DELTA and payload_size > max_delta_payload_size(manifest.tensors):
        raise MalformedManifestError(f"delta blobs declare {payload_size} bytes, more than the tensors can need")


def verify_manifest(signed: SignedManifest, trainer_public_key: bytes) -> PolicyManifest:
    """The manifest, once it is shown to be signed by the pinned trainer key and well formed."""
    if signed.signer_public_key != trainer_public_key:
        raise ManifestSignerError(
            f"manifest is signed by {_describe_key(signed.signer_public_key)}, "
            f"not by the pinned trainer key {key_id(trainer_public_key)}"
        )
    if not verify_signature(trainer_public_key, manifest_signing_bytes(signed.manifest_bytes), signed.signature):
        raise ManifestSignatureError("manifest signature does not match its bytes (edited after signing?)")
    message = policy_pb2.PolicyManifest()
    try:
        message.ParseFromString(signed.manifest_bytes)
        manifest = convert.manifest_from_proto(message)
    except (DecodeError, convert.WireFormatError) as error:
        raise MalformedManifestError(f"manifest does not decode: {error}") from None
    check_manifest_structure(manifest)
    return manifest


def _describe_key(public_key: bytes) -> str:
    try:
        return key_id(public_key)
    except ValueError:
        return f"a malformed {len(public_key)}-byte key"


def check_update_applies(manifest: PolicyManifest, *, run_id: str, current_version: int | None) -> None:
    """Run, replay and base checks for a node holding `current_version` (None: nothing yet)."""
    if manifest.run_id != run_id:
        raise WrongRunError(f"manifest is for run {manifest.run_id!r}, this node follows run {run_id!r}")
    if current_version is not None and manifest.version <= current_version:
        raise StaleVersionError(
            f"manifest is for version {manifest.version}; this node already holds version {current_version}"
        )
    if manifest.codec == Codec.DELTA and manifest.base_version != current_version:
        held = "no version" if current_version is None else f"version {current_version}"
        raise MissingBaseError(
            f"delta to version {manifest.version} applies to version {manifest.base_version}, but this node holds "
            f"{held}; fetch the update path (newest keyframe, then deltas) instead"
        )


def open_update(
    signed: SignedManifest,
    blobs: Mapping[bytes, bytes],
    *,
    trainer_public_key: bytes,
    run_id: str,
    current_version: int | None,
    current_specs: Sequence[TensorSpec] | None,
) -> OpenedUpdate:
    """Verify a signed update against what the node holds and decode its payload."""
    manifest = verify_manifest(signed, trainer_public_key)
    check_update_applies(manifest, run_id=run_id, current_version=current_version)
    if current_specs is not None and tuple(current_specs) != manifest.tensors:
        raise StateLayoutError(
            "the manifest's tensor list differs from this node's model "
            f"({len(manifest.tensors)} tensors in the manifest, {len(current_specs)} in the model)"
        )
    payload = read_payload(manifest.blobs, blobs)
    if manifest.codec == Codec.KEYFRAME:
        return OpenedUpdate(
            manifest=manifest, keyframe_state=decode_keyframe_payload(payload, manifest.tensors), changes=()
        )
    return OpenedUpdate(
        manifest=manifest, keyframe_state=None, changes=tuple(decode_delta_payload(payload, manifest.tensors))
    )


def check_keyframe_state(update: OpenedUpdate) -> BF16State:
    """A keyframe's decoded state, once its full hash matches the manifest's."""
    assert update.keyframe_state is not None
    if state_hash(update.keyframe_state) != update.manifest.state_hash:
        raise StateHashMismatchError(
            f"the keyframe of version {update.manifest.version} does not have the state hash its manifest declares"
        )
    return update.keyframe_state


def check_delta_base(state: BF16State | None, held_state_hash: bytes | None, update: OpenedUpdate) -> BF16State:
    """`state`, once shown to be the delta's base: same tensors, and `held_state_hash` (the
    hash of `state` the caller knows; None: hashed here) equal to the manifest's base_state_hash."""
    if state is None:
        raise MissingBaseError("a delta needs a base state; fetch the keyframe path instead")
    check_state_matches(state, update.manifest.tensors)
    if held_state_hash is None:
        held_state_hash = state_hash(state)
    if held_state_hash != update.manifest.base_state_hash:
        raise BaseStateMismatchError(
            f"delta to version {update.manifest.version} was made against other contents than this node's version "
            f"{update.manifest.base_version}; fetch the update path (newest keyframe, then deltas) instead"
        )
    return state


def apply_update(state: BF16State | None, update: OpenedUpdate, *, held_state_hash: bytes | None = None) -> BF16State:
    """The state after `update`, whose hash is then the manifest's state_hash (see the module
    docstring). A keyframe's state is hashed in full and `state` left untouched; a delta is
    checked against its base (`held_state_hash`: the hash of `state` if known, else it is
    computed) and applied to `state` in place."""
    if update.keyframe_state is not None:
        return check_keyframe_state(update)
    base = check_delta_base(state, held_state_hash, update)
    apply_changes_in_place(base, update.changes)
    return base
