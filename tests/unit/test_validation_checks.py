"""The full checks of one replayed rollout (coordinator.validation.check_rollout) on made-up
replay reports: the termination rule, and the log-probability drift bound at a temperature; and
the validator's device setting."""

import math

import numpy as np
import pytest
import torch

from coordinator.validation import (
    MIN_EOS_LOGPROB,
    TOLERANCES,
    GroupChecker,
    GroupJob,
    NodeChunkWindows,
    check_rollout,
)
from policy.engine import GenerationRequest
from policy.model import ModelLoadError
from policy.prefill import ReplayReport
from protocol import commitment
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


def test_node_windows_pool_the_last_chunks_like_the_reference():
    """NodeChunkWindows keeps three numbers a chunk in a ring; once full, its statistics equal
    commitment.pool over the node's last chunks."""
    rng = np.random.default_rng(4)
    windows = NodeChunkWindows(num_chunks=20)
    history = {"a": [], "b": []}
    for step in range(12):
        node = "a" if step % 3 else "b"
        checks = [commitment.ChunkCheck(int(rng.integers(0, 4)), float(rng.uniform(0, 2)), 0.0, int(rng.integers(60, 129)))
                  for _ in range(int(rng.integers(1, 6)))]
        history[node].extend(checks)
        pooled = windows.add(node, checks)
        if len(history[node]) < 20:
            assert pooled is None
            continue
        reference = commitment.pool(history[node][-20:])
        assert pooled.num_chunks == reference.num_chunks == 20
        assert math.isclose(pooled.exponent_mismatches_per_chunk, reference.exponent_mismatches_per_chunk)
        assert math.isclose(pooled.mantissa_error_mean, reference.mantissa_error_mean, rel_tol=1e-12)
    assert len(history["a"]) >= 20


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


def test_a_deviation_each_group_hides_shows_in_the_nodes_window(tiny_model):
    """int8 linear layers in bf16 under a bf16 declaration: a group of 8 one-chunk rollouts is too
    few chunks for the pooled check, and most groups pass; once the node's window of chunks is
    full, its groups fail it. An honest bf16 node's window passes."""
    from policy.model import load_model
    from policy.tokenizer import load_tokenizer
    from policy.weights import export_bf16_state
    from tests.adversarial.test_attacks import int8_linear_weights

    tokenizer = load_tokenizer(tiny_model)
    trusted = load_model(tiny_model, dtype="bfloat16")
    checker = GroupChecker(FixedHistory(export_bf16_state(trusted)), tiny_model)
    checker.node_windows = NodeChunkWindows(num_chunks=128)
    cheat = int8_linear_weights(trusted)
    verdicts = checker.check(_groups_of(cheat, tokenizer, 32, "cheat") + _groups_of(trusted, tokenizer, 24, "honest"))
    cheat_checks = [v.check for v in verdicts[:32]]
    first_window_failure = cheat_checks.index("commitment_node_pooled")
    assert first_window_failure >= 128 // 8 - 1  # the 16th group of 8 chunks fills the window
    assert cheat_checks[:first_window_failure].count("all") >= first_window_failure - 2
    assert set(cheat_checks[first_window_failure:]) <= {"commitment_node_pooled", "commitment"}
    window = next(v for v in verdicts if v.check == "commitment_node_pooled").evidence
    assert window["num_chunks"] == 128 and window["mantissa_error_mean"] > window["allowed"]["mantissa_error_mean"]
    assert [v.check for v in verdicts[32:]] == ["all"] * 24
