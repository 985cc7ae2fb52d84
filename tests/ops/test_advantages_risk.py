"""RiskPO Mixed-VaR advantage and its quantile tracker: hand-computed cases, the plain-loop reference.

    .venv/bin/python -m pytest -q tests/ops/test_advantages_risk.py
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reference_sampling import riskpo_reference
from steadyrl.ops.advantages_risk import (
    TRACKED_LEVELS,
    bundle_paper_scores,
    nearest_level,
    quantile_tracker_init,
    quantile_tracker_step,
    riskpo_advantages,
)

T = torch.tensor


def test_paper_scores_sum_the_jth_completion_of_each_question_in_a_bundle():
    # 3 prompts, G = 2, bundles of 2: bundle 0 = prompts 0,1; bundle 1 = prompt 2 alone
    rewards = T([1.0, 0, 1, 1, 0, float("nan")])
    torch.testing.assert_close(bundle_paper_scores(rewards, 2, 2), T([[2.0, 1.0], [0.0, 0.0]]))  # NaN counts 0


def test_riskpo_by_hand_with_bundle_quantiles():
    # one bundle of q0 = [1, 0] and q1 = [1, 1]: papers S = [2, 1]
    # batch quantiles of [1, 2]: a = q(.2) = 1.2, b' = q(.9) = 1.9
    # S = 2: RVaR = .8 − .1 + (1.2 − 1.9) = 0, CVaR = 0 → 0
    # S = 1: RVaR = −.7/.7 = −1, CVaR = −.2/.2 = −1 → A = (1.5·(−1) − 1)/2.5 = −1; / std(S) = .7071068 → −1.4142136
    # credit std: q0 (std .7071068) → −2.0; q1 (std 0 → 1) → −1.4142136
    out = riskpo_advantages(T([1.0, 0, 1, 1]), 2, bundle_size=2, thresholds="batch")
    torch.testing.assert_close(out.advantages, T([0.0, -2.0, 0.0, -1.4142136]), rtol=0, atol=1e-4)


def test_riskpo_by_hand_with_tracked_quantiles():
    # tracked a = 1, b' = 2: S = 2: RVaR = 1 − 0 + (1 − 2) = 0, CVaR 0 → 0
    # S = 1: RVaR = −1/.7 = −1.4285714, CVaR = −max(1 − 1, 0) = 0 → A = −1.4285714/2.5 = −.5714286
    #   / .7071068 = −.8081220; q0 / .7071068 = −1.1428571; q1 → −.8081220
    out = riskpo_advantages(T([1.0, 0, 1, 1]), 2, bundle_size=2, tracked=(1.0, 2.0))
    torch.testing.assert_close(out.advantages, T([0.0, -1.1428571, 0.0, -0.8081220]), rtol=0, atol=1e-4)
    # mix: thresholds are the means of the bundle's and the tracked ones
    mixed = riskpo_advantages(T([1.0, 0, 1, 1]), 2, bundle_size=2, tracked=(1.0, 2.0), thresholds="mix")
    ref = riskpo_reference([[1.0, 0.0], [1.0, 1.0]], 2, tracked=((1.2 + 1.0) / 2, (1.9 + 2.0) / 2))
    torch.testing.assert_close(mixed.advantages, T([a for g in ref for a in g]), rtol=1e-5, atol=1e-5)


def test_a_bundle_without_spread_is_not_blown_up_by_epsilon():
    # every paper scores 0 and the tracked thresholds are (0, 1): RVaR = −1/.7, CVaR = 0 → A = −.5714286
    # the code divides by (0 + 1e-6): −571428; "unscaled" (default) keeps −.5714286; "zero" gives 0
    rewards = torch.zeros(4)
    default = riskpo_advantages(rewards, 2, bundle_size=2, tracked=(0.0, 1.0), credit="uniform")
    torch.testing.assert_close(default.advantages, torch.full((4,), -0.5714286), rtol=0, atol=1e-5)
    code = riskpo_advantages(rewards, 2, bundle_size=2, tracked=(0.0, 1.0), credit="uniform", zero_std_bundle="epsilon")
    assert code.advantages[0].item() == pytest.approx(-571428.0, rel=1e-3)
    zero = riskpo_advantages(rewards, 2, bundle_size=2, tracked=(0.0, 1.0), credit="uniform", zero_std_bundle="zero")
    assert torch.equal(zero.advantages, torch.zeros(4))
    # with the bundle's own quantiles there is nothing to scale: a = b' = S
    assert torch.equal(riskpo_advantages(rewards, 2, bundle_size=2, thresholds="batch").advantages, torch.zeros(4))


@settings(max_examples=50, deadline=None)
@given(groups=st.lists(st.lists(st.sampled_from([0.0, 1.0]), min_size=4, max_size=4), min_size=1, max_size=7),
       bundle=st.integers(1, 3), tracked=st.one_of(st.none(), st.tuples(st.floats(0, 1), st.floats(1, 3))),
       credit=st.sampled_from(["std", "uniform"]))
def test_riskpo_matches_the_official_loop(groups, bundle, tracked, credit):
    out = riskpo_advantages(T([r for g in groups for r in g]), 4, bundle_size=bundle, tracked=tracked, credit=credit)
    expected = riskpo_reference(groups, bundle, tracked=tracked, credit=credit)
    torch.testing.assert_close(out.advantages, T([a for g in expected for a in g]), rtol=1e-4, atol=1e-4)


def test_credit_modes():
    # one question per bundle, G = 2, rewards [1, 0]: papers [1, 0]; batch a = .2, b' = .9
    # S = 1: RVaR = .8 − .1 − .7 = 0 → 0;  S = 0: RVaR = −.7/.7 = −1, CVaR = −.2/.2 = −1 → −1 / .7071068 = −1.4142136
    score = riskpo_advantages(T([1.0, 0]), 2, bundle_size=1, thresholds="batch", credit="score")
    torch.testing.assert_close(score.advantages, T([0.0, -1.4142136 * 1.5]), rtol=0, atol=1e-4)  # R = 0: ×1.5
    # sum_mean with one question: share (R − mean)/Σ share = 1 → the paper advantage itself
    share = riskpo_advantages(T([1.0, 0]), 2, bundle_size=1, thresholds="batch", credit="sum_mean")
    torch.testing.assert_close(share.advantages, T([0.0, -1.4142136]), rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="credit must be one of"):
        riskpo_advantages(T([1.0, 0]), 2, credit="mean")


def test_quantile_tracker_step_and_init_by_hand():
    levels = T([0.5])
    samples = T([0.0, 1.0, 2.0, 3.0])
    # F̂(1) = mean(S < 1) = .25 → q = 1 + .1·(.5 − .25) = 1.025
    torch.testing.assert_close(quantile_tracker_step(T([1.0]), levels, samples, 0.1), T([1.025]))
    torch.testing.assert_close(quantile_tracker_init(samples, T([0.25, 0.5])), T([0.75, 1.5]))
    assert len(TRACKED_LEVELS) == 19 and nearest_level(T(TRACKED_LEVELS), 0.2) == 3 and nearest_level(T(TRACKED_LEVELS), 0.9) == 17


def test_the_tracker_converges_to_the_quantile_of_a_stationary_distribution():
    gen = torch.Generator().manual_seed(0)
    levels = T([0.2, 0.9])
    q = T([0.0, 0.0])
    for _ in range(4000):
        q = quantile_tracker_step(q, levels, torch.rand(16, generator=gen) * 10, 0.05)
    torch.testing.assert_close(q, T([2.0, 9.0]), rtol=0, atol=0.3)  # quantiles of U(0, 10)
