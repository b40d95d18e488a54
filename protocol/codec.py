"""The weight codec: bf16 policy states, their hash, keyframes and sparse deltas.

A *bf16 state* maps tensor names to C-contiguous uint16 arrays holding the raw bfloat16
bits (torch's `tensor.view(torch.int16)`, read as unsigned). This module turns states into
*payloads* (the uncompressed byte stream of one update) and back; protocol/manifest.py cuts a
payload into compressed, content-addressed blobs.

Payload layouts (tensors always in manifest order: sorted by name):

* keyframe: for each tensor, its high bytes (bits 15..8 of every element, C order), then
  its low bytes (bits 7..0). Exactly 2 bytes per element, no headers.
* delta: for each tensor one record:
      varint num_changed
      if num_changed > 0:
          u8 position_coding            1 = gaps, 2 = bitmap
          varint num_position_bytes
          positions                     gaps: per changed flat index i (ascending), the varint
                                        of i - previous_i - 1 (previous_i = -1 at the start);
                                        bitmap: ceil(n / 8) bytes, bit i%8 of byte i//8 set
                                        when element i changed, padding bits zero
          xor_high[num_changed]         high bytes of new_bits XOR base_bits
          xor_low[num_changed]          low bytes of the same
  Varints are unsigned LEB128 in canonical form (no trailing zero groups), at most 9 bytes.
  Every listed XOR is nonzero, so one new state has exactly one delta payload.

Applying a delta XORs the listed values into the base, so the result is the new state bit
for bit, and applying the same changes again restores the base.
"""

from __future__ import annotations

import enum
import hashlib
import struct
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from protocol.types import TensorSpec

BF16State = dict[str, np.ndarray]

STATE_HASH_DOMAIN = b"rollproof/v1/bf16-state\x00"
MAX_VARINT_BYTES = 9
_NUM_HASH_THREADS = 4


class PolicyUpdateError(ValueError):
    """Base class: a policy update was refused; the node keeps its current policy. `code`
    names the check that failed."""

    code = "bad_policy_update"


class StateLayoutError(PolicyUpdateError):
    """A state's tensor names, shapes or dtypes do not match what they must match."""

    code = "state_layout"


class MalformedPayloadError(PolicyUpdateError):
    """The decompressed update bytes do not follow the payload layout."""

    code = "malformed_payload"


class PositionCoding(enum.IntEnum):
    GAPS = 1
    BITMAP = 2


@dataclass(frozen=True)
class TensorChange:
    """The elements of one tensor that an update changes: flat C-order indices, ascending,
    and for each the XOR of its new bits with its base bits (nonzero)."""

    name: str
    flat_indices: np.ndarray
    xor_bits: np.ndarray


# ---- state hash ----


def _tensor_digest(bits: np.ndarray) -> bytes:
    return hashlib.sha256(memoryview(np.ascontiguousarray(bits).astype("<u2", copy=False)).cast("B")).digest()


def state_hash(state: Mapping[str, np.ndarray]) -> bytes:
    """SHA-256 of a bf16 state, defined as

        SHA-256( STATE_HASH_DOMAIN || u32 num_tensors ||
                 for each tensor, names sorted by their UTF-8 bytes:
                     u32 len(name) || name (UTF-8) || u32 ndim || u64 dim_0 .. u64 dim_{ndim-1} ||
                     SHA-256(the element bits as little-endian uint16, C order) )

    with all integers big-endian. Per-tensor digests are computed in parallel threads.
    """
    check_bf16_state(state)
    names = sorted(state, key=lambda name: name.encode())
    with ThreadPoolExecutor(max_workers=_NUM_HASH_THREADS) as pool:
        digests = list(pool.map(lambda name: _tensor_digest(state[name]), names))
    outer = hashlib.sha256(STATE_HASH_DOMAIN)
    outer.update(struct.pack(">I", len(names)))
    for name, digest in zip(names, digests):
        encoded_name = name.encode()
        shape = state[name].shape
        outer.update(struct.pack(">I", len(encoded_name)) + encoded_name)
        outer.update(struct.pack(f">I{len(shape)}Q", len(shape), *shape))
        outer.update(digest)
    return outer.digest()


# ---- states and specs ----


def check_bf16_state(state: Mapping[str, np.ndarray]) -> None:
    for name, bits in state.items():
        if not isinstance(bits, np.ndarray) or bits.dtype != np.uint16:
            raise StateLayoutError(f"tensor {name!r}: a bf16 state holds uint16 arrays of raw bits, got {bits!r:.80}")
        if not bits.flags.c_contiguous:
            raise StateLayoutError(f"tensor {name!r}: array must be C-contiguous")


def tensor_specs(state: Mapping[str, np.ndarray]) -> tuple[TensorSpec, ...]:
    """The manifest's tensor list for a state: sorted by name."""
    check_bf16_state(state)
    return tuple(TensorSpec(name=name, shape=tuple(state[name].shape)) for name in sorted(state))


def check_state_matches(state: Mapping[str, np.ndarray], specs: Sequence[TensorSpec]) -> None:
    """Raise StateLayoutError unless `state` has exactly the tensors `specs` lists."""
    expected = {spec.name: spec.shape for spec in specs}
    actual = {name: tuple(bits.shape) for name, bits in state.items()}
    if expected == actual:
        return
    missing = sorted(expected.keys() - actual.keys())
    extra = sorted(actual.keys() - expected.keys())
    reshaped = sorted(name for name in expected.keys() & actual.keys() if expected[name] != actual[name])
    raise StateLayoutError(
        f"state does not match the tensor list: missing {missing[:5]}, unexpected {extra[:5]}, "
        f"different shape {[(name, actual[name], expected[name]) for name in reshaped[:5]]}"
    )


def num_elements(spec: TensorSpec) -> int:
    return int(np.prod(spec.shape, dtype=np.int64)) if spec.shape else 1


# ---- varints ----


def encode_varints(values: np.ndarray) -> np.ndarray:
    """Unsigned LEB128 of each value (uint64 array), concatenated, as a uint8 array."""
    values = values.astype(np.uint64, copy=False)
    num_bytes = np.ones(values.shape, dtype=np.int64)
    for group in range(1, 10):
        num_bytes += values >= np.uint64(1 << (7 * group))
    offsets = np.cumsum(num_bytes) - num_bytes
    encoded = np.empty(int(num_bytes.sum()), dtype=np.uint8)
    for group in range(int(num_bytes.max(initial=0))):
        has_group = num_bytes > group
        group_bits = (values[has_group] >> np.uint64(7 * group)) & np.uint64(0x7F)
        continuation = np.where(num_bytes[has_group] > group + 1, 0x80, 0).astype(np.uint64)
        encoded[offsets[has_group] + group] = (group_bits | continuation).astype(np.uint8)
    return encoded


def decode_varints(encoded: np.ndarray) -> np.ndarray:
    """Inverse of encode_varints; refuses truncated, over-long and non-canonical varints."""
    if encoded.size == 0:
        return np.empty(0, dtype=np.uint64)
    is_last = encoded < 0x80
    if not is_last[-1]:
        raise MalformedPayloadError("positions end inside a varint")
    ends = np.flatnonzero(is_last)
    starts = np.empty_like(ends)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    lengths = ends - starts + 1
    if lengths.max() > MAX_VARINT_BYTES:
        raise MalformedPayloadError(f"a varint is longer than {MAX_VARINT_BYTES} bytes")
    if np.any(encoded[ends[lengths > 1]] == 0):
        raise MalformedPayloadError("a varint is not in canonical form (trailing zero group)")
    shifts = (np.arange(encoded.size, dtype=np.int64) - np.repeat(starts, lengths)) * 7
    groups = (encoded & 0x7F).astype(np.uint64) << shifts.astype(np.uint64)
    return np.add.reduceat(groups, starts)


def _read_varint(payload: memoryview, offset: int) -> tuple[int, int]:
    value = 0
    for length in range(MAX_VARINT_BYTES):
        if offset + length >= len(payload):
            raise MalformedPayloadError(f"payload ends inside a varint at byte {offset}")
        byte = payload[offset + length]
        value |= (byte & 0x7F) << (7 * length)
        if byte < 0x80:
            if byte == 0 and length > 0:
                raise MalformedPayloadError(f"non-canonical varint at byte {offset}")
            return value, offset + length + 1
    raise MalformedPayloadError(f"varint at byte {offset} is longer than {MAX_VARINT_BYTES} bytes")


def _varint_bytes(value: int) -> bytes:
    return encode_varints(np.array([value], dtype=np.uint64)).tobytes()


# ---- keyframes ----


def keyframe_payload_size(specs: Sequence[TensorSpec]) -> int:
    return 2 * sum(num_elements(spec) for spec in specs)


def iter_keyframe_payload(state: Mapping[str, np.ndarray]) -> Iterator[bytes]:
    """The keyframe payload of `state`, as consecutive segments (two per tensor)."""
    for spec in tensor_specs(state):
        flat = state[spec.name].reshape(-1)
        yield (flat >> 8).astype(np.uint8).tobytes()
        yield (flat & 0xFF).astype(np.uint8).tobytes()


def decode_keyframe_payload(payload: bytes | bytearray | memoryview, specs: Sequence[TensorSpec]) -> BF16State:
    expected_size = keyframe_payload_size(specs)
    if len(payload) != expected_size:
        raise MalformedPayloadError(
            f"keyframe payload has {len(payload)} bytes; the tensor list needs exactly {expected_size}"
        )
    data = np.frombuffer(payload, dtype=np.uint8)
    state: BF16State = {}
    offset = 0
    for spec in specs:
        count = num_elements(spec)
        high = data[offset : offset + count]
        low = data[offset + count : offset + 2 * count]
        bits = (high.astype(np.uint16) << 8) | low
        state[spec.name] = bits.reshape(spec.shape)
        offset += 2 * count
    return state


# ---- deltas ----


def _tensor_changes(base_flat: np.ndarray, new_flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    xor = np.bitwise_xor(base_flat, new_flat)
    flat_indices = np.flatnonzero(xor)
    return flat_indices, xor[flat_indices]


def _encode_positions(flat_indices: np.ndarray, count: int) -> tuple[PositionCoding, bytes]:
    """Gap varints, or a bitmap when that is smaller (changes denser than about 1 in 8)."""
    gaps = np.diff(flat_indices, prepend=-1) - 1
    gap_bytes = encode_varints(gaps.astype(np.uint64))
    num_bitmap_bytes = (count + 7) // 8
    if gap_bytes.size <= num_bitmap_bytes:
        return PositionCoding.GAPS, gap_bytes.tobytes()
    changed = np.zeros(count, dtype=bool)
    changed[flat_indices] = True
    return PositionCoding.BITMAP, np.packbits(changed, bitorder="little").tobytes()


def iter_delta_payload(base: Mapping[str, np.ndarray], new: Mapping[str, np.ndarray]) -> Iterator[bytes]:
    """The delta payload taking `base` to `new`, as consecutive segments (one per tensor)."""
    specs = tensor_specs(new)
    check_state_matches(base, specs)
    check_bf16_state(base)
    for spec in specs:
        flat_indices, xor_bits = _tensor_changes(base[spec.name].reshape(-1), new[spec.name].reshape(-1))
        if flat_indices.size == 0:
            yield _varint_bytes(0)
            continue
        coding, positions = _encode_positions(flat_indices, num_elements(spec))
        yield b"".join(
            [
                _varint_bytes(flat_indices.size),
                bytes([coding]),
                _varint_bytes(len(positions)),
                positions,
                (xor_bits >> 8).astype(np.uint8).tobytes(),
                (xor_bits & 0xFF).astype(np.uint8).tobytes(),
            ]
        )


def _decode_positions(coding: int, positions: np.ndarray, num_changed: int, count: int, name: str) -> np.ndarray:
    if coding == PositionCoding.GAPS:
        gaps = decode_varints(positions)
        if gaps.size != num_changed:
            raise MalformedPayloadError(f"tensor {name!r}: {gaps.size} position gaps for {num_changed} changes")
        if np.any(gaps >= np.uint64(count)):
            raise MalformedPayloadError(f"tensor {name!r}: a position gap points past the tensor's {count} elements")
        flat_indices = np.cumsum(gaps + np.uint64(1)) - np.uint64(1)
        # Each step adds less than 2**63, so a wrap-around would show as a decrease.
        if np.any(flat_indices[1:] <= flat_indices[:-1]) or flat_indices[-1] >= np.uint64(count):
            raise MalformedPayloadError(f"tensor {name!r}: positions run past the tensor's {count} elements")
        return flat_indices.astype(np.int64)
    if coding == PositionCoding.BITMAP:
        if positions.size != (count + 7) // 8:
            raise MalformedPayloadError(
                f"tensor {name!r}: bitmap has {positions.size} bytes, expected {(count + 7) // 8}"
            )
        changed = np.unpackbits(positions, bitorder="little")
        if np.any(changed[count:]):
            raise MalformedPayloadError(f"tensor {name!r}: bitmap padding bits must be zero")
        flat_indices = np.flatnonzero(changed[:count])
        if flat_indices.size != num_changed:
            raise MalformedPayloadError(
                f"tensor {name!r}: bitmap marks {flat_indices.size} positions for {num_changed} changes"
            )
        return flat_indices
    raise MalformedPayloadError(f"tensor {name!r}: unknown position coding {coding}")


def decode_delta_payload(
    payload: bytes | bytearray | memoryview, specs: Sequence[TensorSpec]
) -> list[TensorChange]:
    """Parse and fully check a delta payload against the manifest's tensor list."""
    view = memoryview(payload).cast("B")
    data = np.frombuffer(view, dtype=np.uint8)
    changes: list[TensorChange] = []
    offset = 0
    for spec in specs:
        count = num_elements(spec)
        num_changed, offset = _read_varint(view, offset)
        if num_changed == 0:
            continue
        if num_changed > count:
            raise MalformedPayloadError(f"tensor {spec.name!r}: {num_changed} changes in {count} elements")
        if offset >= len(view):
            raise MalformedPayloadError(f"tensor {spec.name!r}: payload ends before the position coding")
        coding = view[offset]
        num_position_bytes, offset = _read_varint(view, offset + 1)
        end = offset + num_position_bytes + 2 * num_changed
        if end > len(view):
            raise MalformedPayloadError(f"tensor {spec.name!r}: payload ends inside the record")
        flat_indices = _decode_positions(
            coding, data[offset : offset + num_position_bytes], num_changed, count, spec.name
        )
        offset += num_position_bytes
        xor_high = data[offset : offset + num_changed].astype(np.uint16)
        xor_low = data[offset + num_changed : end]
        xor_bits = (xor_high << 8) | xor_low
        if not np.all(xor_bits):
            raise MalformedPayloadError(f"tensor {spec.name!r}: a listed change has a zero XOR")
        changes.append(TensorChange(name=spec.name, flat_indices=flat_indices, xor_bits=xor_bits))
        offset = end
    if offset != len(view):
        raise MalformedPayloadError(f"{len(view) - offset} bytes left after the last tensor record")
    return changes


def apply_changes_in_place(state: Mapping[str, np.ndarray], changes: Sequence[TensorChange]) -> None:
    """XOR `changes` into `state`. Applying the same changes twice restores the state."""
    for change in changes:
        state[change.name].reshape(-1)[change.flat_indices] ^= change.xor_bits
