"""The full checks of one replayed rollout (coordinator.validation.check_rollout) on made-up
replay reports: the termination rule, and the log-probability drift bound at a temperature; and
the validator's device setting."""

import json
import math

import numpy as np
import pytest
import torch

from coordinator.store import ChunkStats, GroupState, open_store, sqlite_url
from coordinator.validation import (
    MIN_EOS_LOGPROB,
    TOLERANCES,
    GroupChecker,
    GroupJob,
    SamplingPolicy,
    ValidationQueue,
    Verdict,
    check_rollout,
    chunk_stats,
    verdict_from_proto,
    verdict_to_proto,
)
from policy.engine import GenerationRequest
from policy.model import ModelLoadError
from policy.prefill import ReplayReport
from protocol import commitment
from protocol.proto import validation_pb2
from protocol.sampling import TokenChecks, TokenVerdict
from protocol.types import FinishReason, Rollout

EOS = 2


def _verdict(last_token_verdict: TokenVerdict, eos_logprob: float, finish_reason=FinishReason.STOP, *,
             dtype: str = "float32", drift: float = 0.0, temperature: float = 1.0):
    logprobs = np.array([-0.1, -0.2, eos_logprob], dtype=np.float32)
    report = ReplayReport(
        token_checks=TokenChecks(np.array([TokenVerdict.EXACT, TokenVerdict.EXACT, last_token_verdict]), logprobs,
                                 np.zeros(3, dtype=np.float32)),
        logprob_drift=np.array([0.0, drift, 0.0], dtype=np.float32),
        commitment_checks=[commitment.ChunkCheck(0, 0.0, 0.0, 128)],
        temperature=temperature,
    )
    rollout = Rollout(sample_index=0, token_ids=(7, 8, EOS), sampled_mask=(True,) * 3,
                      logprobs=tuple(float(x) for x in logprobs), commitment=b"", finish_reason=finish_reason,
                      claimed_reward=0.0)
    tolerances = TOLERANCES[dtype]
    return check_rollout(report, rollout, logit_tolerance=tolerances.logit_tolerance,
                         max_logprob_drift=tolerances.max_logprob_drift, thresholds=tolerances.thresholds)


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
    assert _verdict(TokenVerdict.EXACT, -1.0, dtype="bfloat16", drift=0.36, temperature=0.7).passed
    verdict = _verdict(TokenVerdict.EXACT, -1.0, dtype="bfloat16", drift=1.1 * bound, temperature=1.0)
    assert not verdict.passed and verdict.check == "logprob_drift"
    assert verdict.evidence["allowed"] == bound and verdict.evidence["positions"] == [1]
    slow = _verdict(TokenVerdict.EXACT, -1.0, dtype="bfloat16", drift=1.1 * bound / 0.5, temperature=0.5)
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
    checks = [commitment.ChunkCheck(int(rng.integers(0, 4)), float(rng.uniform(0, 2)), 0.0,
                                    int(rng.integers(60, 129))) for _ in range(40)] + [commitment.ChunkCheck(3, 0.0, 0.0, 3)]
    stats = [chunk_stats(c) for c in checks]
    pooled = commitment.PooledCheck.from_sums(len(stats), sum(s.exponent_mismatches for s in stats),
                                              sum(s.mantissa_error_sum for s in stats), sum(s.num_matched for s in stats))
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
            [GenerationRequest(prompt, params, seed) for seed in seeds])
        rollouts = tuple(Rollout(sample, r.token_ids, (True,) * len(r.token_ids), r.logprobs, r.commitment,
                                 r.finish_reason, 0.0) for sample, r in enumerate(results))
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
    from tests.unit.test_store_contract import T0, _fresh_factory, _submission

    tokenizer = load_tokenizer(tiny_model)
    trusted = load_model(tiny_model, dtype="bfloat16")
    checker = GroupChecker(FixedHistory(export_bf16_state(trusted)), tiny_model)
    cheat_jobs = _groups_of(int8_linear_weights(trusted), tokenizer, 32, "cheat")
    honest_jobs = _groups_of(trusted, tokenizer, 24, "honest")
    verdicts = checker.check(cheat_jobs + honest_jobs)
    cheat_verdicts = [v for v in verdicts[:32] if v.passed]
    assert len(cheat_verdicts) >= 30
    assert all(v.passed for v in verdicts[32:])

    store = open_store(sqlite_url(tmp_path))
    queue = ValidationQueue(store, prompt_of=None, policy=SamplingPolicy(), clock=lambda: T0, window_chunks=128)

    def report_one_by_one(node_id: str, node_verdicts) -> list[GroupState]:
        store.register_node(node_id, node_id.encode().ljust(32, b"k"), node_id, "torch-cpu-bfloat16", "cpu", "0", T0)
        lease = store.issue_lease(node_id, T0, 1, _fresh_factory(node_id, prompts_per_lease=len(node_verdicts)))
        submission = _submission(lease, node_id.encode(), state=GroupState.PENDING_VALIDATION)
        store.record_submission(submission)
        for group, verdict in zip(submission.groups, node_verdicts):
            queue.report([(group.group_id, verdict)])
        return [store.get_group(group.group_id).state for group in submission.groups]

    cheat_states = report_one_by_one("cheat", cheat_verdicts)
    caught = cheat_states.index(GroupState.REJECTED)
    assert caught == 128 // 8 - 1  # the 16th group of 8 chunks fills the window
    assert set(cheat_states) == {GroupState.REJECTED, GroupState.QUARANTINED}
    failure = store.list_validations("cheat", 1)[0]
    assert failure.check_name == "commitment_node_pooled"
    window = json.loads(failure.evidence_json)
    assert window["num_chunks"] == 128 and window["mantissa_error_mean"] > window["allowed"]["mantissa_error_mean"]
    assert report_one_by_one("honest", verdicts[32:]) == [GroupState.READY] * 24
    store.close()
