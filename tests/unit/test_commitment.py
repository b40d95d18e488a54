"""The activation commitment (protocol/commitment.py)."""

import dataclasses
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from protocol import commitment

VECTORS = json.loads((Path(__file__).parent.parent / "vectors" / "commitment.json").read_text())
P = commitment.FIELD_PRIME


def test_vectors():
    for case in VECTORS["commit"]:
        bits = np.array(case["hidden_bf16_bits"], dtype=np.uint16).reshape(case["num_tokens"], case["hidden_size"])
        assert commitment.commit(bits).hex() == case["commitment_hex"]
        checks = commitment.verify(commitment.commit(bits), bits)
        assert all(
            (c.exponent_mismatches, c.mantissa_error_mean, c.mantissa_error_median) == (0, 0.0, 0.0) for c in checks
        )
    points = VECTORS["points"]
    proof = commitment.proofs_from_points(np.array([points["indices"]]), np.array([points["bf16_bits"]]))[0]
    assert proof.hex() == points["proof_hex"]
    assert commitment.ChunkProof.from_bytes(proof).modulus < P  # indices up to 2**22 need a search


def test_proofs_of_many_rows_are_each_rows_chunk_proof():
    rng = np.random.default_rng(4)
    indices = np.stack([rng.choice(4096, 128, replace=False) for _ in range(5)])
    values = rng.integers(0, 2**16, (5, 128))
    for row, proof in enumerate(commitment.proofs_from_points(indices, values)):
        expected = commitment.proofs_from_points(indices[row : row + 1], values[row : row + 1])[0]
        decoded = commitment.ChunkProof.from_bytes(proof)
        assert proof == expected == commitment.ChunkProof(decoded.modulus, decoded.coefficients).to_bytes()
        assert decoded.coefficients == tuple(
            naive_interpolate([int(i) % decoded.modulus for i in indices[row]], [int(v) for v in values[row]])
        )


def naive_interpolate(x: list[int], y: list[int]) -> list[int]:
    """Lagrange interpolation over GF(P) with Python integers."""
    coefficients = [0] * len(x)
    for i, (xi, yi) in enumerate(zip(x, y, strict=True)):
        basis = [1]
        denominator = 1
        for j, xj in enumerate(x):
            if j != i:
                basis = [
                    ((basis[k - 1] if k else 0) - xj * (basis[k] if k < len(basis) else 0)) % P
                    for k in range(len(basis) + 1)
                ]
                denominator = denominator * (xi - xj) % P
        scale = yi * pow(denominator, P - 2, P) % P
        coefficients = [(c + scale * b) % P for c, b in zip(coefficients, basis, strict=True)]
    return coefficients


def test_interpolation_matches_lagrange_and_evaluates_back():
    rng = random.Random(0)
    for num_points in (1, 2, 7, 40):
        x = rng.sample(range(P), num_points)
        y = [rng.randrange(65536) for _ in range(num_points)]
        coefficients = commitment.interpolate(np.array([x]), np.array([y]))[0]
        assert coefficients.tolist() == naive_interpolate(x, [v % P for v in y])
        np.testing.assert_array_equal(commitment.evaluate(coefficients, np.array(x)), np.array(y) % P)


def test_batched_interpolation_equals_row_by_row():
    rng = np.random.default_rng(1)
    x = np.stack([rng.choice(P, 128, replace=False) for _ in range(5)])
    y = rng.integers(0, 65536, (5, 128))
    batched = commitment.interpolate(x, y)
    for row in range(5):
        np.testing.assert_array_equal(batched[row], commitment.interpolate(x[row : row + 1], y[row : row + 1])[0])


def random_hidden_bits(num_tokens: int, hidden_size: int, seed: int = 0) -> np.ndarray:
    values = np.random.default_rng(seed).standard_normal((num_tokens, hidden_size)).astype(np.float32)
    return commitment.bf16_bits(values)


def test_proof_layout_and_roundtrip():
    bits = random_hidden_bits(70, 64)
    data = commitment.commit(bits)
    assert len(data) == 2 * commitment.PROOF_BYTES + 2 + 2 * 128  # chunks of 32, 32 and 6 tokens
    proofs = commitment.split_proofs(data, 70, 64)
    assert [len(p.coefficients) for p in proofs] == [128, 128, 128]
    assert b"".join(p.to_bytes() for p in proofs) == data
    assert proofs[0].modulus == P and data[:2] == P.to_bytes(2, "big")
    short = commitment.commit(random_hidden_bits(1, 64))
    assert len(short) == 2 + 2 * 64  # a chunk with fewer than 128 values commits all of them


def test_top_indices_break_magnitude_ties_by_lower_index():
    flat = commitment.bf16_bits(np.array([1.0, -3.0, 2.0, 3.0, -2.0, 2.0, 0.5], dtype=np.float32))
    assert commitment.top_indices(flat, 4).tolist() == [1, 3, 2, 4]


def test_bf16_bits_match_torch_rounding():
    rng = np.random.default_rng(2)
    values = np.concatenate(
        [
            rng.standard_normal(100_000).astype(np.float32) * 10,
            np.array([0.0, -0.0, np.inf, -np.inf, 1e-40, 3.0e38, 1.00390625, 1.01171875], dtype=np.float32),
        ]
    )
    expected = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(commitment.bf16_bits(values), expected)


def test_verify_measures_drift_and_rejects_other_states():
    bits = random_hidden_bits(64, 64)
    data = commitment.commit(bits)
    honest = commitment.verify(data, bits)
    assert all(c.exponent_mismatches == 0 and c.mantissa_error_mean == 0.0 for c in honest)
    assert all(100 <= c.num_points < 128 for c in honest)  # points at the cut are not scored
    assert commitment.accepts(honest)
    values = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    one_ulp = commitment.verify(data, commitment.bf16_bits(values * (1 + 2**-8)))
    assert commitment.accepts(one_ulp)
    assert all(c.mantissa_error_mean <= 1.0 for c in one_ulp)
    other = commitment.verify(data, random_hidden_bits(64, 64, seed=1))
    assert not any(c.passes(commitment.Thresholds()) for c in other)


def test_a_swap_at_the_top_k_cut_is_not_scored():
    """A value at the cut that the node rounds just below the largest left-out value and the
    validator just above it: each picks a different top 128, and the validator reads the node's
    polynomial at an index the node never committed. Not scored, it costs nothing; every other
    point is still checked exactly."""
    validator_bits = random_hidden_bits(8, 64).reshape(-1)
    ranked = commitment.top_indices(validator_bits, 129)
    last_in, first_out = ranked[127], ranked[128]
    cut = int(validator_bits[first_out]) & commitment.BF16_MAGNITUDE_MASK
    node_bits = validator_bits.copy()
    node_bits[last_in] = (validator_bits[last_in] & 0x8000) | (cut - 1)
    validator_bits[last_in] = (validator_bits[last_in] & 0x8000) | (cut + 1)
    assert last_in not in commitment.top_indices(node_bits, 128)
    proof = commitment.split_proofs(commitment.commit(node_bits.reshape(8, 64)), 8, 64)[0]
    check = commitment.check_chunk(proof, validator_bits)
    assert check.exponent_mismatches == 0 and check.mantissa_error_mean == 0.0 and check.num_points < 128
    tampered = node_bits.copy()
    tampered[ranked[0]] ^= 0x0100  # a top value off by an exponent step: still caught
    tampered_proof = commitment.split_proofs(commitment.commit(tampered.reshape(8, 64)), 8, 64)[0]
    assert commitment.check_chunk(tampered_proof, validator_bits).exponent_mismatches == 1


def test_malformed_commitments_are_rejected():
    bits = random_hidden_bits(40, 64)
    data = commitment.commit(bits)
    for bad in (data[:-2], data + b"\x00\x00", b""):
        with pytest.raises(commitment.CommitmentError):
            commitment.verify(bad, bits)
    with pytest.raises(commitment.CommitmentError):
        commitment.verify(b"\x00\x00" + data[2:], bits)  # modulus 0
    with pytest.raises(commitment.CommitmentError):
        commitment.verify(data, bits.astype(np.int32))


def distinct_magnitude_states(num_tokens: int, hidden_size: int, seed: int) -> torch.Tensor:
    """bf16 states whose magnitudes are all different, so that the top-128 is unambiguous."""
    rng = np.random.default_rng(seed)
    magnitudes = rng.choice(np.arange(0x2000, 0x4800), num_tokens * hidden_size, replace=False)
    signs = rng.integers(0, 2, num_tokens * hidden_size) << 15
    bits = (magnitudes | signs).astype(np.uint16).reshape(num_tokens, hidden_size)
    return torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16)


def test_byte_compatible_with_toploc():
    toploc = pytest.importorskip("toploc")
    for num_tokens, hidden_size, seed in ((32, 64, 0), (75, 40, 1), (33, 200, 2)):
        states = distinct_magnitude_states(num_tokens, hidden_size, seed)
        bits = states.view(torch.int16).numpy().view(np.uint16)
        expected = toploc.build_proofs_bytes(
            [row for row in states], decode_batching_size=32, topk=128, skip_prefill=True
        )
        assert commitment.commit(bits) == b"".join(expected)
        for ulps in (1, 5):  # a uniform shift keeps magnitudes distinct; carries change exponents
            drifted_bits = bits + np.uint16(ulps)
            drifted = torch.from_numpy(drifted_bits.view(np.int16)).view(torch.bfloat16)
            toploc_checks = toploc.verify_proofs_bytes(
                drifted, expected, decode_batching_size=32, topk=128, skip_prefill=True
            )
            ours = commitment.verify(commitment.commit(bits), drifted_bits)
            assert [(c.exponent_mismatches, c.mantissa_error_mean, c.mantissa_error_median) for c in ours] == [
                (c.exp_mismatches, c.mant_err_mean, c.mant_err_median) for c in toploc_checks
            ]


def test_pooled_statistics_weigh_chunks_by_their_matched_points():
    checks = [
        commitment.ChunkCheck(8, 2.0, 2.0, 128),
        commitment.ChunkCheck(0, 0.5, 0.0, 120),
        commitment.ChunkCheck(4, 1.0, 1.0, 64),
    ]
    pooled = commitment.pool(checks)
    assert pooled.num_chunks == 3
    assert pooled.exponent_mismatches_per_chunk == 4.0
    assert pooled.mantissa_error_mean == (2.0 * 120 + 0.5 * 120 + 1.0 * 60) / 300
    thresholds = commitment.Thresholds(min_pooled_chunks=3)
    assert not pooled.passes(thresholds)
    assert pooled.passes(commitment.Thresholds(min_pooled_chunks=4))  # too few chunks to judge
    assert commitment.pool([commitment.ChunkCheck(1, 0.25, 0.0, 128)] * 20).passes(commitment.Thresholds())


def test_short_chunk_scale_follows_its_closed_form():
    """1 for a full chunk and for one that commits every value it holds; above 1 and falling with the
    chunk's size in between; E1 against a numerical integral."""
    assert commitment.short_chunk_scale(32, 128) == 1.0
    assert commitment.short_chunk_scale(1, 128) == 1.0  # complete: ChunkCheck.complete's own bounds
    scales = [commitment.short_chunk_scale(n, 128) for n in range(2, 33)]
    assert all(a > b for a, b in zip(scales, scales[1:-1], strict=False)) and scales[-1] == 1.0
    assert commitment.short_chunk_scale(5, 128) == pytest.approx(1.48, abs=0.01)
    assert commitment.short_chunk_scale(5, 4096) < commitment.short_chunk_scale(5, 128)
    u = np.linspace(math.log(0.3), math.log(60.0), 200_001)  # E1(x) = integral of e^-v / v dv from x
    assert commitment._exponential_integral(0.3) == pytest.approx(np.trapezoid(np.exp(-np.exp(u)), u), rel=1e-8)


def test_short_chunk_scale_predicts_the_honest_error_of_short_chunks():
    """Simulated honest drift: hidden states from a normal law at a random scale per chunk (real
    states spread over many binades), the validator's differing from the node's by noise of 5% of
    that scale, both rounded to bf16. The mean mantissa error of chunks of n tokens over that of full
    chunks is short_chunk_scale(n, hidden size) within 10% (exponent mismatches grow a little faster:
    1.8 times at 5 tokens, where their bound leaves room, 12 against 7 seen)."""
    rng = np.random.default_rng(0)
    hidden_size, num_chunks = 128, 120

    def mean_error(tokens: int) -> float:
        errors = []
        for _ in range(num_chunks):
            scale = np.float32(2.0 ** rng.uniform(0.0, 1.0))
            node = rng.standard_normal((tokens, hidden_size)).astype(np.float32) * scale
            validator = node + rng.standard_normal(node.shape).astype(np.float32) * np.float32(0.05) * scale
            (check,) = commitment.verify(commitment.commit(commitment.bf16_bits(node)), commitment.bf16_bits(validator))
            errors.append(check.mantissa_error_mean)
        return float(np.mean(errors))

    full = mean_error(commitment.CHUNK_TOKENS)
    for num_tokens in (3, 5, 10, 20):
        ratio = mean_error(num_tokens) / full
        assert ratio == pytest.approx(commitment.short_chunk_scale(num_tokens, hidden_size), rel=0.1), num_tokens


def test_a_short_chunk_is_held_to_wider_bounds_in_bf16_only():
    """Issue 16: an honest vLLM bf16 5-token chunk at mantissa mean 4.41 against 4.0."""
    scale = commitment.short_chunk_scale(5, 128)
    short = commitment.ChunkCheck(3, 4.41, 2.0, 128, bound_scale=scale)
    assert short.passes(commitment.Thresholds())
    assert not dataclasses.replace(short, bound_scale=1.0).passes(commitment.Thresholds())
    assert not commitment.ChunkCheck(3, 4.01 * scale, 2.0, 128, bound_scale=scale).passes(commitment.Thresholds())
    fp32 = commitment.FP32_THRESHOLDS
    assert not commitment.ChunkCheck(0, 1.2 * fp32.max_mantissa_error_mean, 0.0, 128, bound_scale=scale).passes(fp32)


def test_thresholds_by_compute_dtype():
    assert commitment.thresholds_for("bfloat16") == commitment.Thresholds()
    fp32 = commitment.thresholds_for("float32")
    assert fp32 == commitment.FP32_THRESHOLDS
    assert fp32.max_pooled_mantissa_error_mean < commitment.Thresholds().max_pooled_mantissa_error_mean


def test_check_points_equals_check_chunk_on_many_chunks():
    """The batched check (points selected by the caller as top_indices does) against the reference,
    on honest, drifted and unrelated states, with full and short chunks."""
    for num_tokens, hidden_size in ((70, 64), (33, 3)):
        bits = random_hidden_bits(num_tokens, hidden_size)
        proofs = commitment.split_proofs(commitment.commit(bits), num_tokens, hidden_size)
        for other in (bits, bits + np.uint16(1), random_hidden_bits(num_tokens, hidden_size, seed=3)):
            reference = commitment.verify(commitment.commit(bits), other)
            for size in {len(p.coefficients) for p in proofs}:
                chosen = [i for i, p in enumerate(proofs) if len(p.coefficients) == size]
                flats = [
                    other[start:end].reshape(-1)
                    for start, end in (commitment.chunk_bounds(num_tokens)[i] for i in chosen)
                ]
                candidates = [commitment.top_indices(flat, size + 1) for flat in flats]
                indices = np.stack([row[:size] for row in candidates])
                values = np.stack([flat[row] for flat, row in zip(flats, indices, strict=True)])
                cuts = np.array(
                    [
                        int(flat[row[size]]) & commitment.BF16_MAGNITUDE_MASK if row.size > size else commitment.NO_CUT
                        for flat, row in zip(flats, candidates, strict=True)
                    ]
                )
                bounds = commitment.chunk_bounds(num_tokens)
                batched = commitment.check_points(
                    [proofs[i] for i in chosen],
                    indices,
                    values,
                    cuts,
                    [bounds[i][1] - bounds[i][0] for i in chosen],
                    hidden_size,
                )
                assert batched == [reference[i] for i in chosen]


def test_pool_tolerates_one_exponent_flip_but_not_two():
    clean = commitment.ChunkCheck(0, 0.0, 0.0, 128)
    flipped = commitment.ChunkCheck(1, 0.0, 0.0, 128)
    for num_chunks in range(8, 12):
        one_flip = commitment.pool([flipped] + [clean] * (num_chunks - 1))
        two_flips = commitment.pool([flipped] * 2 + [clean] * (num_chunks - 2))
        assert one_flip.passes(commitment.FP32_THRESHOLDS)
        assert not two_flips.passes(commitment.FP32_THRESHOLDS)
        # over its bound, but an honest fp32 node shows two flips in 8 chunks (seen on the default
        # path): doubt, never a strike
        assert two_flips.judge(commitment.FP32_THRESHOLDS) is commitment.PoolVerdict.DOUBT


def _naive_poisson_tail(count: int, mean: float) -> float:
    return 1.0 - sum(math.exp(-mean) * mean**k / math.factorial(k) for k in range(count))


@pytest.mark.parametrize("mean", [0.0, 0.16, 0.4, 1.0, 3.2, 12.8, 27.2])
def test_poisson_tail_against_the_naive_sum(mean):
    for count in range(60):
        expected = _naive_poisson_tail(count, mean) if mean else float(count == 0)
        got = commitment.poisson_tail(count, mean)
        assert got == pytest.approx(expected, rel=1e-9, abs=1e-15), (count, mean)
    assert commitment.poisson_tail(539, 435.2) == pytest.approx(8.73e-7, rel=0.01)  # far tail, summed upward


def test_a_pool_fails_only_on_enough_evidence():
    """PASS within the bounds; over them, FAIL only where an honest node reaches the count with
    probability at most max_false_positive_rate (or its mantissa error is over its bound); DOUBT
    between."""
    fp32, bf16 = commitment.FP32_THRESHOLDS, commitment.Thresholds()

    def pool(num_chunks: int, mismatches: int, mantissa: float = 0.0) -> commitment.PooledCheck:
        return commitment.PooledCheck(num_chunks, mismatches / num_chunks, mantissa)

    assert pool(8, 1).judge(fp32) is commitment.PoolVerdict.PASS
    assert pool(8, 2).judge(fp32) is commitment.PoolVerdict.DOUBT  # the honest fp32 node of issue 16
    assert pool(8, 6).judge(fp32) is commitment.PoolVerdict.DOUBT
    assert pool(8, 7).judge(fp32) is commitment.PoolVerdict.FAIL
    assert pool(8, 0, mantissa=0.03).judge(fp32) is commitment.PoolVerdict.FAIL
    assert pool(4, 4, mantissa=0.5).judge(fp32) is commitment.PoolVerdict.PASS  # too few chunks to judge
    assert pool(64, 15).judge(fp32) is commitment.PoolVerdict.DOUBT
    assert pool(64, 16).judge(fp32) is commitment.PoolVerdict.FAIL
    assert pool(16, 48).judge(bf16) is commitment.PoolVerdict.PASS
    assert pool(16, 49).judge(bf16) is commitment.PoolVerdict.DOUBT
    assert pool(16, 56).judge(bf16) is commitment.PoolVerdict.FAIL
    assert pool(256, 769).judge(bf16) is commitment.PoolVerdict.FAIL  # 3.0 a chunk is far past 1.7
    for num_chunks in (8, 16, 64, 256):
        threshold = next(
            k
            for k in range(10_000)
            if commitment.poisson_tail(k, fp32.honest_exponent_mismatches * num_chunks) <= fp32.max_false_positive_rate
        )
        assert pool(num_chunks, max(threshold, 2)).judge(fp32) is commitment.PoolVerdict.FAIL
        assert pool(num_chunks, threshold - 1).judge(fp32) is not commitment.PoolVerdict.FAIL
