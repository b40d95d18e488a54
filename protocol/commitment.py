"""The activation commitment (TOPLOC-style; see DESIGN.md, "Activation commitment").

Completion token j was sampled from logits computed from a final hidden state h_j (the last
decoder layer's output after the final norm, at the position that predicts token j). The states
of tokens 32c .. 32c+31 form chunk c: a [num_tokens_in_chunk, hidden_size] array in bf16,
flattened row-major. Of its values, the 128 largest in magnitude (ties: lower flat index first) are
committed as points (x = flat index, y = the value's bf16 bits) of the interpolating polynomial
over GF(65497):

    proof = modulus (2 bytes, big-endian) || 128 coefficients, lowest degree first (2 bytes each)

with x reduced modulo `modulus`, the largest integer <= 65497 that keeps the 128 indices distinct.
That is 258 bytes a chunk; a commitment is the chunks' proofs concatenated. A chunk with fewer than
128 values (a last chunk of a model with a hidden size below 128 * 32 / num_tokens) commits all of
them and is shorter. This is byte for byte the encoding of the `toploc` 0.1.6 package (build_proofs_
bytes with skip_prefill=True, decode_batching_size=32, topk=128) on the same bf16 states; the
interpolating polynomial of degree < 128 is unique, so any exact interpolation gives its bytes.

Verification re-selects the top-128 of the validator's own states, evaluates the committed
polynomial there, and compares bf16 exponents (count of mismatches) and, where exponents agree,
7-bit mantissas (mean and upper median of |difference|), as toploc does.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from statistics import NormalDist

import numpy as np

CHUNK_TOKENS = 32
TOP_K = 128
FIELD_PRIME = 65497
PROOF_HEADER_BYTES = 2
PROOF_BYTES = PROOF_HEADER_BYTES + 2 * TOP_K

BF16_EXPONENT_MASK = 0x7F80
BF16_MANTISSA_MASK = 0x007F
BF16_MAGNITUDE_MASK = 0x7FFF
NO_MANTISSA_MATCH = float(2**64)

# Thresholds, all "errors": a chunk passes when every statistic is at or below its maximum.
# Set from measurements on the torch engine (random-init Qwen2 models, hidden 64-128, 2-4 layers;
# decode vs prefill, batch sizes 1-32, 1-2 threads): an honest fp32 rollout replayed in fp32 shows
# at most 0 exponent mismatches, mean 0.008, median 0 in every chunk; honest bf16 at most 7
# mismatches, mean 2.9, median 1 (of 128 points). The bounds leave room above the bf16 worst case
# and sit far below the TOPLOC authors' cross-GPU thresholds (90 / 10 / 8), which a CPU validator
# of CPU nodes does not need; a GPU engine validated on another stack may need theirs (pass a
# Thresholds).
MAX_EXPONENT_MISMATCHES = 12
MAX_MANTISSA_ERROR_MEAN = 4.0
MAX_MANTISSA_ERROR_MEDIAN = 2.0
# A systematic deviation too small to push one chunk over its bounds (a bf16 -> fp16 precision
# swap, weights scaled by 1.01) shows in statistics pooled over many chunks, e.g. the verified
# rollouts of one submission. Measured over ~38 chunks: honest bf16 <= 1.7 exponent mismatches per
# chunk and pooled mantissa error <= 0.37; a precision swap 5.3-5.7 and 1.3; one layer scaled by
# 1.01 in bf16 3.5 and 0.89. Fewer than MIN_POOLED_CHUNKS chunks are too few to judge.
MAX_POOLED_EXPONENT_MISMATCHES = 3.0
MAX_POOLED_MANTISSA_ERROR_MEAN = 0.75
MIN_POOLED_CHUNKS = 16
# No strike on thin evidence. Honest exponent mismatches are rare events (a last-bit difference that
# crosses a power of two, a swap at the top-k cut), so a pool's count is held against a Poisson law at
# an honest rate per chunk above any measured: a pool over its bound fails (a strike) only where an
# honest node reaches that count with probability at most MAX_FALSE_POSITIVE_RATE; over its bound but
# likelier than that, it is doubt, answered by more checks of the node (see PooledCheck.judge).
# Measured honest rates: fp32 0 mismatches in 2256 chunks, and once 2 in 8 (0.25 a chunk, on the
# default path); bf16 at most 1.7 a chunk over ~38 chunks.
HONEST_EXPONENT_MISMATCHES = 1.7
MAX_FALSE_POSITIVE_RATE = 1e-6
# Where many magnitudes crowd at the top-k cut (a feature with about the same value at every token of
# a chunk: seen as four-way bf16 ties at the cut), a last-bit difference between node and validator
# swaps which of them make the top k, and the validator then reads the node's polynomial at an index
# the node never committed: a random value, counted as an exponent mismatch (seen: 4 in 8 chunks of an
# honest fp32 node, every other point bit-exact). Points the validator selects within BOUNDARY_ULPS of
# the largest magnitude it leaves out may be such swaps, so they are not scored: 2 ulps each way,
# the most an honest value moves in fp32 (at most 1) and well beyond bf16's usual difference.
BOUNDARY_ULPS = 4
NO_CUT = -1


class CommitmentError(ValueError):
    """A commitment that cannot be decoded or does not fit the completion it claims to cover."""


@dataclass(frozen=True)
class Thresholds:
    max_exponent_mismatches: int = MAX_EXPONENT_MISMATCHES
    max_mantissa_error_mean: float = MAX_MANTISSA_ERROR_MEAN
    max_mantissa_error_median: float = MAX_MANTISSA_ERROR_MEDIAN
    max_pooled_exponent_mismatches: float = MAX_POOLED_EXPONENT_MISMATCHES
    max_pooled_mantissa_error_mean: float = MAX_POOLED_MANTISSA_ERROR_MEAN
    min_pooled_chunks: int = MIN_POOLED_CHUNKS
    honest_exponent_mismatches: float = HONEST_EXPONENT_MISMATCHES
    max_false_positive_rate: float = MAX_FALSE_POSITIVE_RATE
    # The per-chunk bounds of a short chunk widen by its ChunkCheck.bound_scale (short_chunk_scale).
    scale_short_chunks: bool = True


@dataclass(frozen=True)
class ChunkProof:
    modulus: int
    coefficients: tuple[int, ...]

    def to_bytes(self) -> bytes:
        words = np.array((self.modulus, *self.coefficients), dtype=">u2")
        return words.tobytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> ChunkProof:
        if len(data) < PROOF_HEADER_BYTES + 2 or len(data) % 2:
            raise CommitmentError(f"a chunk proof is 2 + 2n bytes with n >= 1, got {len(data)} bytes")
        words = np.frombuffer(data, dtype=">u2").astype(np.int64)
        modulus = int(words[0])
        if not 0 < modulus <= FIELD_PRIME:
            raise CommitmentError(f"chunk proof modulus {modulus} outside (0, {FIELD_PRIME}]")
        return cls(modulus, tuple(int(c) for c in words[1:]))


# The worst honest complete chunk seen (one bf16 token on another attention kernel): 13 of 128
# exponents flipped, mantissa mean 9.1. A garbage commitment flips nearly every exponent.
COMPLETE_CHUNK_MAX_EXPONENT_MISMATCH_FRACTION = 0.25
COMPLETE_CHUNK_MAX_MANTISSA_ERROR_MEAN = 24.0


def _exponential_integral(x: float) -> float:
    """E1(x) = integral from x to infinity of e^-u / u du, for 0 < x <= 50 (its power series)."""
    terms = [-0.5772156649015329 - math.log(x)]
    term = 1.0
    for k in range(1, 400):
        term *= -x / k
        terms.append(-term / k)
        if abs(term) < 1e-17 * abs(terms[0]) and k > x:
            break
    return math.fsum(terms)


def _mean_inverse_magnitude_above(top_fraction: float) -> float:
    """E[1 / |Z| given |Z| > t] for a standard normal Z and the t with P(|Z| > t) = top_fraction:
    2 * integral from t of phi(z) / z dz = E1(t^2 / 2) / sqrt(2 pi), over top_fraction."""
    t = NormalDist().inv_cdf(1.0 - top_fraction / 2.0)
    return _exponential_integral(t * t / 2.0) / math.sqrt(2.0 * math.pi) / top_fraction


@cache
def short_chunk_scale(num_tokens: int, hidden_size: int) -> float:
    """How much larger an honest chunk's errors are expected to be with num_tokens tokens than with
    CHUNK_TOKENS, at this hidden size (1 for a full chunk, or one that commits every value it holds:
    ChunkCheck.complete). Honest differences between kernels are last-bit differences of about the
    same absolute size at every value of a final hidden state, so measured in units of a value's own
    last place (what the mantissa error counts, and what flips an exponent near a power of two) they
    grow as 1 / |value|. A chunk commits its TOP_K largest magnitudes: of 32 x hidden_size values the
    top 3% at hidden size 128, of a 5-token chunk's the top 20%, which reach down to smaller values.
    With values distributed as a normal law (final norm), the expected error of the committed points
    is proportional to E[1 / |Z| : |Z| above the quantile of the top TOP_K / (num_tokens x
    hidden_size)], and the scale is its ratio to a full chunk's: 1.48 for 5 tokens at hidden size 128,
    1.23 for 10, 1.08 for 20, 1.18 for 5 at hidden size 4,096 (tests/unit/test_commitment.py checks it
    against simulated bf16 rounding)."""
    num_values, full_values = num_tokens * hidden_size, CHUNK_TOKENS * hidden_size
    if num_tokens >= CHUNK_TOKENS or num_values <= TOP_K:
        return 1.0
    return _mean_inverse_magnitude_above(TOP_K / num_values) / _mean_inverse_magnitude_above(
        min(1.0, TOP_K / full_values)
    )


@dataclass(frozen=True)
class ChunkCheck:
    exponent_mismatches: int
    mantissa_error_mean: float
    mantissa_error_median: float
    num_points: int
    # The chunk committed every value it holds (a short last chunk: one token of a model of hidden size
    # 128), its smallest too, whose bf16 exponents and mantissas flip on a last-bit difference of
    # another attention kernel (seen: 13 mismatches, mantissa mean 9.1 on an honest bf16 token). Its
    # bounds are no evidence enough to strike (coordinator/validation.py: check_rollout).
    complete: bool = False
    # short_chunk_scale of the chunk's size: a short chunk's per-chunk bounds are this much wider (seen:
    # an honest vLLM bf16 5-token chunk at mantissa mean 4.41 against the full chunk's 4.0).
    bound_scale: float = 1.0

    def bounds(self, thresholds: Thresholds) -> tuple[float, float, float]:
        """This chunk's bounds on its exponent mismatches, mantissa error mean and median: the
        thresholds', widened by bound_scale where they scale short chunks."""
        scale = self.bound_scale if thresholds.scale_short_chunks else 1.0
        return (
            thresholds.max_exponent_mismatches * scale,
            thresholds.max_mantissa_error_mean * scale,
            thresholds.max_mantissa_error_median * scale,
        )

    def passes(self, thresholds: Thresholds) -> bool:
        max_exponent_mismatches, max_mantissa_error_mean, max_mantissa_error_median = self.bounds(thresholds)
        return (
            self.exponent_mismatches <= max_exponent_mismatches
            and self.mantissa_error_mean <= max_mantissa_error_mean
            and self.mantissa_error_median <= max_mantissa_error_median
        )

    def within_last_bit_noise(self) -> bool:
        """A complete chunk whose errors an honest kernel difference can explain: past these bounds
        (about 2.5x the worst honest chunk seen) it is a forged or unrelated chunk, however short."""
        return (
            self.complete
            and self.exponent_mismatches <= COMPLETE_CHUNK_MAX_EXPONENT_MISMATCH_FRACTION * self.num_points
            and self.mantissa_error_mean <= COMPLETE_CHUNK_MAX_MANTISSA_ERROR_MEAN
        )


# When node and validator both compute in fp32 (the CPU demo), honest chunks agree almost exactly
# (measured: at most 0 exponent mismatches, mean 0.008, pooled 0.0 / 6e-5 over 2256 chunks), so far
# tighter bounds apply, pooled over as few as 8 chunks. They catch one layer scaled by 1.003
# (pooled 0.70 / 0.16 on layer 0; a later layer at 1.01 shows 0.25 / 0.11) where the bf16 defaults
# need 1.03 in fp32 compute.
# fp16 arithmetic on an fp32 node pools to 0.0-0.13 / 0.06 over a group, hence the 0.02 bound (300x
# the honest 6e-5).
# The honest fp32 rate is taken as 0.05 exponent mismatches a chunk (above the 2 in 8 chunks seen once):
# over 8 chunks a pool then fails at 7 mismatches or more (its mantissa bound still decides at once), over
# 64 at 16, over 256 at 34.
FP32_THRESHOLDS = Thresholds(
    max_exponent_mismatches=2,
    max_mantissa_error_mean=0.25,
    max_mantissa_error_median=1.0,
    max_pooled_exponent_mismatches=0.1,
    max_pooled_mantissa_error_mean=0.02,
    min_pooled_chunks=8,
    honest_exponent_mismatches=0.05,
    # Honest fp32 chunks stay ~30 times under these bounds at any size: no room needed for short ones,
    # and small numeric changes are caught 1.2-2 times past them.
    scale_short_chunks=False,
)


def thresholds_for(compute_dtype: str) -> Thresholds:
    """Thresholds for a validator and nodes computing in this dtype ("float32", "bfloat16")."""
    return FP32_THRESHOLDS if compute_dtype == "float32" else Thresholds()


def bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns (uint16), round to nearest even, as torch's .to(bfloat16)."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounding = ((bits >> np.uint64(16)) & np.uint64(1)) + np.uint64(0x7FFF)
    rounded = ((bits + rounding) >> np.uint64(16)).astype(np.uint16)
    is_nan = np.isnan(values)
    return np.where(is_nan, ((bits >> np.uint64(16)) | np.uint64(0x40)).astype(np.uint16), rounded)


def top_indices(flat_bits: np.ndarray, num_points: int) -> np.ndarray:
    """Flat indices of the num_points largest magnitudes, ties to the lower index (int64)."""
    magnitude = flat_bits.astype(np.int64) & BF16_MAGNITUDE_MASK
    order = np.lexsort((np.arange(flat_bits.size), -magnitude))
    return order[:num_points].astype(np.int64)


def injective_modulus(x: np.ndarray) -> int:
    for modulus in range(FIELD_PRIME, 0, -1):
        if np.unique(x % modulus).size == x.size:
            return modulus
    raise AssertionError("modulus 1 is injective on a single point")


@cache
def _field_inverses() -> np.ndarray:
    """inverse[a] = a^(p-2) mod p for a in [0, p) (inverse[0] = 0, never used)."""
    base = np.arange(FIELD_PRIME, dtype=np.int64)
    result = np.ones(FIELD_PRIME, dtype=np.int64)
    exponent = FIELD_PRIME - 2
    while exponent:
        if exponent & 1:
            result = result * base % FIELD_PRIME
        base = base * base % FIELD_PRIME
        exponent >>= 1
    return result


def interpolate(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Coefficients (lowest degree first) of the polynomials through rows of points (x, y), over
    GF(FIELD_PRIME); x, y: int64 [rows, n] with distinct x per row, all in [0, FIELD_PRIME)."""
    # One reduction per step where int64 holds the unreduced value: a product of two field
    # elements is below 2^32, and the 128 terms summed into a coefficient below 2^39.
    inverses = _field_inverses()
    num_points = x.shape[1]
    divided = y % FIELD_PRIME
    for order in range(1, num_points):
        denominator = (x[:, order:] - x[:, :-order]) % FIELD_PRIME
        difference = divided[:, order:] - divided[:, order - 1 : -1]
        divided[:, order:] = difference * inverses[denominator] % FIELD_PRIME
    coefficients = np.zeros_like(divided)
    newton_basis = np.zeros_like(divided)  # prod_{j < i} (t - x_j): degree i, columns i + 1.. are 0
    newton_basis[:, 0] = 1
    negated_x = -x % FIELD_PRIME
    for i in range(num_points):
        coefficients[:, : i + 1] += divided[:, i : i + 1] * newton_basis[:, : i + 1]
        if i + 1 < num_points:
            shifted = negated_x[:, i : i + 1] * newton_basis[:, : i + 2]
            shifted[:, 1:] += newton_basis[:, : i + 1]
            newton_basis[:, : i + 2] = shifted % FIELD_PRIME
    return coefficients % FIELD_PRIME


def evaluate(coefficients: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Horner evaluation of one polynomial at points x (int64), over GF(FIELD_PRIME)."""
    result = np.full(x.shape, coefficients[-1], dtype=np.int64)
    for coefficient in coefficients[-2::-1]:
        result = (result * x + coefficient) % FIELD_PRIME
    return result


def proofs_from_points(indices: np.ndarray, values: np.ndarray) -> list[bytes]:
    """Proof bytes for rows of committed points: indices (flat, int64) and bf16 bits, [rows, n]."""
    indices = np.asarray(indices, dtype=np.int64)
    moduli = np.array([injective_modulus(row) for row in indices], dtype=np.int64)
    coefficients = interpolate(indices % moduli[:, None], np.asarray(values, dtype=np.int64))
    # Each row as ChunkProof(modulus, coefficients).to_bytes() writes it, all rows at once.
    words = np.concatenate([moduli[:, None], coefficients], axis=1).astype(">u2")
    return [row.tobytes() for row in words]


def chunk_bounds(num_tokens: int) -> list[tuple[int, int]]:
    return [(start, min(start + CHUNK_TOKENS, num_tokens)) for start in range(0, num_tokens, CHUNK_TOKENS)]


def commit(hidden_bits: np.ndarray) -> bytes:
    """The commitment of a completion's final hidden states, bf16 bits [num_tokens, hidden_size]."""
    hidden_bits = _as_hidden_bits(hidden_bits)
    proofs = []
    for start, end in chunk_bounds(hidden_bits.shape[0]):
        flat = hidden_bits[start:end].reshape(-1)
        indices = top_indices(flat, min(TOP_K, flat.size))
        proofs.extend(proofs_from_points(indices[None, :], flat[indices][None, :]))
    return b"".join(proofs)


def split_proofs(commitment: bytes, num_tokens: int, hidden_size: int) -> list[ChunkProof]:
    """Decode a commitment that claims to cover num_tokens tokens of a model of this hidden size."""
    proofs = []
    offset = 0
    for start, end in chunk_bounds(num_tokens):
        size = PROOF_HEADER_BYTES + 2 * min(TOP_K, (end - start) * hidden_size)
        proofs.append(ChunkProof.from_bytes(commitment[offset : offset + size]))
        offset += size
    if offset != len(commitment):
        raise CommitmentError(
            f"commitment has {len(commitment)} bytes; {num_tokens} tokens of hidden size {hidden_size} need {offset}"
        )
    return proofs


def _as_hidden_bits(hidden_bits: np.ndarray) -> np.ndarray:
    hidden_bits = np.asarray(hidden_bits)
    if hidden_bits.dtype != np.uint16 or hidden_bits.ndim != 2:
        raise CommitmentError(
            f"hidden states must be bf16 bits, uint16 [num_tokens, hidden_size]; got "
            f"{hidden_bits.dtype} {hidden_bits.shape}"
        )
    return hidden_bits


def check_chunk(proof: ChunkProof, flat_bits: np.ndarray, num_tokens: int = CHUNK_TOKENS) -> ChunkCheck:
    """The validator's check of one chunk of num_tokens tokens against its recomputed flat bf16 bits:
    its own top points, less those at the cut (BOUNDARY_ULPS), read from the node's polynomial. The
    reference of check_points."""
    scale = short_chunk_scale(num_tokens, flat_bits.size // num_tokens)
    num_points = len(proof.coefficients)
    candidates = top_indices(flat_bits, num_points + 1)
    indices = candidates[:num_points]
    magnitudes = flat_bits.astype(np.int64) & BF16_MAGNITUDE_MASK
    if candidates.size > num_points:
        indices = indices[magnitudes[indices] > magnitudes[candidates[num_points]] + BOUNDARY_ULPS]
    complete = candidates.size <= num_points
    if indices.size == 0:
        return ChunkCheck(0, 0.0, 0.0, 0, complete, scale)
    committed = evaluate(np.array(proof.coefficients, dtype=np.int64), indices % proof.modulus)
    recomputed = flat_bits[indices].astype(np.int64)
    exponents_match = (committed & BF16_EXPONENT_MASK) == (recomputed & BF16_EXPONENT_MASK)
    mantissa_errors = np.abs((committed & BF16_MANTISSA_MASK) - (recomputed & BF16_MANTISSA_MASK))
    matched_errors = np.sort(mantissa_errors[exponents_match])
    if matched_errors.size == 0:
        return ChunkCheck(indices.size, NO_MANTISSA_MATCH, NO_MANTISSA_MATCH, indices.size, complete, scale)
    return ChunkCheck(
        int(indices.size - exponents_match.sum()),
        float(matched_errors.mean()),
        float(matched_errors[matched_errors.size // 2]),
        int(indices.size),
        complete,
        scale,
    )


def check_points(
    proofs: Sequence[ChunkProof],
    indices: np.ndarray,
    recomputed: np.ndarray,
    cut_magnitudes: np.ndarray,
    num_tokens: Sequence[int] | None = None,
    hidden_size: int = 0,
) -> list[ChunkCheck]:
    """The checks of many chunks at once, each with the points the validator selected from its own
    states as top_indices does: flat indices and their bf16 bits, [chunks, n] with n the number of
    coefficients of every proof; and per chunk the magnitude bits of the largest value it left out
    (NO_CUT when it left none out). Points within BOUNDARY_ULPS of that cut are not scored. With the
    chunks' token counts and the hidden size, each check carries its short_chunk_scale."""
    indices = np.asarray(indices, dtype=np.int64)
    recomputed = np.asarray(recomputed, dtype=np.int64)
    num_chunks, num_points = indices.shape
    if num_chunks == 0:
        return []
    coefficients = np.array([proof.coefficients for proof in proofs], dtype=np.int64)
    assert coefficients.shape == indices.shape, "a proof per chunk, a coefficient per point"
    cuts = np.asarray(cut_magnitudes, dtype=np.int64)[:, None]
    scored = (cuts == NO_CUT) | ((recomputed & BF16_MAGNITUDE_MASK) > cuts + BOUNDARY_ULPS)
    x = indices % np.array([proof.modulus for proof in proofs], dtype=np.int64)[:, None]
    committed = np.repeat(coefficients[:, -1:], num_points, axis=1)
    for degree in range(num_points - 2, -1, -1):
        committed = (committed * x + coefficients[:, degree : degree + 1]) % FIELD_PRIME
    exponents_match = (committed & BF16_EXPONENT_MASK) == (recomputed & BF16_EXPONENT_MASK)
    matched = exponents_match & scored
    mantissa_errors = np.abs((committed & BF16_MANTISSA_MASK) - (recomputed & BF16_MANTISSA_MASK))
    num_scored = scored.sum(axis=1)
    num_matched = matched.sum(axis=1)
    matched_sorted = np.sort(np.where(matched, mantissa_errors, np.iinfo(np.int64).max), axis=1)
    sums = np.where(matched, mantissa_errors, 0).sum(axis=1)
    medians = matched_sorted[np.arange(num_chunks), np.minimum(num_matched // 2, num_points - 1)]
    scales = [1.0] * num_chunks if num_tokens is None else [short_chunk_scale(int(n), hidden_size) for n in num_tokens]
    checks = []
    for scored_count, matched_count, total, median, cut, scale in zip(
        num_scored, num_matched, sums, medians, cuts[:, 0], scales, strict=True
    ):
        complete = bool(cut == NO_CUT)
        if matched_count:
            checks.append(
                ChunkCheck(
                    int(scored_count - matched_count),
                    float(total) / int(matched_count),
                    float(median),
                    int(scored_count),
                    complete,
                    scale,
                )
            )
        elif scored_count:
            checks.append(
                ChunkCheck(int(scored_count), NO_MANTISSA_MATCH, NO_MANTISSA_MATCH, int(scored_count), complete, scale)
            )
        else:
            checks.append(ChunkCheck(0, 0.0, 0.0, 0, complete, scale))
    return checks


def verify(commitment: bytes, hidden_bits: np.ndarray) -> list[ChunkCheck]:
    """Check a commitment against recomputed final hidden states (bf16 bits [num_tokens, hidden])."""
    hidden_bits = _as_hidden_bits(hidden_bits)
    num_tokens, hidden_size = hidden_bits.shape
    proofs = split_proofs(commitment, num_tokens, hidden_size)
    return [
        check_chunk(proof, hidden_bits[start:end].reshape(-1), end - start)
        for proof, (start, end) in zip(proofs, chunk_bounds(num_tokens), strict=False)
    ]


def accepts(checks: Sequence[ChunkCheck], thresholds: Thresholds = Thresholds()) -> bool:
    """Every chunk within the per-chunk bounds (the check of one rollout)."""
    return all(check.passes(thresholds) for check in checks)


class PoolVerdict(enum.StrEnum):
    PASS = "pass"
    DOUBT = "doubt"  # over a bound on too little evidence: check the node more, no strike
    FAIL = "fail"


def poisson_tail(count: int, mean: float) -> float:
    """P(X >= count) for X ~ Poisson(mean): above the mean summed upward term by term, below it as one
    minus the lower tail (each term in log space: no underflow at large means)."""
    if count <= 0:
        return 1.0
    if mean <= 0.0:
        return 0.0

    def term(k: int) -> float:
        return math.exp(k * math.log(mean) - mean - math.lgamma(k + 1))

    if count <= mean:
        return max(0.0, 1.0 - math.fsum(term(k) for k in range(count)))
    total, k = 0.0, count
    while (current := term(k)) > 1e-18 * total:
        total += current
        k += 1
    return min(1.0, total)


@dataclass(frozen=True)
class PooledCheck:
    num_chunks: int
    exponent_mismatches_per_chunk: float
    mantissa_error_mean: float  # over every exponent-matching point of every chunk

    @property
    def exponent_mismatches(self) -> int:
        return round(self.exponent_mismatches_per_chunk * self.num_chunks)

    def passes(self, thresholds: Thresholds) -> bool:
        """Too few chunks pass: they are no evidence of a systematic deviation. One exponent
        mismatch in the whole pool is always tolerated: an honest value lying on a power of two
        flips its exponent on a last-bit difference (seen once in fp32, mantissa error 0), and a
        deviation the pool is meant to catch moves many."""
        allowed_mismatches = max(1.0, thresholds.max_pooled_exponent_mismatches * self.num_chunks)
        return self.num_chunks < thresholds.min_pooled_chunks or (
            self.exponent_mismatches <= allowed_mismatches
            and self.mantissa_error_mean <= thresholds.max_pooled_mantissa_error_mean
        )

    def judge(self, thresholds: Thresholds) -> PoolVerdict:
        """PASS within the bounds; FAIL over them on enough evidence: the mantissa error over at
        least min_pooled_chunks chunks, or an exponent-mismatch count an honest node reaches with
        probability at most max_false_positive_rate (Poisson at the honest rate); DOUBT otherwise."""
        if self.passes(thresholds):
            return PoolVerdict.PASS
        if self.mantissa_error_mean > thresholds.max_pooled_mantissa_error_mean:
            return PoolVerdict.FAIL
        honest_mean = thresholds.honest_exponent_mismatches * self.num_chunks
        if poisson_tail(self.exponent_mismatches, honest_mean) <= thresholds.max_false_positive_rate:
            return PoolVerdict.FAIL
        return PoolVerdict.DOUBT

    @classmethod
    def from_sums(
        cls, num_chunks: int, exponent_mismatches: int, mantissa_error_sum: float, num_matched: int
    ) -> PooledCheck:
        """From sums over the chunks: the mantissa error over the points whose exponents matched."""
        return cls(
            num_chunks=num_chunks,
            exponent_mismatches_per_chunk=exponent_mismatches / num_chunks if num_chunks else 0.0,
            mantissa_error_mean=mantissa_error_sum / num_matched if num_matched else 0.0,
        )


def pool(checks: Sequence[ChunkCheck]) -> PooledCheck:
    """Statistics of many chunks together (e.g. all verified rollouts of a submission)."""
    num_matched = [c.num_points - c.exponent_mismatches for c in checks]
    return PooledCheck.from_sums(
        len(checks),
        sum(c.exponent_mismatches for c in checks),
        sum(c.mantissa_error_mean * n for c, n in zip(checks, num_matched, strict=True) if n),
        sum(num_matched),
    )
