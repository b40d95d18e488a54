"""The weight codec: bf16 policy states, their hash, keyframes and sparse deltas.

A *bf16 state* maps tensor names to uint16 arrays holding the raw bfloat16 bits (torch's
`tensor.view(torch.int16)`, read as unsigned); a node's may be strided views into its
model's weights. This module turns states into
*payloads* (the uncompressed byte stream of one update, made of sections) and back;
protocol/manifest.py cuts a payload into compressed, content-addressed blobs, ending a zstd
block at each section boundary so that each section gets its own entropy tables.

Payload layouts (tensors always in manifest order: sorted by name):

* keyframe: two sections: the high bytes (bits 15..8) of every element of every tensor (C
  order, tensor after tensor), then the low bytes (bits 7..0) in the same order. Exactly 2
  bytes per element, no headers.
* delta: the positions whose bits changed and the XOR of their new bits with the base bits,
  in six sections; within each, the tensors with changes follow each other in order:
      headers       per tensor: varint num_changed; if num_changed > 0: u8 position_coding,
                    and for GAPS also u8 k (Rice parameter, <= 32) and varint num_quotient_bytes
      quotients     GAPS tensors: varint(gap >> k) per change
      remainders    GAPS tensors: ceil(k / 8) byte planes of num_changed bytes, plane j holding
                    bits 8j..8j+7 of gap & (2**k - 1)
      bitmaps       BITMAP tensors: ceil(n / 8) bytes, bit i%8 of byte i//8 set when flat
                    element i changed, padding bits zero
      xor_high      per change, bits 15..8 of new_bits XOR base_bits
      xor_low       per change, bits 7..0 of the same
  gap = i - previous_i - 1 over the ascending changed flat indices i (previous_i = -1 at the
  start). Splitting gaps Rice-style (k picked per tensor) leaves quotients that are small and
  geometric and remainders near uniform; grouping like streams lets zstd's entropy coder see
  each distribution whole. Varints are unsigned LEB128, canonical (no trailing zero groups),
  at most 9 bytes. Every listed XOR is nonzero, so one new state has exactly one payload.

Applying a delta XORs the listed values into the base, so the result is the new state bit
for bit, and applying the same changes again restores the base.
"""

from __future__ import annotations

import enum
import hashlib
import math
import os
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from protocol.types import TensorSpec

BF16State = dict[str, np.ndarray]
_Item = TypeVar("_Item")
_Result = TypeVar("_Result")

STATE_HASH_DOMAIN = b"rollproof/v1/bf16-state\x00"
MAX_VARINT_BYTES = 9
MAX_RICE_PARAMETER = 32
_MAX_DELTA_HEADER_BYTES = 2 * MAX_VARINT_BYTES + 2
_SCATTER_ROUND = 16384
# A delta with fewer changes in all is decoded and applied in the calling thread: handing work to
# pool threads would cost more than it saves.
_MIN_PARALLEL_CHANGES = 131072
# Applying splits a tensor's changes into pieces of at most this many, so that one large tensor
# spreads over the workers.
_APPLY_PIECE_CHANGES = 65536
# hashlib and numpy release the GIL on large buffers, so tensors hash, and changes decode and
# apply, in parallel threads: the calling thread and NUM_WORKERS - 1 of the pool's.
_NUM_WORKERS = max(1, min(4, os.cpu_count() or 1))
_TENSOR_POOL = ThreadPoolExecutor(max_workers=4, thread_name_prefix="bf16-tensors")


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
    GAPS = 1  # Rice-split gaps between changed positions
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
    return hashlib.sha256(np.ascontiguousarray(bits.reshape(-1), dtype="<u2").data).digest()


def state_hash(state: Mapping[str, np.ndarray]) -> bytes:
    """SHA-256 of a bf16 state, defined as

        SHA-256( STATE_HASH_DOMAIN || u32 num_tensors ||
                 for each tensor, names sorted by their UTF-8 bytes:
                     u32 len(name) || name (UTF-8) || u32 ndim || u64 dim_0 .. u64 dim_{ndim-1} ||
                     SHA-256(the element bits as little-endian uint16, C order) )

    with all integers big-endian. Per-tensor digests are computed in parallel threads.

    Test vector: {"b": [0x3F80, 0xC000, 0x3F00], "a.weight": [[0x3F80, 0], [0x3F00, 0xC000]],
    "c": 0x3F80 (0-d)} hashes to
    6126f0273f599eb802cba267f7b400ca1aab740b5034901b78542237444fa036.
    """
    check_bf16_state(state)
    names = sorted(state, key=lambda name: name.encode())
    digests = list(_TENSOR_POOL.map(lambda name: _tensor_digest(state[name]), names))
    outer = hashlib.sha256(STATE_HASH_DOMAIN)
    outer.update(struct.pack(">I", len(names)))
    for name, digest in zip(names, digests, strict=True):
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
    return math.prod(spec.shape)


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


def keyframe_sections(state: Mapping[str, np.ndarray]) -> list[Iterator[bytes]]:
    """The keyframe payload of `state`: its two sections, each as consecutive pieces."""
    specs = tensor_specs(state)

    def plane(shift: int) -> Iterator[bytes]:
        for spec in specs:
            yield ((state[spec.name].reshape(-1) >> shift) & 0xFF).astype(np.uint8).tobytes()

    return [plane(8), plane(0)]


def decode_keyframe_payload(payload: bytes | bytearray | memoryview, specs: Sequence[TensorSpec]) -> BF16State:
    expected_size = keyframe_payload_size(specs)
    if len(payload) != expected_size:
        raise MalformedPayloadError(
            f"keyframe payload has {len(payload)} bytes; the tensor list needs exactly {expected_size}"
        )
    data = np.frombuffer(payload, dtype=np.uint8)
    num_high_bytes = expected_size // 2
    state: BF16State = {}
    offset = 0
    for spec in specs:
        count = num_elements(spec)
        high = data[offset : offset + count]
        low = data[num_high_bytes + offset : num_high_bytes + offset + count]
        state[spec.name] = ((high.astype(np.uint16) << 8) | low).reshape(spec.shape)
        offset += count
    return state


# ---- deltas ----


def max_delta_payload_size(specs: Sequence[TensorSpec]) -> int:
    """An upper bound on any valid delta payload's size for these tensors."""
    return sum(
        _MAX_DELTA_HEADER_BYTES + (MAX_VARINT_BYTES + MAX_RICE_PARAMETER // 8 + 2) * num_elements(spec)
        for spec in specs
    )


_DELTA_DATA_SECTIONS = ("quotients", "remainders", "bitmap", "xor_high", "xor_low")


@dataclass(frozen=True)
class _EncodedTensor:
    header: bytes
    quotients: bytes = b""
    remainders: bytes = b""
    bitmap: bytes = b""
    xor_high: bytes = b""
    xor_low: bytes = b""


def rice_parameter(gaps: np.ndarray) -> tuple[int, int]:
    """The Rice parameter k that codes `gaps` (uint64) in the fewest bits, and that length:
    sum(gap >> k) + len(gaps) * (k + 1). The optimum lies near log2 of the mean gap."""
    mean_gap = float(gaps.mean()) + 1.0
    centre = min(int(np.log2(mean_gap)), MAX_RICE_PARAMETER)
    best_k, best_bits = 0, None
    for k in range(max(0, centre - 2), min(MAX_RICE_PARAMETER, centre + 2) + 1):
        bits = int(np.sum(gaps >> np.uint64(k), dtype=np.uint64)) + gaps.size * (k + 1)
        if best_bits is None or bits < best_bits:
            best_k, best_bits = k, bits
    assert best_bits is not None
    return best_k, best_bits


def _encode_tensor(base_flat: np.ndarray, new_flat: np.ndarray) -> _EncodedTensor:
    xor = np.bitwise_xor(base_flat, new_flat)
    flat_indices = np.flatnonzero(xor)
    if flat_indices.size == 0:
        return _EncodedTensor(header=_varint_bytes(0))
    xor_bits = xor[flat_indices]
    xor_planes = {
        "xor_high": (xor_bits >> 8).astype(np.uint8).tobytes(),
        "xor_low": (xor_bits & 0xFF).astype(np.uint8).tobytes(),
    }
    gaps = (np.diff(flat_indices, prepend=-1) - 1).astype(np.uint64)
    k, _ = rice_parameter(gaps)
    quotients = encode_varints(gaps >> np.uint64(k)).tobytes()
    num_bitmap_bytes = (base_flat.size + 7) // 8
    # Dense changes: one bit per element beats at least a byte per change.
    if len(quotients) + -(-k // 8) * flat_indices.size > num_bitmap_bytes:
        changed = np.zeros(base_flat.size, dtype=bool)
        changed[flat_indices] = True
        return _EncodedTensor(
            header=_varint_bytes(flat_indices.size) + bytes([PositionCoding.BITMAP]),
            bitmap=np.packbits(changed, bitorder="little").tobytes(),
            **xor_planes,
        )
    remainders = gaps & np.uint64((1 << k) - 1)
    planes = [((remainders >> np.uint64(8 * plane)) & np.uint64(0xFF)).astype(np.uint8) for plane in range(-(-k // 8))]
    return _EncodedTensor(
        header=_varint_bytes(flat_indices.size) + bytes([PositionCoding.GAPS, k]) + _varint_bytes(len(quotients)),
        quotients=quotients,
        remainders=b"".join(plane.tobytes() for plane in planes),
        **xor_planes,
    )


def delta_sections(base: Mapping[str, np.ndarray], new: Mapping[str, np.ndarray]) -> list[Iterator[bytes]]:
    """The delta payload taking `base` to `new`: its six sections, each as consecutive pieces."""
    specs = tensor_specs(new)
    check_state_matches(base, specs)
    check_bf16_state(base)
    encoded = [_encode_tensor(base[spec.name].reshape(-1), new[spec.name].reshape(-1)) for spec in specs]
    return [
        iter([b"".join(tensor.header for tensor in encoded)]),
        *(iter([getattr(tensor, section) for tensor in encoded]) for section in _DELTA_DATA_SECTIONS),
    ]


@dataclass(frozen=True)
class _DeltaHeader:
    spec: TensorSpec
    num_changed: int
    coding: PositionCoding | None = None
    rice_k: int = 0
    num_quotient_bytes: int = 0

    @property
    def num_remainder_bytes(self) -> int:
        return -(-self.rice_k // 8) * self.num_changed if self.coding == PositionCoding.GAPS else 0

    @property
    def num_bitmap_bytes(self) -> int:
        return (num_elements(self.spec) + 7) // 8 if self.coding == PositionCoding.BITMAP else 0


def _read_headers(view: memoryview, specs: Sequence[TensorSpec]) -> tuple[list[_DeltaHeader], int]:
    headers = []
    offset = 0
    for spec in specs:
        num_changed, offset = _read_varint(view, offset)
        if num_changed == 0:
            headers.append(_DeltaHeader(spec=spec, num_changed=0))
            continue
        if num_changed > num_elements(spec):
            raise MalformedPayloadError(f"tensor {spec.name!r}: {num_changed} changes in {num_elements(spec)} elements")
        if offset >= len(view):
            raise MalformedPayloadError(f"tensor {spec.name!r}: payload ends before the position coding")
        coding_value = view[offset]
        offset += 1
        if coding_value == PositionCoding.BITMAP:
            headers.append(_DeltaHeader(spec=spec, num_changed=num_changed, coding=PositionCoding.BITMAP))
            continue
        if coding_value != PositionCoding.GAPS:
            raise MalformedPayloadError(f"tensor {spec.name!r}: unknown position coding {coding_value}")
        if offset >= len(view) or view[offset] > MAX_RICE_PARAMETER:
            raise MalformedPayloadError(f"tensor {spec.name!r}: missing or too large Rice parameter")
        rice_k = view[offset]
        num_quotient_bytes, offset = _read_varint(view, offset + 1)
        headers.append(
            _DeltaHeader(spec, num_changed, PositionCoding.GAPS, rice_k=rice_k, num_quotient_bytes=num_quotient_bytes)
        )
    return headers, offset


def _decode_quotients(header: _DeltaHeader, quotient_bytes: np.ndarray) -> tuple[np.ndarray, int]:
    """The Rice quotients of a GAPS tensor, and the largest."""
    name, count = header.spec.name, num_elements(header.spec)
    max_quotient = int(quotient_bytes.max(initial=0))
    # The usual case (k near log2 of the mean gap): every varint is a single byte.
    quotients = quotient_bytes
    if quotient_bytes.size != header.num_changed or max_quotient >= 0x80:
        quotients = decode_varints(quotient_bytes)
        if quotients.size != header.num_changed:
            raise MalformedPayloadError(
                f"tensor {name!r}: {quotients.size} position gaps for {header.num_changed} changes"
            )
        max_quotient = int(quotients.max())
    if max_quotient > (count - 1) >> header.rice_k:
        raise MalformedPayloadError(f"tensor {name!r}: a position gap points past the tensor's {count} elements")
    return quotients, max_quotient


def _decode_gaps(header: _DeltaHeader, quotient_bytes: np.ndarray, remainder_bytes: np.ndarray) -> np.ndarray:
    name, count, k = header.spec.name, num_elements(header.spec), header.rice_k
    quotients, max_quotient = _decode_quotients(header, quotient_bytes)
    planes: npt.NDArray[np.uint8] = remainder_bytes.reshape(-1, header.num_changed)
    if k % 8 and planes[-1].max() >> (k % 8):
        raise MalformedPayloadError(f"tensor {name!r}: a Rice remainder has bits above bit {k}")
    # The step from one changed position to the next, gap + 1 = (quotient << k | remainder) + 1,
    # is at most max_step: it is computed in the narrowest type that holds that (usually
    # uint16, a quarter of the memory traffic of int64), then summed into int64 positions.
    max_step = ((max_quotient << k) | ((1 << k) - 1)) + 1
    step_type = np.uint16 if max_step < 1 << 16 else np.uint32 if max_step < 1 << 32 else np.int64
    steps: npt.NDArray[np.integer[Any]] = quotients.astype(step_type)
    steps <<= k
    for plane_index, plane in enumerate(planes):
        steps |= plane if plane_index == 0 else plane.astype(step_type) << (8 * plane_index)
    steps += 1
    if max_step > count and steps.max() > count:
        raise MalformedPayloadError(f"tensor {name!r}: a position gap points past the tensor's {count} elements")
    steps[0] -= 1  # the first position is the first gap itself
    flat_indices = np.cumsum(steps, dtype=np.int64)
    # Every step is at most count, so the sum stays below num_changed * count; only past
    # 2**63 could it wrap around, which would show as a decrease.
    if header.num_changed * count >= 2**63 and np.any(flat_indices[1:] <= flat_indices[:-1]):
        raise MalformedPayloadError(f"tensor {name!r}: positions run past the tensor's {count} elements")
    if flat_indices[-1] >= count:
        raise MalformedPayloadError(f"tensor {name!r}: positions run past the tensor's {count} elements")
    return flat_indices


def _decode_bitmap(header: _DeltaHeader, bitmap: np.ndarray) -> np.ndarray:
    name, count = header.spec.name, num_elements(header.spec)
    changed = np.unpackbits(bitmap, bitorder="little")
    if np.any(changed[count:]):
        raise MalformedPayloadError(f"tensor {name!r}: bitmap padding bits must be zero")
    flat_indices = np.flatnonzero(changed[:count])
    if flat_indices.size != header.num_changed:
        raise MalformedPayloadError(
            f"tensor {name!r}: bitmap marks {flat_indices.size} positions for {header.num_changed} changes"
        )
    return flat_indices


def decode_delta_payload(payload: bytes | bytearray | memoryview, specs: Sequence[TensorSpec]) -> list[TensorChange]:
    """Parse and fully check a delta payload against the manifest's tensor list."""
    view = memoryview(payload).cast("B")
    data = np.frombuffer(view, dtype=np.uint8)
    headers, offset = _read_headers(view, specs)
    section_sizes = [
        sum(header.num_quotient_bytes for header in headers),
        sum(header.num_remainder_bytes for header in headers),
        sum(header.num_bitmap_bytes for header in headers),
        sum(header.num_changed for header in headers),
        sum(header.num_changed for header in headers),
    ]
    if offset + sum(section_sizes) != len(view):
        raise MalformedPayloadError(
            f"delta payload has {len(view)} bytes; its headers describe {offset + sum(section_sizes)}"
        )
    cursors = np.cumsum([offset, *section_sizes[:-1]]).tolist()

    def take(section: int, size: int) -> np.ndarray:
        start = cursors[section]
        cursors[section] += size
        return data[start : start + size]

    def decode(job: tuple[_DeltaHeader, list[np.ndarray]]) -> TensorChange:
        header, (quotient_bytes, remainder_bytes, bitmap, xor_high, xor_low) = job
        if header.coding == PositionCoding.GAPS:
            flat_indices = _decode_gaps(header, quotient_bytes, remainder_bytes)
        else:
            flat_indices = _decode_bitmap(header, bitmap)
        xor_bits = (xor_high.astype(np.uint16) << 8) | xor_low
        if not np.all(xor_bits):
            raise MalformedPayloadError(f"tensor {header.spec.name!r}: a listed change has a zero XOR")
        return TensorChange(name=header.spec.name, flat_indices=flat_indices, xor_bits=xor_bits)

    jobs = [
        (
            header,
            [
                take(0, header.num_quotient_bytes),
                take(1, header.num_remainder_bytes),
                take(2, header.num_bitmap_bytes),
                take(3, header.num_changed),
                take(4, header.num_changed),
            ],
        )
        for header in headers
        if header.num_changed
    ]
    return _map_over_tensors(decode, jobs, [header.num_changed for header, _ in jobs])


def apply_changes_in_place(state: Mapping[str, np.ndarray], changes: Sequence[TensorChange]) -> None:
    """XOR `changes` into `state`. Applying the same changes twice restores the state.

    The state's arrays may be strided views (e.g. the high halves of float32 weights) as long
    as they flatten without a copy."""
    flat_arrays = {}
    for change in changes:
        try:
            flat_arrays[change.name] = state[change.name].reshape(-1, copy=False)
        except ValueError:
            raise StateLayoutError(f"tensor {change.name!r}: its array cannot be updated in place") from None

    def apply(piece: tuple[str, np.ndarray, np.ndarray]) -> None:
        name, flat_indices, xor_bits = piece
        flat = flat_arrays[name]
        # A round at a time, so that the cache lines the gather brings in are still there for
        # the scatter: twice as fast as one gather and one scatter over the whole tensor.
        for start in range(0, flat_indices.size, _SCATTER_ROUND):
            flat[flat_indices[start : start + _SCATTER_ROUND]] ^= xor_bits[start : start + _SCATTER_ROUND]

    pieces = [
        (
            change.name,
            change.flat_indices[start : start + _APPLY_PIECE_CHANGES],
            change.xor_bits[start : start + _APPLY_PIECE_CHANGES],
        )
        for change in changes
        for start in range(0, change.flat_indices.size, _APPLY_PIECE_CHANGES)
    ]
    _map_over_tensors(apply, pieces, [piece[1].size for piece in pieces])


def _map_over_tensors(
    function: Callable[[_Item], _Result], items: Sequence[_Item], num_changes: Sequence[int]
) -> list[_Result]:
    """`function` of each item, in order. The items are dealt into _NUM_WORKERS bins of about
    equal numbers of changes (largest first, each to the lightest bin); the calling thread runs
    the first bin while pool threads run the others."""
    num_bins = _NUM_WORKERS if sum(num_changes) >= _MIN_PARALLEL_CHANGES else 1
    bins: list[list[int]] = [[] for _ in range(num_bins)]
    loads = [0] * num_bins
    for index in sorted(range(len(items)), key=lambda index: -num_changes[index]):
        lightest = loads.index(min(loads))
        bins[lightest].append(index)
        loads[lightest] += num_changes[index]

    def run(indices: list[int]) -> list[tuple[int, _Result]]:
        return [(index, function(items[index])) for index in indices]

    futures = [_TENSOR_POOL.submit(run, indices) for indices in bins[1:] if indices]
    results = dict(run(bins[0]))
    for future in futures:
        results.update(future.result())
    return [results[index] for index in range(len(items))]
