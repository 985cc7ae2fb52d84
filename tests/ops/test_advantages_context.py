"""DCPO smooth advantage, ADORA and COPO: hand-computed cases, the plain-loop references, properties.

    .venv/bin/python -m pytest -q tests/ops/test_advantages_context.py
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reference_sampling import adora_reference, copo_reference, dcpo_reference
from steadyrl.ops.advantages_context import (
    adora_advantages,
    copo_advantages,
    dcpo_smooth_advantages,
    group_mean_std,
    pooled_group_stats,
)

T = torch.tensor


def test_dcpo_by_hand():
    # group 0: seen once before (mean .5, std .5), now all correct: A_new = 0, i = 2
    #   μ_tot = (1·.5 + 1)/2 = .75;  σ²_tot = (1·.25 + 0 + ½·(1 − .5)²)/2 = .1875, σ = .4330127
    #   A_tot = .25/.4330127 = .5773503;  SA_new = SA_tot = ½·.5773503 = .2886751 (the history keeps the signal)
    # group 1: first visit, [1,0,0,0]: i = 1, Â = A_new = (R − .25)/.5 = [1.5, −.5, −.5, −.5]
    # group 2: seen twice (mean 0, std 0), now [1,0,1,0]: mean .5, std .5773503, i = 3
    #   μ_tot = .5/3 = 1/6;  σ²_tot = (0 + 1/3 + (2/3)·.25)/3 = 1/6, σ = .4082483
    #   R=1: A_new .8660254, A_tot 2.0412415 → SA_new 1.2577640 < SA_tot 1.6495025 → 1.2577640
    #   R=0: A_new −.8660254, A_tot −.4082483 → SA_new −.7134331, SA_tot −.5608410 → −.5608410
    rewards = T([1.0, 1, 1, 1, 1, 0, 0, 0, 1, 0, 1, 0])
    out = dcpo_smooth_advantages(rewards, 4, old_mean=T([0.5, 0.0, 0.0]), old_std=T([0.5, 0.0, 0.0]), times=T([1, 0, 2]))
    expected = T([0.2886751] * 4 + [1.5, -0.5, -0.5, -0.5] + [1.2577640, -0.5608410, 1.2577640, -0.5608410])
    torch.testing.assert_close(out.advantages, expected, rtol=0, atol=1e-6)
    assert out.sample_mask.all()
    assert out.metrics["dcpo/revisit_frac"].item() == pytest.approx(2 / 3)
    assert out.metrics["adv/zero_std_frac"].item() == pytest.approx(1 / 3)  # the step's own dead groups
    assert out.metrics["dcpo/nonzero_adv_frac"].item() == 1.0  # ... which still carry signal


def test_dcpo_pooled_stats_by_hand_and_first_visit():
    mean, std = pooled_group_stats(T([0.5, 9.0]), T([0.5, 9.0]), T([1, 0]), T([1.0, 0.25]), T([0.0, 0.5]))
    torch.testing.assert_close(mean, T([0.75, 0.25]))  # a first visit takes the step's own statistics
    torch.testing.assert_close(std, T([math.sqrt(0.1875), 0.5]))
    # old_scale (the code's user_old_mean_ratio) scales the stored mean and std: c = .5 → m̃ = .25, s̃ = .25
    #   μ = (.25 + 1)/2 = .625;  σ² = (.0625 + 0 + ½·.75²)/2 = .171875
    mean, std = pooled_group_stats(T([0.5]), T([0.5]), T([1]), T([1.0]), T([0.0]), old_scale=0.5)
    torch.testing.assert_close(mean, T([0.625]))
    torch.testing.assert_close(std, T([math.sqrt(0.171875)]))


def test_group_mean_std_leaves_missing_rewards_out():
    mean, std, count = group_mean_std(T([1.0, float("nan"), 0.0, 2.0, float("nan"), float("nan")]), 3)
    torch.testing.assert_close(mean, T([0.5, 2.0]))
    torch.testing.assert_close(std, T([math.sqrt(0.5), 0.0]))  # one valid member: std 0
    torch.testing.assert_close(count, T([2.0, 1.0]))


group_rewards = st.lists(st.lists(st.sampled_from([0.0, 0.5, 1.0]), min_size=4, max_size=4), min_size=1, max_size=5)


@settings(max_examples=60, deadline=None)
@given(groups=group_rewards, data=st.data())
def test_dcpo_matches_the_official_loop_over_several_steps(groups, data):
    history = [(0.0, 0.0, 0)] * len(groups)
    for _ in range(3):  # three steps on the same prompts: the store's update is the code's get_mean_std
        step = [data.draw(st.lists(st.sampled_from([0.0, 0.5, 1.0]), min_size=4, max_size=4)) for _ in groups]
        expected, new_history = dcpo_reference(step, history)
        mean, std, times = (T([h[k] for h in history]) for k in range(3))
        out = dcpo_smooth_advantages(T([r for g in step for r in g]), 4, old_mean=mean, old_std=std, times=times.long())
        torch.testing.assert_close(out.advantages, T([a for g in expected for a in g]), rtol=1e-5, atol=1e-5)
        m, s, _ = group_mean_std(T([r for g in step for r in g]), 4)
        pm, ps = pooled_group_stats(mean, std, times.long(), m, s)
        torch.testing.assert_close(pm, T([h[0] for h in new_history]), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ps, T([h[1] for h in new_history]), rtol=1e-5, atol=1e-6)
        history = [(float(a), float(b), c) for a, b, (_, _, c) in zip(pm, ps, new_history)]


@settings(max_examples=40, deadline=None)
@given(groups=group_rewards)
def test_dcpo_first_visit_is_the_group_z_score(groups):
    rewards = T([r for g in groups for r in g])
    zeros = torch.zeros(len(groups))
    out = dcpo_smooth_advantages(rewards, 4, old_mean=zeros, old_std=zeros, times=zeros.long())
    m, s, _ = group_mean_std(rewards, 4)
    z = torch.where(s[:, None] > 0, (rewards.view(-1, 4) - m[:, None]) / s.clamp(min=1e-12)[:, None], 0.0)
    torch.testing.assert_close(out.advantages, z.reshape(-1))


def test_adora_by_hand():
    # group 0: longest correct (5) > mean wrong (3): advantaged, plain GRPO z-scores (std .5773503)
    # group 1: longest correct (2) < mean wrong (4): damped by λ = .1: [1.5, −.5, −.5, −.5]·.1
    # group 2: all wrong: no signal
    rewards = T([1.0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0])
    lengths = T([5, 3, 3, 2, 2, 4, 4, 4, 3, 3, 3, 3])
    out = adora_advantages(rewards, 4, lengths=lengths, correct_score=0.5, attenuation=0.1, max_length=100)
    expected = T([0.8660254, -0.8660254, -0.8660254, 0.8660254, 0.15, -0.05, -0.05, -0.05, 0, 0, 0, 0])
    torch.testing.assert_close(out.advantages, expected, rtol=0, atol=1e-5)
    assert out.metrics["adora/advantaged_frac"].item() == pytest.approx(1 / 3)


def test_adora_leaves_truncated_wrong_answers_out_of_the_length_comparison():
    # the long wrong answer (length 9 ≥ max_length 8) does not count: mean wrong = 1 < longest correct 2
    out = adora_advantages(T([1.0, 0, 0, 0]), 4, lengths=T([2, 9, 1, 1]), correct_score=0.5, max_length=8)
    assert out.metrics["adora/advantaged_frac"].item() == 1.0


@settings(max_examples=40, deadline=None)
@given(groups=group_rewards, data=st.data())
def test_adora_matches_the_official_loop(groups, data):
    lengths = [data.draw(st.lists(st.integers(1, 9), min_size=4, max_size=4)) for _ in groups]
    out = adora_advantages(T([r for g in groups for r in g]), 4, lengths=T([n for g in lengths for n in g]),
                           correct_score=0.5, attenuation=0.1, max_length=8)
    expected = adora_reference(groups, lengths, 0.5, 0.1, 8)
    torch.testing.assert_close(out.advantages, T([a for g in expected for a in g]), rtol=1e-5, atol=1e-5)


def test_copo_by_hand():
    # g1 [1, 0], answers 5/7: H = 1 bit;  g2 [1, 1], answers 5/5: H = 0
    # global pass rates .5, 1: mean .75, std .3535534 → Â_glob = ∓.7071068
    # local: g1 ±.7071063 (std .7071068 + 1e-6), g2 0;  w = σ(5(H − 1)) = .5 and .0066929
    # soft_with_zero: g1 R=1: .5·(−.7071068) + .5·.7071063 ≈ 0;  g1 R=0: w = 0 → −.7071068
    #                 g2 R=1: (1 − .0066929)·.7071068 = .7023743
    out = copo_advantages(T([1.0, 0, 1, 1]), 2, answer_entropy=T([1.0, 0.0]))
    torch.testing.assert_close(out.advantages, T([0.0, -0.7071068, 0.7023743, 0.7023743]), rtol=0, atol=1e-5)
    # no_global is GRPO; only_global is the consistency signal alone
    plain = copo_advantages(T([1.0, 0, 1, 1]), 2, answer_entropy=T([1.0, 0.0]), blend="no_global")
    torch.testing.assert_close(plain.advantages, T([0.7071063, -0.7071063, 0.0, 0.0]), rtol=0, atol=1e-5)
    only = copo_advantages(T([1.0, 0, 1, 1]), 2, answer_entropy=T([1.0, 0.0]), blend="only_global")
    torch.testing.assert_close(only.advantages, T([-0.7071068, -0.7071068, 0.7071068, 0.7071068]), rtol=0, atol=1e-5)


def test_copo_consistency_coefficient_shrinks_an_inconsistent_groups_global_reward():
    # G = 2: λ = (1 − ½)/log₂2 = .5; g1 (H = 1): R_glob = .5·(1 − .5) = .25; g2 (H = 0): 1 → Â_glob = ∓.7071068
    out = copo_advantages(T([1.0, 0, 1, 1]), 2, answer_entropy=T([1.0, 0.0]), blend="only_global", consistency_coef=True)
    torch.testing.assert_close(out.advantages, T([-0.7071068, -0.7071068, 0.7071068, 0.7071068]), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="blend must be one of"):
        copo_advantages(T([1.0, 0]), 2, answer_entropy=T([0.0]), blend="soft")


@settings(max_examples=40, deadline=None)
@given(groups=st.lists(st.lists(st.sampled_from([0.0, 1.0]), min_size=4, max_size=4), min_size=2, max_size=5),
       data=st.data(), blend=st.sampled_from(["soft_with_zero", "only_soft", "only_global", "no_global"]))
def test_copo_matches_the_official_loop(groups, data, blend):
    answers = [data.draw(st.lists(st.sampled_from("abc"), min_size=4, max_size=4)) for _ in groups]
    entropy = []
    for ans in answers:
        counts = [ans.count(a) for a in set(ans)]
        entropy.append(-sum(c / 4 * math.log2(c / 4) for c in counts))
    out = copo_advantages(T([r for g in groups for r in g]), 4, answer_entropy=T(entropy), blend=blend)
    expected = copo_reference(groups, answers, blend=blend)
    torch.testing.assert_close(out.advantages, T([a for g in expected for a in g]), rtol=1e-4, atol=1e-4)
