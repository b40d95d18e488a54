"""The node-level token statistics (coordinator/node_stats.py): each bound against a naive reference,
each test's false-positive rate against simulation of honest windows, and what each test catches."""

import dataclasses
import math
from fractions import Fraction

import numpy as np
import pytest

from coordinator import node_stats
from coordinator.node_stats import (
    NODE_WINDOW_TOKENS,
    RolloutTokens,
    bennett_log_e_value,
    bernstein_upper_bound,
    binomial_log_e_value,
    binomial_upper_tail,
    fisher_combined,
    group_token_stats,
    judge_lifetime,
    judge_tokens,
    one_way_count_test,
    self_normalized_bound,
    sign_test,
)
from coordinator.store import TokenStats


def naive_upper_tail(successes: int, trials: int, probability: float) -> float:
    """The exact sum, in integers: the probability as the decimal fraction a / b."""
    p = Fraction(str(probability))
    a, b = p.numerator, p.denominator
    total = sum(math.comb(trials, k) * a**k * (b - a) ** (trials - k) for k in range(max(0, successes), trials + 1))
    return float(Fraction(total, b**trials))


@pytest.mark.parametrize(
    ("successes", "trials", "probability"),
    [
        (0, 10, 0.3),
        (3, 10, 0.2),
        (10, 10, 0.5),
        (11, 10, 0.5),
        (60, 100, 0.5),
        (2, 400, 0.001),
        (45, 4096, 0.007),
        (90, 4096, 0.015),
    ],
)
def test_the_binomial_tail_equals_the_exact_sum(successes, trials, probability):
    assert binomial_upper_tail(successes, trials, probability) == pytest.approx(
        naive_upper_tail(successes, trials, probability), rel=1e-9, abs=1e-300
    )


def test_the_sign_test_is_two_sided_and_exact():
    assert sign_test(0, 0) == 1.0
    assert sign_test(20, 20) == pytest.approx(2 * 0.5**20)
    assert sign_test(0, 20) == sign_test(20, 20)
    assert sign_test(15, 20) == pytest.approx(2 * naive_upper_tail(15, 20, 0.5))
    assert sign_test(10, 20) == 1.0


def test_the_one_way_count_test_is_twice_the_smaller_binomial_tail():
    assert one_way_count_test(0, 0, 4096, 2.5e-4) == 1.0
    assert one_way_count_test(12, 1, 4096, 2.5e-4) == pytest.approx(2 * naive_upper_tail(12, 4096, 2.5e-4), rel=1e-9)
    assert one_way_count_test(1, 12, 4096, 2.5e-4) == one_way_count_test(12, 1, 4096, 2.5e-4)
    assert one_way_count_test(2, 1, 4096, 2.5e-4) == pytest.approx(2 * naive_upper_tail(2, 4096, 2.5e-4), rel=1e-9)
    assert one_way_count_test(1, 1, 4096, 2.5e-4) == 1.0  # twice a tail of 0.64


def _honest_windows(rng, num_windows, rate, *, num_groups=64, group_size=8, wide_rate=None):
    """Windows of groups whose near-ties fall on any token alike, whose rewards are independent of
    them, and whose log-probability offsets are noise with an engine's constant bias. Near-ties are
    wide (score gap over WIDE_GAP_FRACTION of the tolerance) at wide_rate a token (the bf16 bound)."""
    wide_rate = node_stats.WIDE_NEAR_TIE_RATE_BOUND["bfloat16"] if wide_rate is None else wide_rate
    windows = []
    for _ in range(num_windows):
        window = TokenStats()
        for _ in range(num_groups):
            rollouts = []
            for _ in range(group_size):
                length = int(rng.integers(1, 17))
                near_ties = rng.random(length) < rate
                wide = rng.random(length) < wide_rate / rate
                gaps = np.where(
                    wide, rng.uniform(node_stats.WIDE_GAP_FRACTION, 1.0, length), rng.uniform(0, 0.3, length)
                )
                rollouts.append(
                    RolloutTokens(
                        near_ties,
                        np.where(near_ties, rng.choice([-1.0, 1.0], length), 0.0).astype(np.float32),
                        np.where(near_ties, gaps, 0.0).astype(np.float32),
                        (0.02 + 0.05 * rng.standard_normal(length)).astype(np.float32),
                        float(rng.choice([0.7, 1.0])),
                        float(rng.random() < 0.3),
                    )
                )
            window += group_token_stats(rollouts)
        windows.append(window)
    return windows


def test_each_test_flags_honest_windows_at_most_at_its_stated_rate():
    """At a stated rate of 2%, over 300 simulated honest windows: each test's empirical rate stays
    below it (the bounds are conservative; the rate test runs at its bound's own rate)."""
    rng = np.random.default_rng(7)
    stated = 0.02
    windows = _honest_windows(rng, 300, node_stats.NEAR_TIE_RATE_BOUND["bfloat16"], num_groups=16)
    p_values = {
        "node_near_tie_rate": [
            binomial_upper_tail(w.num_near_ties, w.num_tokens, node_stats.NEAR_TIE_RATE_BOUND["bfloat16"])
            for w in windows
        ],
        "node_near_tie_direction": [
            bernstein_upper_bound(
                w.num_near_ties_positive - w.near_ties_positive_expected, w.near_ties_positive_variance
            )
            for w in windows
        ],
        "node_logprob_direction": [
            self_normalized_bound(w.logprob_advantage_sum, w.logprob_advantage_sum_squares) for w in windows
        ],
        "node_temperature_fit": [
            one_way_count_test(
                w.num_near_ties_up,
                w.num_directed_near_ties - w.num_near_ties_up,
                w.num_tokens,
                node_stats.WIDE_NEAR_TIE_RATE_BOUND["bfloat16"] / 2,
            )
            for w in windows
        ],
    }
    p_values["node_near_ties_combined"] = [
        fisher_combined(
            [
                p_values["node_near_tie_rate"][i],
                p_values["node_near_tie_direction"][i],
                sign_test(w.num_near_ties_up, w.num_directed_near_ties),
            ]
        )
        for i, w in enumerate(windows)
    ]
    for check, values in p_values.items():
        assert np.mean(np.array(values) < stated) <= stated, check


def test_group_statistics_equal_a_token_by_token_count():
    rng = np.random.default_rng(3)
    rollouts = []
    for index in range(6):
        length = 5 + index
        near_ties = rng.random(length) < 0.4
        lifts = np.where(near_ties, rng.normal(size=length), 0.0).astype(np.float32)
        lifts[0] = 0.0  # a near-tie between equal logits has no direction
        rollouts.append(
            RolloutTokens(
                near_ties,
                lifts,
                np.where(near_ties, rng.uniform(0.0, 1.0, length), 0.0).astype(np.float32),
                rng.normal(size=length).astype(np.float32),
                0.0 if index == 5 else 0.8,
                [1.0, 0.0, 0.0, 0.5, 1.0, 0.0][index],
            )
        )
    stats = group_token_stats(rollouts)
    mean_reward = np.mean([r.reward for r in rollouts])
    expected = dict(
        num_tokens=0, num_near_ties=0, num_directed_near_ties=0, num_near_ties_up=0, num_near_ties_positive=0
    )
    tokens_positive = tokens_signed = near_ties_signed = 0
    logprob_terms = []
    for r in rollouts:
        advantage = r.reward - mean_reward
        for position in range(len(r.near_ties)):
            expected["num_tokens"] += 1
            if advantage > 0:
                tokens_positive += 1
            if advantage != 0:
                tokens_signed += 1
            if r.near_ties[position]:
                expected["num_near_ties"] += 1
                near_ties_signed += advantage != 0
                expected["num_near_ties_positive"] += advantage > 0
                wide = r.score_gaps[position] > node_stats.WIDE_GAP_FRACTION
                if r.temperature > 0 and r.near_tie_lifts[position] != 0 and wide:
                    expected["num_directed_near_ties"] += 1
                    expected["num_near_ties_up"] += r.near_tie_lifts[position] > 0
        ordered = sorted(float(offset) for offset in r.logprob_offsets)
        middle = len(ordered) // 2
        median = ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
        logprob_terms.append(advantage * (r.temperature or 1.0) * median)
    for name, value in expected.items():
        assert getattr(stats, name) == value, name
    share = tokens_positive / tokens_signed
    assert stats.near_ties_positive_expected == pytest.approx(near_ties_signed * share)
    assert stats.near_ties_positive_variance == pytest.approx(near_ties_signed * share * (1 - share))
    assert stats.logprob_advantage_sum == pytest.approx(sum(logprob_terms))
    assert stats.logprob_advantage_sum_squares == pytest.approx(sum(t * t for t in logprob_terms))
    assert group_token_stats([]) == TokenStats()


def _window(**overrides) -> TokenStats:
    honest = dict(
        num_tokens=NODE_WINDOW_TOKENS,
        num_near_ties=28,
        num_directed_near_ties=2,
        num_near_ties_up=1,
        num_near_ties_positive=6,
        near_ties_positive_expected=5.5,
        near_ties_positive_variance=4.5,
        logprob_advantage_sum=0.3,
        logprob_advantage_sum_squares=0.5,
    )
    return TokenStats(**{**honest, **overrides})


def test_a_window_decides_only_once_it_holds_enough_tokens():
    thin = judge_tokens(_window(num_tokens=NODE_WINDOW_TOKENS - 1, num_near_ties=400), "bfloat16")
    assert not thin.decided and thin.failure is None and not thin.passed
    honest = judge_tokens(_window(), "bfloat16")
    assert honest.decided and honest.passed


@pytest.mark.parametrize(
    ("overrides", "check"),
    [
        ({"num_near_ties": 140}, "node_near_tie_rate"),  # steering: ~3.4% of tokens
        ({"num_near_ties_positive": 26}, "node_near_tie_direction"),  # near-ties where the reward is
        ({"logprob_advantage_sum": 4.0, "logprob_advantage_sum_squares": 0.5}, "node_logprob_direction"),
        # wide near-ties always the likelier token (colder, or filtered), or the less likely one (hotter)
        ({"num_directed_near_ties": 12, "num_near_ties_up": 12}, "node_temperature_fit"),
        ({"num_directed_near_ties": 12, "num_near_ties_up": 0}, "node_temperature_fit"),
    ],
)
def test_each_directed_deviation_fails_its_test_with_evidence(overrides, check):
    judgement = judge_tokens(_window(**overrides), "bfloat16")
    assert judgement.decided and judgement.failure is not None
    assert judgement.failure.check == check
    evidence = judgement.failure.evidence
    assert evidence["p_value"] < evidence["false_positive_rate"] == node_stats.FALSE_POSITIVE_RATE


def test_fishers_combination_equals_the_chi_square_tail_and_is_uniform_under_the_null():
    """k = 1 is the p-value itself, k = 2 the closed form p1 p2 (1 - log p1 p2); over independent
    uniform p-values the combination of three flags at most its stated rate."""
    assert fisher_combined([]) == 1.0
    assert fisher_combined([0.03]) == pytest.approx(0.03)
    product = 0.2 * 0.01
    assert fisher_combined([0.2, 0.01]) == pytest.approx(product * (1 - math.log(product)))
    assert fisher_combined([0.0, 0.5, 0.5]) < 1e-300  # an underflowed tail still combines
    rng = np.random.default_rng(11)
    combined = np.array([fisher_combined(list(p)) for p in rng.random((20_000, 3))])
    for stated in (0.001, 0.01, 0.1):
        assert np.mean(combined < stated) <= 1.2 * stated + 3 * math.sqrt(stated / 20_000)


def test_near_ties_steered_within_every_single_bound_fail_the_combination():
    """Near-ties steered toward the answer, taken only at narrow score gaps (so few are wide for
    node_temperature_fit): every single near-tie test passes (p from 3.2e-6 to 0.22), their
    combination does not (6.1e-7). Steering at any gap, as issue 16's attacker did (two thirds of its
    near-ties wide), fails node_temperature_fit outright."""
    window = _window(
        num_near_ties=100,
        num_directed_near_ties=6,
        num_near_ties_up=5,
        num_near_ties_positive=33,
        near_ties_positive_expected=20.0,
        near_ties_positive_variance=11.0,
    )
    p_values = {
        "rate": binomial_upper_tail(100, NODE_WINDOW_TOKENS, node_stats.NEAR_TIE_RATE_BOUND["bfloat16"]),
        "direction": bernstein_upper_bound(13.0, 11.0),
        "temperature": one_way_count_test(
            5, 1, NODE_WINDOW_TOKENS, node_stats.WIDE_NEAR_TIE_RATE_BOUND["bfloat16"] / 2
        ),
    }
    assert min(p_values.values()) > node_stats.FALSE_POSITIVE_RATE, p_values
    judgement = judge_tokens(window, "bfloat16")
    assert judgement.failure is not None and judgement.failure.check == "node_near_ties_combined"
    assert judgement.failure.evidence["p_value"] < node_stats.FALSE_POSITIVE_RATE
    at_any_gap = judge_tokens(dataclasses.replace(window, num_directed_near_ties=70, num_near_ties_up=47), "bfloat16")
    assert at_any_gap.failure is not None and at_any_gap.failure.check == "node_temperature_fit"


def test_an_unasked_top_p_is_caught_at_its_first_window_with_room():
    """Issue 16.4's thin run: its first window held at most 20 directed near-ties (sign test
    2 * 2^-20 = 1.9e-6 passed 1e-6), every one the likelier token. Two thirds of them wide (13),
    node_temperature_fit gives p = 4.3e-8, 23 times under the bound; at 14, 200 times."""
    for num_wide, p_max in ((13, 5e-8), (14, 5e-9)):
        window = _window(num_near_ties=20, num_directed_near_ties=num_wide, num_near_ties_up=num_wide)
        judgement = judge_tokens(window, "bfloat16")
        assert judgement.failure is not None and judgement.failure.check == "node_temperature_fit"
        assert judgement.failure.evidence["p_value"] < p_max


def test_an_fp32_node_is_held_to_the_fp32_near_tie_rate():
    assert (
        judge_tokens(_window(num_near_ties=28, num_directed_near_ties=0, num_near_ties_up=0), "float32").failure.check
        == "node_near_tie_rate"
    )
    with pytest.raises(ValueError, match="no honest near-tie rate"):
        judge_tokens(_window(), "float16")


def test_token_statistics_travel_with_a_passed_verdict_and_bad_ones_are_refused():
    from coordinator.validation import verdict_from_proto, verdict_to_proto
    from coordinator.verdicts import Verdict

    stats = _window()
    message = verdict_to_proto("g", Verdict(True, "all", {}, (), stats))
    assert verdict_from_proto(message) == ("g", Verdict(True, "all", {}, (), stats))
    assert verdict_from_proto(verdict_to_proto("g", Verdict(True, "all", {})))[1].tokens is None
    failed = verdict_to_proto("g", Verdict(False, "sampling", {}, (), stats))
    with pytest.raises(ValueError, match="only a passed group's token statistics"):
        verdict_from_proto(failed)
    for bad in ({"num_near_ties_up": 27}, {"near_ties_positive_variance": -1.0}, {"logprob_advantage_sum": math.inf}):
        with pytest.raises(ValueError, match="group 'g'"):
            verdict_from_proto(verdict_to_proto("g", Verdict(True, "all", {}, (), _window(**bad))))


def test_the_binomial_e_value_is_the_mean_likelihood_ratio():
    count, trials, rate = 7, 300, 0.01
    ratios = [
        (m * rate) ** count * (1 - m * rate) ** (trials - count) / (rate**count * (1 - rate) ** (trials - count))
        for m in node_stats.RATE_MULTIPLES
    ]
    # The e-value bounds each ratio's binomial term by Bernoulli(m rate)'s: (1 - m r)/(1 - r) <= ...
    expected = np.mean([m**count * (1 + rate * (m - 1)) ** -trials for m in node_stats.RATE_MULTIPLES])
    assert math.exp(binomial_log_e_value(count, trials, rate)) == pytest.approx(expected, rel=1e-12)
    assert binomial_log_e_value(0, 0, rate) == pytest.approx(0.0, abs=1e-12)
    assert max(ratios) > 1.0  # 7 events where 3 are expected: some alternative is likelier


def test_the_bennett_e_value_is_the_mean_over_its_lambdas():
    excess, variance, slack = 3.0, 2.5, 0.1
    expected = np.mean(
        [
            math.exp(lam * (excess - slack * variance) - (math.exp(lam) - 1 - lam) * variance)
            for lam in node_stats.DIRECTION_LAMBDAS
        ]
    )
    assert math.exp(bennett_log_e_value(excess, variance, slack)) == pytest.approx(expected, rel=1e-12)
    assert bennett_log_e_value(0.0, 0.0, slack) == pytest.approx(0.0, abs=1e-12)


def _honest_window_stats(rng, rate: float, *, share: float = 0.3, bias: float = 0.0) -> TokenStats:
    """One window of NODE_WINDOW_TOKENS honest tokens, drawn at the level of its sums: near-ties at
    `rate` (wide ones, at the bf16 bound, each way alike, among them), 60% of them in rollouts of
    nonzero advantage, each of those in a rollout of positive advantage with probability share (+ bias)."""
    wide_each_way = node_stats.WIDE_NEAR_TIE_RATE_BOUND["bfloat16"] / 2
    num_near_ties = int(rng.binomial(NODE_WINDOW_TOKENS, rate - 2 * wide_each_way))
    num_signed = int(rng.binomial(num_near_ties, 0.6))
    num_up, num_down = (int(n) for n in rng.binomial(NODE_WINDOW_TOKENS, wide_each_way, 2))
    return TokenStats(
        num_tokens=NODE_WINDOW_TOKENS,
        num_near_ties=num_near_ties + num_up + num_down,
        num_directed_near_ties=num_up + num_down,
        num_near_ties_up=num_up,
        num_near_ties_positive=int(rng.binomial(num_signed, share + bias)),
        near_ties_positive_expected=num_signed * share,
        near_ties_positive_variance=num_signed * share * (1 - share),
    )


def test_the_lifetime_tests_flag_honest_nodes_at_most_at_their_stated_rate_however_often_judged():
    """1,000 honest nodes at the bounds' own rates, each judged after every window for 40 windows:
    the share ever flagged stays under the stated 1% (Ville's inequality; the running sums are
    judged 40 times, a window test judged so would flag up to 40 times its rate)."""
    rng = np.random.default_rng(5)
    stated = 0.01
    num_flagged = 0
    for _ in range(1000):
        totals = TokenStats()
        for _ in range(40):
            totals += _honest_window_stats(rng, node_stats.NEAR_TIE_RATE_BOUND["bfloat16"])
            if judge_lifetime(totals, "bfloat16", false_positive_rate=stated) is not None:
                num_flagged += 1
                break
    assert num_flagged / 1000 <= stated


def test_an_honest_bias_within_the_slack_is_never_flagged():
    """A systematic honest lean of near-ties toward rewarded rollouts (half the slack: an excess of
    0.05 x the variance), over 1,000 windows (4 million tokens): the lifetime direction test's
    e-value falls, not rises."""
    rng = np.random.default_rng(9)
    totals = TokenStats()
    for _ in range(1000):
        totals += _honest_window_stats(rng, 0.007, bias=0.5 * node_stats.DIRECTION_SLACK * 0.3 * 0.7)
    assert judge_lifetime(totals, "bfloat16") is None
    assert node_stats.lifetime_log_e_values(totals, "bfloat16")["node_lifetime_near_tie_direction"] < 0


def test_near_ties_steered_at_narrow_gaps_pass_every_window_and_fail_the_lifetime_direction_test():
    """The narrow steerer of issue 16 (attack 16.2n, measured: about 4 near-ties of 4,096 tokens
    moved into rollouts of positive advantage, none wide): simulated over honest windows at the
    measured bf16 rate, each window passes all five window tests, and the lifetime direction test
    fails within 20 windows."""
    rng = np.random.default_rng(13)
    totals = TokenStats()
    for num_windows in range(1, 21):
        window = _honest_window_stats(rng, 0.007)
        steered = 6  # all in rollouts of positive advantage, where 30% of the signed tokens are
        window = dataclasses.replace(
            window,
            num_near_ties=window.num_near_ties + steered,
            num_near_ties_positive=window.num_near_ties_positive + steered,
            near_ties_positive_expected=window.near_ties_positive_expected + 0.3 * steered,
            near_ties_positive_variance=window.near_ties_positive_variance + 0.21 * steered,
        )
        assert judge_tokens(window, "bfloat16").passed, num_windows
        totals += window
        failure = judge_lifetime(totals, "bfloat16")
        if failure is not None:
            break
    assert failure is not None and failure.check == "node_lifetime_near_tie_direction"
    assert failure.evidence["p_value"] < node_stats.LIFETIME_FALSE_POSITIVE_RATE
    assert num_windows >= 3, "a single window's worth is not evidence enough"
