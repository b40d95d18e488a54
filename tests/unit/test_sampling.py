"""The seeded sampling rule, numpy reference (protocol/sampling.py)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from protocol import sampling as rule
from protocol.types import SamplingParams

VECTORS = json.loads((Path(__file__).parent.parent / "vectors" / "sampling.json").read_text())


def f32(bits: int) -> np.float32:
    return np.array([bits], dtype=np.uint32).view(np.float32)[0]


def test_vectors_derive_sample_seed():
    for case in VECTORS["derive_sample_seed"]:
        seed = rule.derive_sample_seed(case["lease_seed"], case["prompt_position"], case["sample_index"])
        assert seed == case["sample_seed"], case


def test_vectors_noise():
    for case in VECTORS["noise"]:
        bits = rule.noise_bits(
            np.array([case["seed"]], dtype=np.uint64), np.array([case["position"]]), VECTORS["vocab_size"]
        )
        assert bits[0].tolist() == case["noise_bits"]
        gumbel = rule.gumbel_from_bits(bits)[0]
        assert gumbel.view(np.uint32).tolist() == case["gumbel_f32_bits"]


def test_vectors_sample():
    for case in VECTORS["sample"]:
        logits = np.array(case["logits_f32_bits"], dtype=np.uint32).view(np.float32)
        params = SamplingParams(case["temperature"], case["top_k"], case["top_p"])
        sampled = rule.sample_tokens(logits[None], np.uint64(case["seed"]), case["position"], params)
        assert int(sampled.token_ids[0]) == case["token_id"], case["name"]
        assert sampled.logprobs.view(np.uint32)[0] == case["logprob_f32_bits"], case["name"]
        assert sampled.margins.view(np.uint32)[0] == case["margin_f32_bits"], case["name"]


def naive_mix32(x: int) -> int:
    x ^= x >> 16
    x = (x * rule.MIX_MULTIPLIER_1) % 2**32
    x ^= x >> 15
    x = (x * rule.MIX_MULTIPLIER_2) % 2**32
    return x ^ (x >> 15)


def naive_noise_bits(seed: int, position: int, token_id: int) -> int:
    key0 = naive_mix32(naive_mix32(naive_mix32((seed % 2**32) ^ rule.SEED_DOMAIN) ^ (seed >> 32)) ^ position)
    key1 = naive_mix32(key0 ^ rule.TOKEN_DOMAIN)
    return naive_mix32(naive_mix32(token_id ^ key1) ^ key0) >> 8


def test_noise_bits_match_python_integers():
    seeds = [0, 7, 2**63 + 5, 2**64 - 1]
    for seed in seeds:
        for position in (0, 1, 2**32 - 1):
            bits = rule.noise_bits(np.array([seed], dtype=np.uint64), np.array([position]), 50)[0]
            assert bits.tolist() == [naive_noise_bits(seed, position, t) for t in range(50)]


def test_noise_is_a_function_of_seed_position_token_only():
    seeds = np.array([3, 3, 9, 3], dtype=np.uint64)
    positions = np.array([0, 1, 0, 0])
    batch = rule.gumbel_noise(seeds, positions, 100)
    for row in range(4):
        alone = rule.gumbel_noise(seeds[row : row + 1], positions[row : row + 1], 100)
        np.testing.assert_array_equal(batch[row], alone[0])
    np.testing.assert_array_equal(batch[0], batch[3])
    assert not np.array_equal(batch[0], batch[1])
    assert not np.array_equal(batch[0], batch[2])


def test_gumbel_noise_statistics():
    noise = rule.gumbel_noise(np.arange(2000, dtype=np.uint64), np.zeros(2000, dtype=np.int64), 500)
    assert noise.dtype == np.float32
    assert abs(noise.mean() - 0.5772156649) < 0.01  # Euler-Mascheroni
    assert abs(noise.std() - math.pi / math.sqrt(6)) < 0.01
    bits = rule.noise_bits(np.arange(2000, dtype=np.uint64), np.ones(2000, dtype=np.int64), 500)
    counts = np.bincount((bits >> np.uint64(20)).ravel().astype(np.int64), minlength=16)
    expected = bits.size / 16
    chi_square = ((counts - expected) ** 2 / expected).sum()
    assert chi_square < 50  # 15 degrees of freedom: p < 1e-5 above 45


def test_sampled_frequencies_follow_softmax():
    logits = np.array([2.0, 1.0, 0.5, 0.0, -1.0, 3.0], dtype=np.float32)
    params = SamplingParams(temperature=0.8)
    num_draws = 20000
    sampled = rule.sample_tokens(np.broadcast_to(logits, (num_draws, 6)), np.uint64(42), np.arange(num_draws), params)
    frequencies = np.bincount(sampled.token_ids, minlength=6) / num_draws
    probs = np.exp(logits / 0.8) / np.exp(logits / 0.8).sum()
    np.testing.assert_allclose(frequencies, probs, atol=4 * np.sqrt(0.25 / num_draws))
    np.testing.assert_allclose(np.exp(sampled.logprobs), probs[sampled.token_ids], rtol=1e-5)


def test_greedy_is_argmax_with_lowest_id_on_ties():
    logits = np.array([[0.0, 5.0, 1.0, 5.0], [9.0, 1.0, 9.0, 2.0]], dtype=np.float32)
    sampled = rule.sample_tokens(logits, np.uint64(1), 0, SamplingParams(temperature=0.0))
    assert sampled.token_ids.tolist() == [1, 0]
    assert sampled.margins.tolist() == [0.0, 0.0]
    log_softmax = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    np.testing.assert_allclose(sampled.logprobs, log_softmax[[0, 1], [1, 0]], rtol=1e-6)


def test_top_k_keeps_every_token_tied_with_the_kth():
    logits = np.array([3.0, 2.0, 2.0, 1.0, 0.0], dtype=np.float32)
    threshold = rule.filter_threshold(logits[None], top_k=2, top_p=1.0)
    assert threshold.tolist() == [2.0]
    sampled = rule.sample_tokens(
        np.broadcast_to(logits, (3000, 5)), np.uint64(5), np.arange(3000), SamplingParams(temperature=1.0, top_k=2)
    )
    assert set(sampled.token_ids.tolist()) == {0, 1, 2}
    allowed = np.exp(logits[:3]) / np.exp(logits[:3]).sum()
    np.testing.assert_allclose(np.exp(sampled.logprobs), allowed[sampled.token_ids], rtol=1e-5)


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = np.log(probs).astype(np.float32)[None]
    assert rule.filter_threshold(logits, 0, 0.5)[0] == logits[0, 0]
    assert rule.filter_threshold(logits, 0, 0.79)[0] == logits[0, 1]
    assert rule.filter_threshold(logits, 0, 0.81)[0] == logits[0, 2]
    assert rule.filter_threshold(logits, 0, 0.999)[0] == logits[0, 3]
    assert rule.filter_threshold(logits, 2, 0.95)[0] == logits[0, 1]  # top-p over top-k survivors


def test_margin_is_gap_between_top_two_perturbed_scores():
    logits = np.random.default_rng(0).standard_normal((50, 30)).astype(np.float32)
    params = SamplingParams(temperature=0.9, top_k=10)
    sampled = rule.sample_tokens(logits, np.uint64(11), np.arange(50), params)
    scaled = logits * rule.inverse_temperature(0.9)
    scores = scaled + rule.gumbel_noise(np.full(50, 11, dtype=np.uint64), np.arange(50), 30)
    scores[scaled < rule.filter_threshold(scaled, 10, 1.0)[:, None]] = -np.inf
    top_two = np.sort(scores, axis=1)[:, -2:]
    np.testing.assert_array_equal(sampled.token_ids, scores.argmax(axis=1))
    np.testing.assert_array_equal(sampled.margins, top_two[:, 1] - top_two[:, 0])
    one_allowed = rule.sample_tokens(logits, np.uint64(11), np.arange(50), SamplingParams(1.0, top_k=1))
    assert np.isinf(one_allowed.margins).all()
    np.testing.assert_array_equal(one_allowed.token_ids, logits.argmax(axis=1))
    np.testing.assert_array_equal(one_allowed.logprobs, 0.0)


def test_derive_sample_seed_separates_inputs_and_checks_ranges():
    seeds = {
        rule.derive_sample_seed(lease, prompt, sample)
        for lease in (0, 1)
        for prompt in range(20)
        for sample in range(20)
    }
    assert len(seeds) == 800
    assert all(0 <= seed < 2**64 for seed in seeds)
    with pytest.raises(rule.SamplingParamsError):
        rule.derive_sample_seed(-1, 0, 0)
    with pytest.raises(rule.SamplingParamsError):
        rule.derive_sample_seed(0, 2**64, 0)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=-1.0),
        SamplingParams(top_k=-1),
        SamplingParams(top_p=0.0),
        SamplingParams(top_p=1.5),
        SamplingParams(temperature=float("nan")),
    ],
)
def test_invalid_params_are_rejected(params):
    with pytest.raises(rule.SamplingParamsError):
        rule.sample_tokens(np.zeros((1, 4), dtype=np.float32), np.uint64(0), 0, params)


def test_check_tokens_exact_near_tie_and_mismatch():
    rng = np.random.default_rng(3)
    params = SamplingParams(temperature=0.5)
    logits = rng.standard_normal((200, 40)).astype(np.float32)
    positions = np.arange(200)
    sampled = rule.sample_tokens(logits, np.uint64(8), positions, params)
    exact = rule.check_tokens(logits, sampled.token_ids, np.uint64(8), positions, params)
    assert (exact.verdicts == rule.TokenVerdict.EXACT).all()
    np.testing.assert_array_equal(exact.logprobs, sampled.logprobs)

    row = int(np.argmin(sampled.margins))  # the closest race: make the runner-up win by a hair
    scores = (
        logits[row] * rule.inverse_temperature(0.5)
        + rule.gumbel_noise(np.array([8], dtype=np.uint64), positions[row : row + 1], 40)[0]
    )
    runner_up = int(np.argsort(scores)[-2])
    for logit_shift, verdict in (
        (sampled.margins[row] * 0.5 + 0.01, rule.TokenVerdict.NEAR_TIE),
        (sampled.margins[row] * 0.5 + 0.5, rule.TokenVerdict.MISMATCH),
    ):
        validator_logits = logits.copy()
        validator_logits[row, runner_up] += logit_shift
        checks = rule.check_tokens(
            validator_logits, sampled.token_ids, np.uint64(8), positions, params, logit_tolerance=0.05
        )
        assert checks.verdicts[row] == verdict
        assert checks.num_near_ties + checks.num_mismatches == 1
        assert checks.score_gaps[row] > 0

    wrong = sampled.token_ids.copy()
    wrong[0] = int(np.argmin(logits[0]))
    checks = rule.check_tokens(logits, wrong, np.uint64(8), positions, params)
    assert checks.verdicts.tolist() == [rule.TokenVerdict.MISMATCH] + [rule.TokenVerdict.EXACT] * 199
    other_seed = rule.check_tokens(logits, sampled.token_ids, np.uint64(9), positions, params)
    assert other_seed.num_mismatches > 100


def test_replay_tolerances_by_compute_dtype():
    fp32 = rule.tolerances_for("float32")
    bf16 = rule.tolerances_for("bfloat16")
    assert bf16 == rule.ReplayTolerances(
        rule.DEFAULT_LOGIT_TOLERANCE, rule.MAX_LOGPROB_DRIFT, rule.BF16_DRIFT_DOUBT_FACTOR
    )
    assert fp32.logit_tolerance < bf16.logit_tolerance and fp32.max_logprob_drift < bf16.max_logprob_drift
    assert fp32.drift_doubt_factor == 1.0  # fp32 drift never came near its bound: no doubt band


def test_doubted_mismatches_are_those_just_past_the_tolerance():
    """A mismatch over the tolerance by at most DOUBT_GAP_FACTOR times it is doubted; one within the
    tolerance (cut by the node's filters) or past the factor is not; exact tokens and near-ties never."""
    tolerance = rule.score_tolerance(0.3, 0.7)
    assert tolerance == np.float32(np.float32(0.3) * rule.inverse_temperature(0.7))
    assert rule.score_tolerance(0.3, 0.0) == np.float32(0.3)
    V = rule.TokenVerdict
    gaps = np.array([0.0, 0.5, 0.5, 1.01, 2.9, 3.1], dtype=np.float32) * tolerance
    verdicts = np.array([V.EXACT, V.NEAR_TIE, V.MISMATCH, V.MISMATCH, V.MISMATCH, V.MISMATCH], dtype=np.int8)
    checks = rule.TokenChecks(verdicts, np.zeros(6, dtype=np.float32), gaps)
    assert rule.DOUBT_GAP_FACTOR == 3.0
    assert rule.doubted_mismatches(checks, tolerance).tolist() == [False, False, False, True, True, False]


DRIFT_PARAMS = (
    SamplingParams(1.0, top_k=5),
    SamplingParams(0.7, top_k=20),
    SamplingParams(1.0, top_p=0.9),
    SamplingParams(0.6, top_p=0.5),
    SamplingParams(0.9, top_k=20, top_p=0.7),
    SamplingParams(1.0),
    SamplingParams(0.0),
)


@pytest.mark.parametrize("params", DRIFT_PARAMS, ids=str)
def test_an_honest_claim_under_drift_within_tolerance_is_never_a_mismatch(params):
    """Honest tokens sampled from the node's logits, checked against validator logits that differ by
    up to half the tolerance each: never a mismatch, also where the drift moves a filter boundary
    and lets a token with large noise in on the validator's side only. A token the node's filters
    cut by more than the drift can explain is still a mismatch."""
    rng = np.random.default_rng(11)
    num_rows, vocab_size, logit_tolerance = 6000, 40, 0.3
    node_logits = (rng.standard_normal((num_rows, vocab_size)) * 2).astype(np.float32)
    # Ties and near-ties at the filter boundaries: many logits on a coarse grid.
    node_logits[::2] = np.round(node_logits[::2] * 4) / 4
    positions = np.arange(num_rows)
    claims = rule.sample_tokens(node_logits, np.uint64(3), positions, params).token_ids
    drift = rng.uniform(-0.4995, 0.4995, node_logits.shape).astype(np.float32) * np.float32(logit_tolerance)
    validator_logits = node_logits + drift
    checks = rule.check_tokens(validator_logits, claims, np.uint64(3), positions, params, logit_tolerance)
    assert checks.num_mismatches == 0, np.flatnonzero(checks.verdicts == rule.TokenVerdict.MISMATCH)[:5]
    assert checks.num_near_ties > 0
    if params.temperature == 0.0 or (params.top_k == 0 and params.top_p == 1.0):
        return
    node_allowed = rule._score(node_logits, np.uint64(3), positions, params).allowed
    validator_best = rule.sample_tokens(validator_logits, np.uint64(3), positions, params).token_ids
    assert (~node_allowed[positions, validator_best]).sum() > 0  # the boundary case is exercised

    scaled = validator_logits * rule.inverse_temperature(params.temperature)
    tolerance = np.float32(logit_tolerance) * rule.inverse_temperature(params.temperature)
    _, possible = rule.filter_band(scaled, params.top_k, params.top_p, tolerance)
    outside = np.where(scaled < possible[:, None] - 0.01, np.arange(vocab_size), -1).max(axis=1)
    rows = np.flatnonzero(outside >= 0)
    cut = rule.check_tokens(validator_logits[rows], outside[rows], np.uint64(3), rows, params, logit_tolerance)
    assert cut.num_mismatches == len(rows) > 0


FILTER_PARAMS = [p for p in DRIFT_PARAMS if p.temperature > 0 and (p.top_k > 0 or p.top_p < 1.0)]


@pytest.mark.parametrize("params", FILTER_PARAMS, ids=str)
@pytest.mark.parametrize("drift_kind", ["every logit", "one logit"])
def test_a_claim_a_drifted_filter_let_in_is_never_cut_for_certain(params, drift_kind):
    """Honest tokens sampled from the node's logits, checked against validator logits that differ by
    up to FILTER_DOUBT_FACTOR times half the tolerance each, or by up to 1.3 logits at one token (the
    default model's end-of-sequence logit across bf16 engines) and a hundredth of that elsewhere: no
    claim is a mismatch that the filters decide (a mismatch within the tolerance, never doubted),
    and some are FILTER_DOUBTs. A token below the doubt band is a mismatch (a strike), as before."""
    rng = np.random.default_rng(12)
    num_rows, vocab_size, logit_tolerance = 6000, 40, 0.3
    node_logits = (rng.standard_normal((num_rows, vocab_size)) * 2).astype(np.float32)
    node_logits[::2] = np.round(node_logits[::2] * 4) / 4
    positions = np.arange(num_rows)
    claims = rule.sample_tokens(node_logits, np.uint64(5), positions, params).token_ids
    if drift_kind == "every logit":
        half_width = 0.4995 * rule.FILTER_DOUBT_FACTOR * logit_tolerance
        drift = rng.uniform(-half_width, half_width, node_logits.shape).astype(np.float32)
    else:
        drift = rng.uniform(-0.013, 0.013, node_logits.shape).astype(np.float32)
        drift[:, 0] = rng.uniform(-1.3, 1.3, num_rows)
    validator_logits = node_logits + drift
    checks = rule.check_tokens(validator_logits, claims, np.uint64(5), positions, params, logit_tolerance)
    tolerance = rule.score_tolerance(logit_tolerance, params.temperature)
    decided_by_filters = (checks.verdicts == rule.TokenVerdict.MISMATCH) & (checks.score_gaps <= tolerance)
    assert not decided_by_filters.any(), np.flatnonzero(decided_by_filters)[:5]
    if drift_kind == "every logit" or params.top_p < 1.0:  # one logit seldom moves a k-th largest
        assert (checks.verdicts == rule.TokenVerdict.FILTER_DOUBT).sum() > 0
    assert rule.doubted_mismatches(checks, tolerance)[checks.verdicts == rule.TokenVerdict.FILTER_DOUBT].all()

    scaled = validator_logits * rule.inverse_temperature(params.temperature)
    _, possible = rule.filter_band(scaled, params.top_k, params.top_p, np.float32(rule.FILTER_DOUBT_FACTOR) * tolerance)
    outside = np.where(scaled < possible[:, None] - 0.01, np.arange(vocab_size), -1).max(axis=1)
    rows = np.flatnonzero(outside >= 0)
    cut = rule.check_tokens(validator_logits[rows], outside[rows], np.uint64(5), rows, params, logit_tolerance)
    assert len(rows) > 0 and (cut.verdicts == rule.TokenVerdict.MISMATCH).all()
    assert not rule.doubted_mismatches(cut, tolerance)[cut.score_gaps <= tolerance].any()


def test_filter_doubts_follow_the_band_like_a_naive_reference():
    """Row by row, the verdict from its definition: the argmax is exact; a claim within the tolerance
    of the best certain token that may have passed the filters is a near-tie; one outside the band at
    the tolerance, inside it at FILTER_DOUBT_FACTOR times it and within DOUBT_GAP_FACTOR times the
    tolerance of the best certain token is a FILTER_DOUBT; anything else a mismatch."""
    rng = np.random.default_rng(13)
    params = SamplingParams(0.8, top_k=12, top_p=0.8)
    num_rows, vocab_size, logit_tolerance = 3000, 30, 0.3
    logits = (rng.standard_normal((num_rows, vocab_size)) * 2).astype(np.float32)
    positions = np.arange(num_rows)
    claims = rng.integers(0, vocab_size, num_rows)
    checks = rule.check_tokens(logits, claims, np.uint64(4), positions, params, logit_tolerance)
    tolerance = rule.score_tolerance(logit_tolerance, params.temperature)
    noise = rule.gumbel_noise(np.uint64(4), positions, vocab_size)
    seen = set()
    for row in range(num_rows):
        scaled = logits[row] * rule.inverse_temperature(params.temperature)
        certain, possible = (float(b[0]) for b in rule.filter_band(scaled[None], params.top_k, params.top_p, tolerance))
        doubt_possible = float(
            rule.filter_band(
                scaled[None], params.top_k, params.top_p, np.float32(rule.FILTER_DOUBT_FACTOR) * tolerance
            )[1][0]
        )
        threshold = float(rule.filter_threshold(scaled[None], params.top_k, params.top_p)[0])
        scores = [float(scaled[i] + noise[row, i]) if scaled[i] >= threshold else -math.inf for i in range(vocab_size)]
        best = max(range(vocab_size), key=lambda i: (scores[i], -i))
        claim = int(claims[row])
        claimed = float(scaled[claim] + noise[row, claim])
        best_certain = max(
            (float(scaled[i] + noise[row, i]) for i in range(vocab_size) if scaled[i] >= certain), default=-math.inf
        )
        gap = max(best_certain - claimed, 0.0)
        if claim == best:
            expected = rule.TokenVerdict.EXACT
        elif gap <= tolerance and scaled[claim] >= possible:
            expected = rule.TokenVerdict.NEAR_TIE
        elif scaled[claim] < possible and scaled[claim] >= doubt_possible and gap <= rule.DOUBT_GAP_FACTOR * tolerance:
            expected = rule.TokenVerdict.FILTER_DOUBT
        else:
            expected = rule.TokenVerdict.MISMATCH
        assert checks.verdicts[row] == expected, row
        seen.add(expected)
    assert seen == set(rule.TokenVerdict)
