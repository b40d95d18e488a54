"""The full checks of one replayed rollout (coordinator.validation.check_rollout) on made-up
replay reports: the termination rule, and the log-probability drift bound at a temperature; and
the validator's device setting."""

import math

import numpy as np
import pytest
import torch

from coordinator.validation import MIN_EOS_LOGPROB, TOLERANCES, GroupChecker, check_rollout
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
