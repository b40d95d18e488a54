"""The full checks of one replayed rollout (coordinator.validation.check_rollout) on made-up
replay reports: the termination rule, and the log-probability drift bound at a temperature; and
the validator's device setting."""

import dataclasses
import json
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from coordinator.node_stats import FALSE_POSITIVE_RATE, NEAR_TIE_RATE_BOUND, binomial_upper_tail
from coordinator.store import ChunkStats, GroupState, Store, TokenStats, open_store, sqlite_url
from coordinator.validation import (
    DOUBT_WINDOW_GROUPS,
    HONEST_DOUBT_RATE_BOUND,
    MIN_WINDOW_CHUNKS,
    GroupChecker,
    SamplingPolicy,
    ValidationQueue,
    verdict_from_proto,
    verdict_to_proto,
)
from coordinator.verdicts import (
    DRIFT_DOUBT_FALSE_POSITIVE_RATE,
    HONEST_DRIFT_DOUBT_RATE,
    MAX_DOUBTED_MISMATCHES,
    MIN_EOS_LOGPROB,
    NEAR_TIE_FALSE_POSITIVE_RATE,
    TOLERANCES,
    GroupJob,
    Verdict,
    check_rollout,
    chunk_stats,
    group_verdict,
    max_doubted_drift_tokens,
    max_near_ties,
)
from policy.engine import GenerationRequest
from policy.model import ModelLoadError
from policy.prefill import ReplayReport
from protocol import commitment
from protocol.proto import validation_pb2
from protocol.sampling import DOUBT_GAP_FACTOR, TokenChecks, TokenVerdict, score_tolerance
from protocol.types import FinishReason, Rollout

EOS = 2
CLEAN_CHUNK = commitment.ChunkCheck(0, 0.0, 0.0, 128)


def _verdict(
    last_token_verdict: TokenVerdict,
    eos_logprob: float,
    finish_reason=FinishReason.STOP,
    *,
    dtype: str = "float32",
    drift: float = 0.0,
    temperature: float = 1.0,
    chunk: commitment.ChunkCheck = CLEAN_CHUNK,
):
    logprobs = np.array([-0.1, -0.2, eos_logprob], dtype=np.float32)
    report = ReplayReport(
        token_checks=TokenChecks(
            np.array([TokenVerdict.EXACT, TokenVerdict.EXACT, last_token_verdict]),
            logprobs,
            np.zeros(3, dtype=np.float32),
        ),
        logprob_drift=np.array([0.0, drift, 0.0], dtype=np.float32),
        commitment_checks=[chunk],
        temperature=temperature,
    )
    rollout = Rollout(
        sample_index=0,
        token_ids=(7, 8, EOS),
        sampled_mask=(True,) * 3,
        logprobs=tuple(float(x) for x in logprobs),
        commitment=b"",
        finish_reason=finish_reason,
        claimed_reward=0.0,
    )
    tolerances = TOLERANCES[dtype]
    return check_rollout(report, rollout, tolerances)


def test_an_unlikely_eos_that_the_rule_chose_is_honest():
    assert _verdict(TokenVerdict.EXACT, math.log(4.4e-5)).passed


def test_an_unlikely_eos_standing_only_as_a_near_tie_fails_termination():
    verdict = _verdict(TokenVerdict.NEAR_TIE, math.log(4.4e-5))
    assert not verdict.passed and verdict.check == "termination"
    assert verdict.evidence["allowed_min"] == MIN_EOS_LOGPROB
    assert _verdict(TokenVerdict.NEAR_TIE, math.log(0.3)).passed


def test_the_logprob_drift_bound_scales_with_one_over_the_temperature():
    """Log-probabilities are of logits / T: the same logit drift moves them 1 / T as far. A bf16
    drift of 0.36 nats at T = 0.7 (measured from an honest vLLM node) passes; at T = 1 it fails,
    with the bound at that temperature as the evidence."""
    bound = TOLERANCES["bfloat16"].max_logprob_drift
    past_doubt = 1.01 * TOLERANCES["bfloat16"].drift_doubt_factor * bound
    assert _verdict(TokenVerdict.EXACT, -1.0, dtype="bfloat16", drift=0.36, temperature=0.7).check == "all"
    verdict = _verdict(TokenVerdict.EXACT, -1.0, dtype="bfloat16", drift=past_doubt, temperature=1.0)
    assert not verdict.passed and verdict.check == "logprob_drift"
    assert verdict.evidence["allowed"] == bound and verdict.evidence["positions"] == [1]
    slow = _verdict(TokenVerdict.EXACT, -1.0, dtype="bfloat16", drift=past_doubt / 0.5, temperature=0.5)
    assert not slow.passed and slow.evidence["allowed"] == bound / 0.5
    assert _verdict(TokenVerdict.EXACT, -1.0, dtype="bfloat16", drift=bound, temperature=0.0).passed


def test_a_validator_refuses_a_device_it_cannot_use_when_it_starts():
    with pytest.raises(ModelLoadError, match="unknown device 'tpu'"):
        GroupChecker(history=None, model_dir=None, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="sees no CUDA device"):
            GroupChecker(history=None, model_dir=None, device="cuda")


def test_chunk_stats_summed_pool_like_the_reference():
    """A node's window keeps three sums a chunk; pooled from the sums, its statistics equal a naive
    pooling of the chunks: mismatches per chunk, the mantissa error over every matched point."""
    rng = np.random.default_rng(4)
    checks = [
        commitment.ChunkCheck(int(rng.integers(0, 4)), float(rng.uniform(0, 2)), 0.0, int(rng.integers(60, 129)))
        for _ in range(40)
    ] + [commitment.ChunkCheck(3, 0.0, 0.0, 3)]
    stats = [chunk_stats(c) for c in checks]
    pooled = commitment.PooledCheck.from_sums(
        len(stats),
        sum(s.exponent_mismatches for s in stats),
        sum(s.mantissa_error_sum for s in stats),
        sum(s.num_matched for s in stats),
    )
    matched_errors = [c.mantissa_error_mean for c in checks for _ in range(c.num_points - c.exponent_mismatches)]
    assert pooled.num_chunks == len(checks)
    assert math.isclose(pooled.exponent_mismatches_per_chunk, sum(c.exponent_mismatches for c in checks) / len(checks))
    assert math.isclose(pooled.mantissa_error_mean, sum(matched_errors) / len(matched_errors), rel_tol=1e-12)


def test_verdicts_cross_the_wire_with_their_chunks_and_malformed_ones_are_refused():
    verdict = Verdict(True, "all", {"num_chunks": 2}, (ChunkStats(1, 2.5, 30), ChunkStats(0, 0.0, 32)))
    assert verdict_from_proto(verdict_to_proto("g-1", verdict)) == ("g-1", verdict)
    failed = Verdict(False, "sampling", {"positions": [3]})
    assert verdict_from_proto(verdict_to_proto("g-2", failed)) == ("g-2", failed)

    def refused(match: str, **fields) -> None:
        message = verdict_to_proto("g-3", verdict)
        for name, value in fields.items():
            if name == "chunks":
                del message.chunks[:]
                message.chunks.extend(value)
            else:
                setattr(message, name, value)
        with pytest.raises(ValueError, match=match):
            verdict_from_proto(message)

    refused("not JSON", evidence_json="{nope")
    refused("JSON object", evidence_json="[1, 2]")
    refused("check name", check="")
    refused("group id", group_id="")
    refused("only a passed group", passed=False)
    for bad_sum in (float("nan"), float("inf"), -1.0):
        refused("finite and not negative", chunks=[validation_pb2.ChunkStatistics(mantissa_error_sum=bad_sum)])


class FixedHistory:
    """A PolicyHistory that holds one version: the state it was given."""

    def __init__(self, state):
        self._state = state

    def state(self, version: int):
        return self._state if version == 1 else None


def _groups_of(model, tokenizer, num_groups: int, node_id: str) -> list[GroupJob]:
    from envs import Split, get_task
    from policy.engine import TorchEngine
    from protocol.sampling import derive_sample_seed
    from protocol.types import SamplingParams

    task, params = get_task("addition"), SamplingParams(1.0, max_tokens=32)
    jobs = []
    for index in range(num_groups):
        prompt = tuple(tokenizer.encode(task.problem(Split.TRAIN, 0, index).prompt))
        seeds = tuple(derive_sample_seed(3, index, sample) for sample in range(8))
        results = TorchEngine(model, [tokenizer.eos_token_id]).generate(
            [GenerationRequest(prompt, params, seed) for seed in seeds]
        )
        rollouts = tuple(
            Rollout(sample, r.token_ids, (True,) * len(r.token_ids), r.logprobs, r.commitment, r.finish_reason, 0.0)
            for sample, r in enumerate(results)
        )
        jobs.append(GroupJob(f"{node_id}-{index}", node_id, 1, "bfloat16", prompt, params, seeds, rollouts))
    return jobs


def test_a_deviation_each_group_hides_shows_in_the_nodes_window(tiny_model, tmp_path):
    """int8 linear layers in bf16 under a bf16 declaration: a group of 8 one-chunk rollouts is too
    few chunks for the pooled check, and nearly every group passes alone; the coordinator's queue
    pools the node's chunks across those groups, and once its window is full a group fails it,
    and the node's other groups go to quarantine. An honest bf16 node's window passes."""
    from policy.model import load_model
    from policy.tokenizer import load_tokenizer
    from policy.weights import export_bf16_state
    from tests.adversarial.test_attacks import int8_linear_weights

    tokenizer = load_tokenizer(tiny_model)
    trusted = load_model(tiny_model, dtype="bfloat16")
    checker = GroupChecker(FixedHistory(export_bf16_state(trusted)), tiny_model)
    cheat_jobs = _groups_of(int8_linear_weights(trusted), tokenizer, 32, "cheat")
    honest_jobs = _groups_of(trusted, tokenizer, 24, "honest")
    verdicts = checker.check(cheat_jobs + honest_jobs)
    cheat_verdicts = [v for v in verdicts[:32] if v.passed]
    assert len(cheat_verdicts) >= 30
    assert all(v.passed for v in verdicts[32:])

    store, queue = _checking_queue(tmp_path, window_chunks=128, window_tokens=2048)

    def report_one_by_one(node_id: str, node_verdicts) -> list[GroupState]:
        group_ids = _pending_groups(store, node_id, "torch-cpu-bfloat16", len(node_verdicts))
        for group_id, verdict in zip(group_ids, node_verdicts, strict=True):
            queue.report([(group_id, verdict)])
        return [store.get_group(group_id).state for group_id in group_ids]

    cheat_states = report_one_by_one("cheat", cheat_verdicts)
    caught = cheat_states.index(GroupState.REJECTED)
    assert caught == MIN_WINDOW_CHUNKS // 8 - 1  # on probation: judged once 8 groups of 8 chunks are in
    assert set(cheat_states) == {GroupState.REJECTED, GroupState.QUARANTINED}
    failure = store.list_validations("cheat", 1)[0]
    assert failure.check_name == "commitment_node_pooled" and failure.num_groups_consumed == 0
    window = json.loads(failure.evidence_json)
    assert window["num_chunks"] == MIN_WINDOW_CHUNKS
    assert window["mantissa_error_mean"] > window["allowed"]["mantissa_error_mean"]
    # ~100 tokens a group: its probation verdict comes once its token window holds 2048 tokens (its chunk
    # window is past MIN_WINDOW_CHUNKS by then), and releases every group held before
    assert report_one_by_one("honest", verdicts[32:]) == [GroupState.READY] * 24
    assert not store.get_node("honest").on_probation
    store.close()


# ---- no strike on thin evidence ----


def test_a_complete_chunk_over_its_bounds_is_doubt_and_a_chunk_with_a_cut_a_failure():
    """Issue 16: a one-token last chunk of an honest bf16 rollout, replayed on another attention
    kernel, showed 13 exponent mismatches and mantissa mean 9.1: it committed every value it holds,
    the smallest too. Over its bounds, it passes in doubt; the same statistics in a chunk with a cut
    fail."""
    short = commitment.ChunkCheck(13, 9.1, 6.0, 128, complete=True)
    doubt = _verdict(TokenVerdict.EXACT, -1.0, dtype="bfloat16", chunk=short)
    assert doubt.passed and doubt.suspect and doubt.check == "commitment_short_chunk_doubt"
    assert doubt.evidence["exponent_mismatches"] == 13
    failed = _verdict(TokenVerdict.EXACT, -1.0, dtype="bfloat16", chunk=dataclasses.replace(short, complete=False))
    assert not failed.passed and failed.check == "commitment"
    assert not _verdict(TokenVerdict.NEAR_TIE, math.log(4.4e-5), chunk=short).passed  # later checks still fail
    assert not _verdict(TokenVerdict.EXACT, -1.0).suspect
    # a garbage commitment of a one-token completion: every exponent differs, no mantissa to compare
    garbage = commitment.ChunkCheck(128, commitment.NO_MANTISSA_MATCH, commitment.NO_MANTISSA_MATCH, 128, complete=True)
    for chunk in (
        garbage,
        dataclasses.replace(short, exponent_mismatches=40),
        dataclasses.replace(short, mantissa_error_mean=40.0),
    ):
        struck = _verdict(TokenVerdict.EXACT, -1.0, dtype="bfloat16", chunk=chunk)
        assert not struck.passed and struck.check == "commitment", chunk


def test_a_short_chunk_is_judged_and_reported_against_its_widened_bounds():
    """Issue 16: an honest vLLM bf16 5-token last chunk at mantissa mean 4.41 against the full chunk's
    4.0 passes within its short_chunk_scale; past the widened bound it fails, and the evidence states
    the bounds it was held to."""
    scale = commitment.short_chunk_scale(5, 128)
    honest = commitment.ChunkCheck(3, 4.41, 2.0, 128, bound_scale=scale)
    assert _verdict(TokenVerdict.EXACT, -1.0, dtype="bfloat16", chunk=honest).check == "all"
    over = dataclasses.replace(honest, mantissa_error_mean=1.01 * scale * commitment.MAX_MANTISSA_ERROR_MEAN)
    failed = _verdict(TokenVerdict.EXACT, -1.0, dtype="bfloat16", chunk=over)
    assert not failed.passed and failed.check == "commitment" and failed.evidence["bound_scale"] == scale
    assert failed.evidence["allowed"] == {
        "exponent_mismatches": pytest.approx(scale * commitment.MAX_EXPONENT_MISMATCHES),
        "mantissa_error_mean": pytest.approx(scale * commitment.MAX_MANTISSA_ERROR_MEAN),
        "mantissa_error_median": pytest.approx(scale * commitment.MAX_MANTISSA_ERROR_MEDIAN),
    }
    fp32 = _verdict(TokenVerdict.EXACT, -1.0, chunk=dataclasses.replace(honest, mantissa_error_mean=1.0))
    fp32_bound = commitment.FP32_THRESHOLDS.max_mantissa_error_mean  # fp32 bounds do not widen
    assert not fp32.passed and fp32.evidence["allowed"]["mantissa_error_mean"] == fp32_bound


def test_check_points_marks_the_chunks_that_commit_every_value_they_hold():
    rng = np.random.default_rng(5)
    hidden = 128
    bits = commitment.bf16_bits(rng.standard_normal((33, hidden)).astype(np.float32))
    checks = commitment.verify(commitment.commit(bits), bits)
    assert [c.complete for c in checks] == [False, True]  # 32 tokens have a cut; one token of 128 values none


def _group_job(dtype: str, num_rollouts: int = 8) -> GroupJob:
    rollouts = tuple(
        Rollout(i, (7, 8), (True, True), (-0.1, -0.2), b"", FinishReason.LENGTH, 0.0) for i in range(num_rollouts)
    )
    return GroupJob("g", "n", 1, dtype, (1, 2), None, tuple(range(num_rollouts)), rollouts)


def _report(chunk: commitment.ChunkCheck) -> ReplayReport:
    return ReplayReport(
        TokenChecks(
            np.array([TokenVerdict.EXACT] * 2), np.array([-0.1, -0.2], dtype=np.float32), np.zeros(2, dtype=np.float32)
        ),
        np.zeros(2, dtype=np.float32),
        [chunk],
        None,
        1.0,
        np.zeros(2, dtype=np.float32),
        np.zeros(2, dtype=np.float32),
    )


def test_the_honest_fp32_pool_of_issue_16_passes_in_doubt_and_keeps_its_chunks():
    """8 one-chunk rollouts, two with one exponent flip each (0.25 a chunk against 0.1 allowed, mantissa
    error 0): too little evidence to strike. Seven flips in 8 chunks are not."""
    clean, flipped = commitment.ChunkCheck(0, 0.0, 0.0, 128), commitment.ChunkCheck(1, 0.0, 0.0, 128)
    verdict = group_verdict(_group_job("float32"), [_report(flipped)] * 2 + [_report(clean)] * 6, TOLERANCES["float32"])
    assert verdict.passed and verdict.check == "commitment_pooled_doubt" and len(verdict.chunks) == 8
    assert verdict.evidence["exponent_mismatches_per_chunk"] == 0.25
    failed = group_verdict(_group_job("float32"), [_report(flipped)] * 7 + [_report(clean)], TOLERANCES["float32"])
    assert not failed.passed and failed.check == "commitment_pooled"
    short = commitment.ChunkCheck(13, 9.1, 6.0, 128, complete=True)
    in_doubt = group_verdict(_group_job("bfloat16"), [_report(short)] + [_report(clean)] * 7, TOLERANCES["bfloat16"])
    assert in_doubt.check == "commitment_short_chunk_doubt" and len(in_doubt.chunks) == 7  # left out of the pools


def _checking_queue(tmp_path, *, window_chunks: int, window_tokens: int) -> tuple[Store, ValidationQueue]:
    """A store and its validation queue, probation ending with the first full token window."""
    from tests.unit.test_store_contract import T0

    store = open_store(sqlite_url(tmp_path))
    policy = SamplingPolicy(probation_tokens=window_tokens)
    queue = ValidationQueue(
        store, prompt_of=None, policy=policy, clock=lambda: T0, window_chunks=window_chunks, window_tokens=window_tokens
    )
    return store, queue


def _pending_groups(store: Store, node_id: str, engine: str, num_groups: int) -> list[str]:
    """A new node's submission of num_groups groups, each waiting for its full check."""
    from tests.unit.test_store_contract import T0, _fresh_factory, _submission

    store.register_node(node_id, node_id.encode().ljust(32, b"k"), node_id, engine, "cpu", "0", T0)
    lease = store.issue_lease(node_id, T0, 1, _fresh_factory(node_id, prompts_per_lease=num_groups))
    submission = _submission(lease, node_id.encode(), state=GroupState.PENDING_VALIDATION)
    store.record_submission(submission)
    return [group.group_id for group in submission.groups]


def test_a_doubt_puts_a_trusted_node_on_probation_without_a_strike(tmp_path):
    store, queue = _checking_queue(tmp_path, window_chunks=8, window_tokens=100)
    first, second, third = _pending_groups(store, "n", "torch-cpu-float32", 3)
    clean = tuple(ChunkStats(0, 0.0, 128) for _ in range(8))
    tokens = TokenStats(num_tokens=100)  # no near-tie, no drift: a clean token window
    queue.report([(first, Verdict(True, "all", {}, clean, tokens))])  # clean windows: probation passed
    assert store.get_group(first).state is GroupState.READY and not store.get_node("n").on_probation
    assert SamplingPolicy().rate(store.get_node("n")) == 1.0  # fewer than 20 passed checks
    doubt = Verdict(
        True, "commitment_pooled_doubt", {"num_chunks": 8}, (ChunkStats(1, 0.0, 127),) * 2 + clean[2:], tokens
    )
    queue.report([(second, doubt)])
    node = store.get_node("n")
    assert node.on_probation and node.num_strikes == 0 and node.num_full_checks_failed == 0
    assert store.get_group(first).state is GroupState.PROBATION  # held again, with the doubted one
    assert store.get_group(second).state is GroupState.PROBATION
    assert SamplingPolicy(num_initial_checks=0).rate(node) == 1.0  # every submission checked
    queue.report([(third, Verdict(True, "all", {}, clean, tokens))])  # the windows pass again
    assert {store.get_group(g).state for g in (first, second, third)} == {GroupState.READY}
    store.close()


# ---- the sampling rule: doubt, not a strike, for a mismatch within reach of honest drift ----

BF16_TOLERANCE = TOLERANCES["bfloat16"].logit_tolerance


def _sampling_report(verdicts: list[TokenVerdict], gaps: list[float], temperature: float = 1.0) -> ReplayReport:
    num_tokens = len(verdicts)
    return ReplayReport(
        TokenChecks(
            np.array(verdicts, dtype=np.int8),
            np.full(num_tokens, -0.5, dtype=np.float32),
            np.array(gaps, dtype=np.float32),
        ),
        np.zeros(num_tokens, dtype=np.float32),
        [CLEAN_CHUNK],
        None,
        temperature,
        np.zeros(num_tokens, dtype=np.float32),
        np.zeros(num_tokens, dtype=np.float32),
    )


def _sampling_verdict(verdicts: list[TokenVerdict], gaps: list[float], temperature: float = 1.0) -> Verdict:
    rollout = Rollout(
        0,
        tuple(range(7, 7 + len(verdicts))),
        (True,) * len(verdicts),
        (-0.5,) * len(verdicts),
        b"",
        FinishReason.LENGTH,
        0.0,
    )
    tolerances = TOLERANCES["bfloat16"]
    return check_rollout(_sampling_report(verdicts, gaps, temperature), rollout, tolerances)


E, N, M, F = TokenVerdict.EXACT, TokenVerdict.NEAR_TIE, TokenVerdict.MISMATCH, TokenVerdict.FILTER_DOUBT


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_one_mismatch_just_past_the_tolerance_is_doubt_and_past_the_doubt_bound_a_strike(temperature):
    """Issue 16: honest bf16 replays across attention kernels (eager vs SDPA) put a claimed token's
    score past the tolerance now and then: one such mismatch, within DOUBT_GAP_FACTOR times the
    tolerance (at the rollout's temperature), passes in doubt; past that bound, it is a strike."""
    tolerance = float(score_tolerance(BF16_TOLERANCE, temperature))
    doubt = _sampling_verdict([E, M, E, E], [0.0, 1.5 * tolerance, 0.0, 0.0], temperature)
    assert doubt.passed and doubt.suspect and doubt.check == "sampling_doubt"
    assert doubt.evidence["num_mismatches"] == 1 and doubt.evidence["allowed_score_gap"] == pytest.approx(tolerance)
    assert doubt.evidence["doubt_score_gap"] == pytest.approx(DOUBT_GAP_FACTOR * tolerance)
    struck = _sampling_verdict([E, M, E, E], [0.0, 1.01 * DOUBT_GAP_FACTOR * tolerance, 0.0, 0.0], temperature)
    assert not struck.passed and struck.check == "sampling" and struck.evidence["positions"] == [1]


def test_two_mismatches_are_a_strike_however_close():
    assert MAX_DOUBTED_MISMATCHES == 1
    struck = _sampling_verdict([M, E, M, E], [1.1 * BF16_TOLERANCE, 0.0, 1.1 * BF16_TOLERANCE, 0.0])
    assert not struck.passed and struck.check == "sampling" and struck.evidence["num_mismatches"] == 2


def test_a_mismatch_within_the_tolerance_is_a_token_the_filters_cut_and_a_strike():
    """A mismatch at a score gap within the tolerance is one the node's filters cut for certain
    (protocol.sampling.filter_band): no drift explains it."""
    struck = _sampling_verdict([E, M, E], [0.0, 0.5 * BF16_TOLERANCE, 0.0])
    assert not struck.passed and struck.check == "sampling"


def test_a_claim_just_outside_the_filter_band_is_doubt_once_per_rollout():
    """Issue 16: an honest vLLM bf16 token fell outside the validator's top-p set at a score gap of 0,
    the nucleus moved by the end-of-sequence logit's drift. A FILTER_DOUBT (inside the band at
    FILTER_DOUBT_FACTOR times the tolerance) passes in doubt and counts as a near-tie; two in a
    rollout, or one beside another mismatch, are a strike."""
    doubt = _sampling_verdict([E, F, E], [0.0, 0.0, 0.0])
    assert doubt.passed and doubt.check == "sampling_doubt" and doubt.evidence["num_mismatches"] == 1
    report = _sampling_report([E, F, N], [0.0, 0.0, 0.1])
    verdict = group_verdict(_group_job("bfloat16", num_rollouts=1), [report], TOLERANCES["bfloat16"])
    assert verdict.passed and verdict.check == "sampling_doubt" and verdict.tokens.num_near_ties == 2
    for verdicts, gaps in (([F, E, F], [0.0, 0.0, 0.0]), ([F, M, E], [0.0, 1.5 * BF16_TOLERANCE, 0.0])):
        struck = _sampling_verdict(verdicts, gaps)
        assert not struck.passed and struck.check == "sampling" and struck.evidence["num_mismatches"] == 2


def test_a_doubted_mismatch_counts_as_a_near_tie_for_the_budget_and_the_nodes_statistics():
    """A doubted token is a choice a node could steer: it spends the per-rollout near-tie budget and
    joins the node's token window as a near-tie, where the rate, direction and temperature tests
    (coordinator/node_stats.py) judge a node that doubts far more often than honest drift."""
    allowed = max_near_ties(6, TOLERANCES["bfloat16"].near_tie_rate)
    near_ties = [N] * allowed
    assert _sampling_verdict([*near_ties, E, E], [0.1] * allowed + [0.0, 0.0]).check == "all"
    over = _sampling_verdict([*near_ties, M, E], [0.1] * allowed + [1.5 * BF16_TOLERANCE, 0.0])
    assert not over.passed and over.check == "near_ties"
    report = _sampling_report([E, M, E, N], [0.0, 1.5 * BF16_TOLERANCE, 0.0, 0.1])
    verdict = group_verdict(_group_job("bfloat16", num_rollouts=1), [report], TOLERANCES["bfloat16"])
    assert verdict.passed and verdict.check == "sampling_doubt" and verdict.tokens.num_near_ties == 2


def test_a_sampling_doubt_on_a_stop_needs_a_likely_eos():
    """The termination rule holds a doubted EOS to the floor of a near-tie."""
    report = dataclasses.replace(
        _sampling_report([E, E, M], [0.0, 0.0, 1.5 * BF16_TOLERANCE]),
        token_checks=TokenChecks(
            np.array([E, E, M], dtype=np.int8),
            np.array([-0.1, -0.2, math.log(4.4e-5)], dtype=np.float32),
            np.array([0.0, 0.0, 1.5 * BF16_TOLERANCE], dtype=np.float32),
        ),
    )
    rollout = Rollout(0, (7, 8, EOS), (True,) * 3, (-0.1, -0.2, math.log(4.4e-5)), b"", FinishReason.STOP, 0.0)
    tolerances = TOLERANCES["bfloat16"]
    verdict = check_rollout(report, rollout, tolerances)
    assert not verdict.passed and verdict.check == "termination"


def test_one_token_drifting_just_past_the_bound_is_doubt_in_bf16_only():
    """Issue 16: 8 of 78,144 honest bf16 rollouts replayed on the other attention kernel had one token
    over the drift bound, at most 1.71 times it (0.682 against 0.4 at T = 1). Such a token passes in
    doubt; fp32 (honest drift 60 times under its bound) has no doubt band: a weight change caught at
    1.3 times the bound stays a strike."""
    bf16 = TOLERANCES["bfloat16"]
    for drift, temperature in ((0.682, 1.0), (0.761, 0.7)):
        doubt = _verdict(TokenVerdict.EXACT, -1.0, dtype="bfloat16", drift=drift, temperature=temperature)
        assert doubt.passed and doubt.suspect and doubt.check == "logprob_drift_doubt"
        bound = bf16.drift_doubt_factor * bf16.max_logprob_drift / temperature
        assert doubt.evidence["doubt_drift"] == pytest.approx(bound)
    fp32 = TOLERANCES["float32"]
    assert fp32.drift_doubt_factor == 1.0
    struck = _verdict(TokenVerdict.EXACT, -1.0, drift=1.3 * fp32.max_logprob_drift)
    assert not struck.passed and struck.check == "logprob_drift"


def _naive_allowance(num_tokens: int, rate: float, false_positive_rate: float) -> int:
    """The smallest k >= 1 (at most num_tokens) that Binomial(num_tokens, rate) exceeds with
    probability at most false_positive_rate, from the exact binomial sum in rationals."""
    p, bound = Fraction(str(rate)), Fraction(str(false_positive_rate))
    # P(X = j) = numerators[j] / p.denominator ** num_tokens, in integers
    numerators = [
        math.comb(num_tokens, j) * p.numerator**j * (p.denominator - p.numerator) ** (num_tokens - j)
        for j in range(num_tokens + 1)
    ]
    denominator = p.denominator**num_tokens
    return next(
        k
        for k in range(1, num_tokens + 1)
        if k == num_tokens or sum(numerators[k + 1 :]) * bound.denominator <= bound.numerator * denominator
    )


@pytest.mark.parametrize("num_tokens", [1, 2, 3, 5, 6, 16, 19, 20, 32, 72, 73, 200, 1000])
def test_the_drift_tokens_a_rollout_may_hold_in_doubt_follow_the_binomial_bound(num_tokens):
    """max_doubted_drift_tokens against the exact binomial sum: the smallest k >= 1 that an honest
    rollout (each token over the bound at HONEST_DRIFT_DOUBT_RATE) exceeds with probability at most
    DRIFT_DOUBT_FALSE_POSITIVE_RATE."""
    expected = _naive_allowance(num_tokens, HONEST_DRIFT_DOUBT_RATE, DRIFT_DOUBT_FALSE_POSITIVE_RATE)
    assert max_doubted_drift_tokens(num_tokens) == expected


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("num_tokens", [1, 2, 3, 5, 16, 32, 64, 256, 1024])
def test_a_rollouts_near_tie_budget_follows_the_binomial_bound_at_its_precisions_rate(dtype, num_tokens):
    """max_near_ties against the exact binomial sum at the declared precision's near-tie rate bound,
    and check_rollout holds a rollout to it: its budget of near-ties passes, one more is a strike."""
    rate = TOLERANCES[dtype].near_tie_rate
    assert rate == NEAR_TIE_RATE_BOUND[dtype]
    allowed = _naive_allowance(num_tokens, rate, NEAR_TIE_FALSE_POSITIVE_RATE)
    assert max_near_ties(num_tokens, rate) == allowed
    if allowed == num_tokens:
        return
    rollout = Rollout(0, (7,) * num_tokens, (True,) * num_tokens, (-0.5,) * num_tokens, b"", FinishReason.LENGTH, 0.0)

    def verdict(num_near_ties: int) -> Verdict:
        ties = [N] * num_near_ties + [E] * (num_tokens - num_near_ties)
        gaps = [0.1 * BF16_TOLERANCE] * num_near_ties + [0.0] * (num_tokens - num_near_ties)
        return check_rollout(_sampling_report(ties, gaps), rollout, TOLERANCES[dtype])

    assert verdict(allowed).check == "all"
    over = verdict(allowed + 1)
    assert not over.passed and over.check == "near_ties" and over.evidence["allowed"] == allowed


def test_the_near_tie_budget_is_tighter_than_a_tenth_of_long_rollouts_and_of_short_ones():
    """Issue 16: the earlier budget, max(4, 10% of the tokens), allowed 4 of a 5-token completion
    and 103 of 1,024."""
    bf16 = NEAR_TIE_RATE_BOUND["bfloat16"]
    assert max_near_ties(5, bf16) == 3 and max_near_ties(1024, bf16) == 37
    assert max_near_ties(5, NEAR_TIE_RATE_BOUND["float32"]) == 2


@pytest.mark.parametrize("num_tokens", [3, 32])
def test_a_rollout_may_hold_as_many_drift_doubts_as_its_length_allows_and_one_more_is_a_strike(num_tokens):
    """Issue 16: an honest vLLM bf16 rollout held two tokens over the drift bound (the EOS logit moves
    the last tokens together). Up to max_doubted_drift_tokens(n) such tokens within the doubt band
    pass in doubt; one more, or one past the band, is a strike."""
    bf16 = TOLERANCES["bfloat16"]
    allowed = max_doubted_drift_tokens(num_tokens)
    assert allowed >= 2
    rollout = Rollout(0, (7,) * num_tokens, (True,) * num_tokens, (-0.5,) * num_tokens, b"", FinishReason.LENGTH, 0.0)

    def verdict(drifts):
        report = dataclasses.replace(
            _sampling_report([E] * num_tokens, [0.0] * num_tokens), logprob_drift=np.array(drifts, dtype=np.float32)
        )
        return check_rollout(report, rollout, bf16)

    over = 1.5 * bf16.max_logprob_drift
    doubt = verdict([over] * allowed + [0.0] * (num_tokens - allowed))
    assert doubt.passed and doubt.check == "logprob_drift_doubt" and doubt.evidence["max_doubted_tokens"] == allowed
    if allowed < num_tokens:
        one_more = verdict([over] * (allowed + 1) + [0.0] * (num_tokens - allowed - 1))
        assert not one_more.passed and one_more.check == "logprob_drift"
    past_band = verdict([1.01 * bf16.drift_doubt_factor * bf16.max_logprob_drift] + [0.0] * (num_tokens - 1))
    assert not past_band.passed and past_band.check == "logprob_drift"


def test_a_node_doubted_far_more_often_than_honest_nodes_fails_on_its_doubt_rate(tmp_path):
    """Doubts buy more checks of a node, not an unbounded run of them: past the binomial bound on its
    last DOUBT_WINDOW_GROUPS full checks (8 doubts of 64 at HONEST_DOUBT_RATE_BOUND), the doubt fails."""
    store, queue = _checking_queue(tmp_path, window_chunks=8, window_tokens=100)
    groups = _pending_groups(store, "n", "torch-cpu-bfloat16", 10)
    doubt = Verdict(True, "sampling_doubt", {"num_mismatches": 1}, (), TokenStats(num_tokens=10))
    queue.report([(group_id, doubt) for group_id in groups[:6]])
    queue.report([(groups[6], doubt)])
    assert store.get_node("n").num_strikes == 0 and store.get_group(groups[6]).state is GroupState.PROBATION
    queue.report([(groups[7], doubt)])
    node = store.get_node("n")
    assert node.num_strikes == 1 and store.get_group(groups[7]).state is GroupState.REJECTED
    failure = store.list_validations("n", 1)[0]
    assert failure.check_name == "node_doubt_rate" and json.loads(failure.evidence_json)["num_doubts"] == 8
    assert binomial_upper_tail(7, DOUBT_WINDOW_GROUPS, HONEST_DOUBT_RATE_BOUND) > FALSE_POSITIVE_RATE
    store.close()
