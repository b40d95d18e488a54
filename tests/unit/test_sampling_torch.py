"""policy/sampling.py (torch) against the numpy reference: bit-for-bit noise, the same tokens."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from policy import sampling
from protocol import sampling as rule
from protocol.types import SamplingParams

VECTORS = json.loads((Path(__file__).parent.parent / "vectors" / "sampling.json").read_text())
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def all_gumbel_values_equal(device: str) -> None:
    """The noise takes 2**24 values: compare every one of them."""
    bits = np.arange(2**rule.NOISE_BITS, dtype=np.uint64)
    reference = rule.gumbel_from_bits(bits)
    computed = sampling.gumbel_from_bits(torch.arange(2**rule.NOISE_BITS, device=device)).cpu().numpy()
    np.testing.assert_array_equal(computed.view(np.uint32), reference.view(np.uint32))


def test_every_gumbel_value_is_bit_equal_on_cpu():
    all_gumbel_values_equal("cpu")


@pytest.mark.gpu
def test_every_gumbel_value_is_bit_equal_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    all_gumbel_values_equal("cuda")


def rows_for(seeds: list[int], params: list[SamplingParams], device: str) -> sampling.RowSampling:
    return sampling.RowSampling.build(params, seeds, device)


@pytest.mark.parametrize("device", DEVICES)
def test_noise_bits_equal_numpy_over_a_million_values(device):
    rng = np.random.default_rng(1)
    seeds = [int(s) for s in rng.integers(0, 2**64, 256, dtype=np.uint64)] + [0, 2**64 - 1]
    positions = np.concatenate([rng.integers(0, 2**32, 256), [0, 2**32 - 1]])
    rows = rows_for(seeds, [SamplingParams()] * len(seeds), device)
    computed = sampling.noise_bits(rows.seed_lo, rows.seed_hi, torch.from_numpy(positions).to(device), 4096)
    reference = rule.noise_bits(np.array(seeds, dtype=np.uint64), positions, 4096)
    np.testing.assert_array_equal(computed.cpu().numpy(), reference.astype(np.int64))
    noise = sampling.gumbel_from_bits(computed).cpu().numpy()
    np.testing.assert_array_equal(noise.view(np.uint32), rule.gumbel_from_bits(reference).view(np.uint32))


def test_vectors():
    for case in VECTORS["noise"]:
        rows = rows_for([case["seed"]], [SamplingParams()], "cpu")
        bits = sampling.noise_bits(rows.seed_lo, rows.seed_hi, torch.tensor([case["position"]]), VECTORS["vocab_size"])
        assert bits[0].tolist() == case["noise_bits"]
    for case in VECTORS["sample"]:
        logits = torch.from_numpy(np.array(case["logits_f32_bits"], dtype=np.uint32).view(np.float32))
        params = SamplingParams(case["temperature"], case["top_k"], case["top_p"])
        sampled = sampling.sample(
            logits[None], torch.tensor([case["position"]]), rows_for([case["seed"]], [params], "cpu")
        )
        assert sampled.token_ids.tolist() == [case["token_id"]], case["name"]
        assert sampled.margins.numpy().view(np.uint32)[0] == case["margin_f32_bits"], case["name"]
        expected_logprob = np.array([case["logprob_f32_bits"]], dtype=np.uint32).view(np.float32)[0]
        assert abs(sampled.logprobs[0].item() - expected_logprob) <= 1e-6, case["name"]


MIXED_PARAMS = [
    SamplingParams(1.0),
    SamplingParams(0.7, top_k=5),
    SamplingParams(1.2, top_p=0.85),
    SamplingParams(0.0),
    SamplingParams(0.9, top_k=20, top_p=0.7),
    SamplingParams(0.3),
]


@pytest.mark.parametrize("device", DEVICES)
def test_batched_mixed_rows_equal_the_reference_row_by_row(device):
    rng = np.random.default_rng(2)
    num_rows, vocab_size = 120, 300
    logits = (rng.standard_normal((num_rows, vocab_size)) * 3).astype(np.float32)
    logits[::7, 3] = logits[::7, 11] = logits[::7].max(axis=1) + 0.5  # ties in the logits
    params = [MIXED_PARAMS[row % len(MIXED_PARAMS)] for row in range(num_rows)]
    seeds = [rule.derive_sample_seed(99, row // 4, row % 4) for row in range(num_rows)]
    positions = rng.integers(0, 10_000, num_rows)
    sampled = sampling.sample(
        torch.from_numpy(logits).to(device), torch.from_numpy(positions).to(device), rows_for(seeds, params, device)
    )
    for row in range(num_rows):
        reference = rule.sample_tokens(logits[row : row + 1], np.uint64(seeds[row]), positions[row], params[row])
        assert sampled.token_ids[row].item() == reference.token_ids[0], row
        np.testing.assert_array_equal(sampled.margins[row].cpu().numpy(), reference.margins[0])
        assert abs(sampled.logprobs[row].item() - reference.logprobs[0]) <= 2e-6


def test_same_row_gives_the_same_token_in_any_batch():
    rng = np.random.default_rng(4)
    logits = torch.from_numpy(rng.standard_normal((1, 64)).astype(np.float32))
    alone = sampling.sample(logits, torch.tensor([17]), rows_for([5], [SamplingParams(0.8)], "cpu"))
    padded = torch.cat([torch.randn(9, 64), logits, torch.randn(5, 64)])
    in_batch = sampling.sample(
        padded,
        torch.full((15,), 17),
        rows_for(list(range(9)) + [5] + list(range(5)), [SamplingParams(0.8)] * 15, "cpu"),
    )
    assert in_batch.token_ids[9].item() == alone.token_ids[0].item()
    assert in_batch.margins[9].item() == alone.margins[0].item()


def test_row_sampling_rejects_bad_inputs():
    with pytest.raises(rule.SamplingParamsError):
        rows_for([1, 2], [SamplingParams()], "cpu")
    with pytest.raises(rule.SamplingParamsError):
        rows_for([2**64], [SamplingParams()], "cpu")
    with pytest.raises(rule.SamplingParamsError):
        rows_for([1], [SamplingParams(top_p=0.0)], "cpu")


@pytest.mark.parametrize("device", DEVICES)
def test_check_tokens_equals_the_reference_row_by_row(device):
    """Claims that are the argmax, near-ties at several distances, filtered-out tokens (some just
    outside the filter band: FILTER_DOUBT) and random tokens, over mixed parameters: the same
    verdicts and score gaps bit for bit."""
    rng = np.random.default_rng(5)
    num_rows, vocab_size, tolerance = 240, 200, 0.3
    logits = (rng.standard_normal((num_rows, vocab_size)) * 3).astype(np.float32)
    params = [MIXED_PARAMS[row % len(MIXED_PARAMS)] for row in range(num_rows)]
    seeds = [rule.derive_sample_seed(7, row // 4, row % 4) for row in range(num_rows)]
    positions = rng.integers(0, 10_000, num_rows)
    rows = rows_for(seeds, params, device)
    sampled = sampling.sample(torch.from_numpy(logits).to(device), torch.from_numpy(positions).to(device), rows)
    claims = sampled.token_ids.cpu().numpy().copy()
    for row in range(0, num_rows, 3):  # move the claimed token's score just below or above the best
        other = (claims[row] + 1 + row % 5) % vocab_size
        logits[row, other] = logits[row, claims[row]] - np.float32(0.05 * (row % 9))
        claims[row] = other
    claims[1::5] = rng.integers(0, vocab_size, len(claims[1::5]))
    for row in range(2, num_rows, 5):  # the best-scoring token that the filters cut, where they cut any
        if params[row].temperature == 0:
            continue
        scaled = logits[row : row + 1] * rule.inverse_temperature(params[row].temperature)
        cut = scaled[0] < rule.filter_threshold(scaled, params[row].top_k, params[row].top_p)[0]
        if cut.any():
            noise = rule.gumbel_noise(np.uint64(seeds[row]), positions[row : row + 1], vocab_size)[0]
            claims[row] = int(np.argmax(np.where(cut, scaled[0] + noise, -np.inf)))
    checks = sampling.check_tokens(
        torch.from_numpy(logits).to(device),
        torch.from_numpy(claims).to(device),
        torch.from_numpy(positions).to(device),
        rows,
        tolerance,
    )
    verdicts = set()
    for row in range(num_rows):
        reference = rule.check_tokens(
            logits[row : row + 1],
            claims[row : row + 1],
            np.uint64(seeds[row]),
            positions[row : row + 1],
            params[row],
            tolerance,
        )
        assert checks.verdicts[row].item() == reference.verdicts[0], row
        np.testing.assert_array_equal(checks.score_gaps[row].cpu().numpy(), reference.score_gaps[0])
        assert abs(checks.logprobs[row].item() - reference.logprobs[0]) <= 2e-6 * (1 + abs(reference.logprobs[0]))
        verdicts.add(int(reference.verdicts[0]))
    assert verdicts == {int(v) for v in rule.TokenVerdict}


@pytest.mark.parametrize("device", DEVICES)
def test_check_tokens_under_drift_equals_the_reference_row_by_row(device):
    """Honest claims checked against logits that drift by up to half the tolerance, on a grid that
    puts ties and near-ties at the filter boundaries: the filter band (protocol/sampling.py,
    filter_band) gives the same verdicts and score gaps bit for bit, and no mismatch."""
    rng = np.random.default_rng(8)
    num_rows, vocab_size, tolerance = 600, 60, 0.3
    node_logits = (np.round(rng.standard_normal((num_rows, vocab_size)) * 8) / 4).astype(np.float32)
    params = [MIXED_PARAMS[row % len(MIXED_PARAMS)] for row in range(num_rows)]
    seeds = [rule.derive_sample_seed(3, row, 0) for row in range(num_rows)]
    positions = rng.integers(0, 10_000, num_rows)
    rows = rows_for(seeds, params, device)
    claims = sampling.sample(
        torch.from_numpy(node_logits).to(device), torch.from_numpy(positions).to(device), rows
    ).token_ids
    drift = rng.uniform(-0.4995, 0.4995, node_logits.shape).astype(np.float32) * np.float32(tolerance)
    logits = node_logits + drift
    checks = sampling.check_tokens(
        torch.from_numpy(logits).to(device), claims, torch.from_numpy(positions).to(device), rows, tolerance
    )
    assert int((checks.verdicts == rule.TokenVerdict.MISMATCH).sum()) == 0
    assert int((checks.verdicts == rule.TokenVerdict.NEAR_TIE).sum()) > 0
    for row in range(num_rows):
        reference = rule.check_tokens(
            logits[row : row + 1],
            claims[row : row + 1].cpu().numpy(),
            np.uint64(seeds[row]),
            positions[row : row + 1],
            params[row],
            tolerance,
        )
        assert checks.verdicts[row].item() == reference.verdicts[0], row
        np.testing.assert_array_equal(checks.score_gaps[row].cpu().numpy(), reference.score_gaps[0])
