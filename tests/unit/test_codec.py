import hashlib
import itertools
import struct

import numpy as np
import pytest

from protocol import codec
from protocol.codec import MalformedPayloadError, PositionCoding, StateLayoutError

STATE_HASH_VECTOR = "6126f0273f599eb802cba267f7b400ca1aab740b5034901b78542237444fa036"


def random_bf16_state(rng, shapes):
    """bf16 bits of normal(0, 0.02) weights, the way a fresh model's parameters look."""
    state = {}
    for name, shape in shapes.items():
        values = np.asarray(rng.normal(0.0, 0.02, size=shape), dtype=np.float32)
        state[name] = np.ascontiguousarray((values.view(np.uint32) >> 16).astype(np.uint16))
    return state


def perturb(rng, state, fraction):
    """A new state in which about `fraction` of the elements moved by one or two bf16 steps."""
    new_state = {}
    for name, bits in state.items():
        flat = bits.reshape(-1).copy()
        changed = rng.random(flat.size) < fraction
        steps = rng.choice(np.array([1, 2, 0xFFFF, 0xFFFE], dtype=np.uint16), size=int(changed.sum()))
        flat[changed] += steps
        new_state[name] = flat.reshape(bits.shape)
    return new_state


def naive_varints(values):
    out = bytearray()
    for value in values:
        value = int(value)
        while True:
            group = value & 0x7F
            value >>= 7
            out.append(group | (0x80 if value else 0))
            if not value:
                break
    return bytes(out)


def naive_state_hash(state):
    outer = hashlib.sha256(b"rollproof/v1/bf16-state\x00" + struct.pack(">I", len(state)))
    for name in sorted(state, key=str.encode):
        bits = state[name]
        outer.update(struct.pack(">I", len(name.encode())) + name.encode())
        outer.update(struct.pack(">I", bits.ndim) + b"".join(struct.pack(">Q", dim) for dim in bits.shape))
        outer.update(hashlib.sha256(b"".join(struct.pack("<H", int(v)) for v in bits.reshape(-1))).digest())
    return outer.digest()


SHAPES = {
    "model.embed.weight": (64, 48),
    "model.layers.0.mlp.weight": (48, 96),
    "model.norm.weight": (48,),
    "scalar": (),
}


def test_varints_match_naive_reference():
    values = np.array([0, 1, 127, 128, 255, 300, 16383, 16384, 2**32 + 5, 2**62, 2**63 - 1], dtype=np.uint64)
    encoded = codec.encode_varints(values)
    assert encoded.tobytes() == naive_varints(values)
    np.testing.assert_array_equal(codec.decode_varints(encoded), values)


@pytest.mark.parametrize(
    "encoded, message",
    [(b"\x80", "inside a varint"), (b"\x81\x00", "canonical"), (b"\xff" * 9 + b"\x01", "longer than 9")],
)
def test_decode_varints_refuses_bad_input(encoded, message):
    with pytest.raises(MalformedPayloadError, match=message):
        codec.decode_varints(np.frombuffer(encoded, dtype=np.uint8))


def test_state_hash_vector():
    one, minus_two, half = 0x3F80, 0xC000, 0x3F00
    state = {
        "b": np.array([one, minus_two, half], dtype=np.uint16),
        "a.weight": np.array([[one, 0], [half, minus_two]], dtype=np.uint16),
        "c": np.array(one, dtype=np.uint16),
    }
    assert codec.state_hash(state) == naive_state_hash(state)
    assert codec.state_hash(state).hex() == STATE_HASH_VECTOR


def test_state_hash_matches_naive_reference_and_sees_names_shapes_bits():
    rng = np.random.default_rng(0)
    state = random_bf16_state(rng, SHAPES)
    reference = codec.state_hash(state)
    assert reference == naive_state_hash(state)
    renamed = dict(state)
    renamed["model.norm.weightX"] = renamed.pop("model.norm.weight")
    reshaped = {**state, "model.embed.weight": state["model.embed.weight"].reshape(48, 64)}
    flipped = {name: bits.copy() for name, bits in state.items()}
    flipped["model.layers.0.mlp.weight"][3, 7] ^= 1
    for variant in (renamed, reshaped, flipped):
        assert codec.state_hash(variant) != reference


def test_states_are_uint16_and_may_be_strided_views():
    with pytest.raises(StateLayoutError, match="uint16"):
        codec.state_hash({"w": np.zeros(3, dtype=np.float32)})
    bits = np.arange(16, dtype=np.uint16).reshape(4, 4)
    assert codec.state_hash({"w": bits.T}) == codec.state_hash({"w": bits.T.copy()})
    # The high halves of float32 weights: a strided view that updates them in place.
    weights = (np.arange(12, dtype=np.uint32) << 16).view(np.float32).reshape(3, 4)
    high_halves = weights.reshape(-1).view(np.uint16)[1::2].reshape(3, 4)
    change = codec.TensorChange("w", np.array([1, 10]), np.array([0x3F80, 0x0001], dtype=np.uint16))
    codec.apply_changes_in_place({"w": high_halves}, [change])
    assert weights.view(np.uint32).reshape(-1)[[1, 10]].tolist() == [(1 ^ 0x3F80) << 16, (10 ^ 1) << 16]
    with pytest.raises(StateLayoutError, match="cannot be updated in place"):
        codec.apply_changes_in_place({"w": bits.T}, [change])


def joined(sections):
    return b"".join(b"".join(section) for section in sections)


def test_keyframe_round_trip_is_exact_and_splits_byte_planes():
    rng = np.random.default_rng(1)
    state = random_bf16_state(rng, SHAPES)
    specs = codec.tensor_specs(state)
    payload = joined(codec.keyframe_sections(state))
    assert len(payload) == codec.keyframe_payload_size(specs)
    flat = np.concatenate([state[spec.name].reshape(-1) for spec in specs])
    assert payload == (flat >> 8).astype(np.uint8).tobytes() + (flat & 0xFF).astype(np.uint8).tobytes()
    decoded = codec.decode_keyframe_payload(payload, specs)
    assert codec.state_hash(decoded) == codec.state_hash(state)
    with pytest.raises(MalformedPayloadError, match="needs exactly"):
        codec.decode_keyframe_payload(payload[:-1], specs)


def decode_onto(base, payload, specs):
    state = {name: bits.copy() for name, bits in base.items()}
    codec.apply_changes_in_place(state, codec.decode_delta_payload(payload, specs))
    return state


def test_delta_chain_reproduces_every_version_bit_for_bit():
    rng = np.random.default_rng(2)
    versions = [random_bf16_state(rng, SHAPES)]
    for fraction in (0.01, 0.3, 0.0, 1.0, 0.002):
        versions.append(perturb(rng, versions[-1], fraction))
    held = versions[0]
    for base, new in itertools.pairwise(versions):
        specs = codec.tensor_specs(new)
        held = decode_onto(held, joined(codec.delta_sections(base, new)), specs)
        for name in new:
            np.testing.assert_array_equal(held[name], new[name])


def test_tensors_with_many_changes_decode_and_apply_in_threads_alike():
    rng = np.random.default_rng(7)
    base = random_bf16_state(rng, {"big.gaps": (3000, 500), "big.bitmap": (400, 400), "small": (30,)})
    new = perturb(rng, base, 0.05)
    new["big.bitmap"] = perturb(rng, {"w": base["big.bitmap"]}, 0.5)["w"]
    specs = codec.tensor_specs(new)
    payload = joined(codec.delta_sections(base, new))
    changes = codec.decode_delta_payload(payload, specs)
    assert sum(change.flat_indices.size for change in changes) >= codec._MIN_PARALLEL_CHANGES
    assert max(change.flat_indices.size for change in changes) > codec._APPLY_PIECE_CHANGES
    held = decode_onto(base, payload, specs)
    for name in new:
        np.testing.assert_array_equal(held[name], new[name])
    num_changed = sum(change.flat_indices.size for change in changes)
    zero_xor = bytearray(payload)
    zero_xor[-2 * num_changed] = zero_xor[-num_changed] = 0  # the first change of "big.bitmap"
    with pytest.raises(MalformedPayloadError, match="'big.bitmap': a listed change has a zero XOR"):
        codec.decode_delta_payload(bytes(zero_xor), specs)


def test_applying_changes_twice_restores_the_base():
    rng = np.random.default_rng(3)
    base = random_bf16_state(rng, SHAPES)
    new = perturb(rng, base, 0.05)
    changes = codec.decode_delta_payload(joined(codec.delta_sections(base, new)), codec.tensor_specs(new))
    state = {name: bits.copy() for name, bits in base.items()}
    codec.apply_changes_in_place(state, changes)
    codec.apply_changes_in_place(state, changes)
    assert codec.state_hash(state) == codec.state_hash(base)


@pytest.mark.parametrize("fraction, coding", [(0.01, PositionCoding.GAPS), (0.5, PositionCoding.BITMAP)])
def test_position_coding_follows_density(fraction, coding):
    rng = np.random.default_rng(4)
    base = {"w": random_bf16_state(rng, {"w": (10_000,)})["w"]}
    new = perturb(rng, base, fraction)
    headers = joined(codec.delta_sections(base, new)[:1])
    num_changed, offset = codec._read_varint(memoryview(headers), 0)
    assert num_changed == np.count_nonzero(base["w"] != new["w"])
    assert headers[offset] == coding


def test_rice_parameter_is_the_cheapest():
    gaps = np.random.default_rng(6).geometric(0.01, size=5000).astype(np.uint64) - np.uint64(1)
    k, num_bits = codec.rice_parameter(gaps)
    costs = {j: int(np.sum(gaps >> np.uint64(j))) + gaps.size * (j + 1) for j in range(33)}
    assert num_bits == costs[k] == min(costs.values())
    assert codec.rice_parameter(np.array([2**45], dtype=np.uint64))[0] == codec.MAX_RICE_PARAMETER


def xor_planes(xor_bits):
    xor = np.asarray(xor_bits, dtype=np.uint16)
    return (xor >> 8).astype(np.uint8).tobytes() + (xor & 0xFF).astype(np.uint8).tobytes()


def gaps_payload(num_changed, k, quotients, remainders, xor_bits):
    header = naive_varints([num_changed]) + bytes([PositionCoding.GAPS, k]) + naive_varints([len(quotients)])
    return header + quotients + bytes(remainders) + xor_planes(xor_bits)


def bitmap_payload(num_changed, bitmap, xor_bits):
    return naive_varints([num_changed]) + bytes([PositionCoding.BITMAP]) + bytes(bitmap) + xor_planes(xor_bits)


SPECS_ONE = (codec.TensorSpec(name="w", shape=(10,)),)
VALID_GAPS = gaps_payload(2, 1, naive_varints([1, 2]), [1, 0], [1, 1])  # gaps 3, 4: elements 3 and 8


@pytest.mark.parametrize(
    "payload, message",
    [
        (gaps_payload(2, 1, naive_varints([1, 3]), [1, 1], [1, 1]), "past the tensor"),
        (gaps_payload(2, 1, naive_varints([5, 0]), [0, 0], [1, 1]), "past the tensor"),
        (gaps_payload(2, 1, naive_varints([1]), [1, 0], [1, 1]), "1 position gaps for 2"),
        (gaps_payload(2, 1, naive_varints([1, 2]), [1, 0], [1, 0]), "zero XOR"),
        (gaps_payload(2, 1, naive_varints([1, 2]), [2, 0], [1, 1]), "bits above bit 1"),
        (gaps_payload(2, 33, naive_varints([0, 0]), [0] * 10, [1, 1]), "Rice parameter"),
        (gaps_payload(11, 0, naive_varints([0] * 11), [], [1] * 11), "11 changes in 10"),
        (naive_varints([1]) + bytes([7, 0, 1, 0, 0, 1]), "unknown position coding"),
        (bitmap_payload(2, [0b1001], [1, 1]), "headers describe"),
        (bitmap_payload(2, [0b1001, 0b100], [1, 1]), "padding"),
        (bitmap_payload(3, [0b1001, 0], [1, 1, 1]), "marks 2 positions"),
        (VALID_GAPS[:-1], "headers describe"),
        (VALID_GAPS + b"\x00", "headers describe"),
        (b"", "ends inside a varint"),
    ],
)
def test_malformed_delta_payloads_are_refused(payload, message):
    with pytest.raises(MalformedPayloadError, match=message):
        codec.decode_delta_payload(payload, SPECS_ONE)


@pytest.mark.parametrize(
    "payload, flat_indices", [(VALID_GAPS, [3, 8]), (bitmap_payload(2, [0b1001, 0], [1, 1]), [0, 3])]
)
def test_hand_made_delta_payloads(payload, flat_indices):
    (change,) = codec.decode_delta_payload(payload, SPECS_ONE)
    np.testing.assert_array_equal(change.flat_indices, flat_indices)
    np.testing.assert_array_equal(change.xor_bits, [1, 1])


@pytest.mark.parametrize("k, largest_gap", [(0, 100), (0, 200), (3, 1 << 20), (9, 1 << 33), (17, 1 << 20)])
def test_gaps_decode_alike_with_one_and_many_byte_quotients_and_any_step_width(k, largest_gap):
    """Quotients below 128 take a one-byte fast path, larger ones the general varint decoder;
    steps between positions are summed from uint16, uint32 or int64 as their size needs."""
    rng = np.random.default_rng(k)
    gaps = np.concatenate([rng.geometric(0.1, size=500) - 1, [0, largest_gap, 5]]).astype(np.uint64)
    rng.shuffle(gaps)
    flat_indices = np.cumsum(gaps + np.uint64(1)) - np.uint64(1)
    count = int(flat_indices[-1]) + 1 + int(rng.integers(0, 50))
    remainders = gaps & np.uint64((1 << k) - 1)
    planes = [((remainders >> np.uint64(8 * j)) & np.uint64(0xFF)).astype(np.uint8) for j in range(-(-k // 8))]
    quotients = naive_varints(gaps >> np.uint64(k))
    xor_bits = rng.integers(1, 1 << 16, size=gaps.size)
    payload = gaps_payload(gaps.size, k, quotients, b"".join(p.tobytes() for p in planes), xor_bits)
    (change,) = codec.decode_delta_payload(payload, (codec.TensorSpec(name="w", shape=(count,)),))
    np.testing.assert_array_equal(change.flat_indices, flat_indices.astype(np.int64))
    np.testing.assert_array_equal(change.xor_bits, xor_bits)
    too_short = (codec.TensorSpec(name="w", shape=(int(flat_indices[-1]),)),)
    with pytest.raises(MalformedPayloadError, match="past the tensor"):
        codec.decode_delta_payload(payload, too_short)


def test_delta_needs_matching_layouts():
    rng = np.random.default_rng(5)
    base = random_bf16_state(rng, SHAPES)
    new = {**base, "extra": np.zeros(3, dtype=np.uint16)}
    with pytest.raises(StateLayoutError, match="missing"):
        codec.delta_sections(base, new)
