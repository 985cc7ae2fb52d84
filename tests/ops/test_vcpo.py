"""VCPO's math (ops/vcpo.py): ESS, the learning-rate multiplier and the off-policy optimal baseline, by hand and
against a plain-loop reference written from the official code (mit-han-lab/vcpo ``compute_ess_info``,
``compute_opob_baseline``, ``compute_grad_info``, ``_update_grad_buffers``), with property tests.

    .venv/bin/python -m pytest -q tests/ops/test_vcpo.py
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reference_adopted import vcpo_official_coefficients as official_reference
from steadyrl.ops.vcpo import ess_lr_scale, ess_ratio, opob_advantages, sequence_log_weights


def test_sequence_log_weights_sum_the_response_tokens():
    old = torch.tensor([[-1.0, -2.0, -9.0], [-0.5, -0.5, -0.5]])
    mu = torch.tensor([[-1.5, -1.0, 0.0], [-0.5, -1.0, -0.25]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    # row 0: (−1 + 1.5) + (−2 + 1) = −0.5 (the masked third token ignored); row 1: 0 + 0.5 − 0.25 = 0.25
    torch.testing.assert_close(sequence_log_weights(old, mu, mask), torch.tensor([-0.5, 0.25], dtype=torch.float64))


def test_ess_by_hand():
    # w = (1, 2, 1, e^9 → clipped to 8 when asked); the fourth invalid in the first case
    s = torch.tensor([0.0, math.log(2.0), 0.0, 9.0], dtype=torch.float64)
    valid = torch.tensor([True, True, True, False])
    # (1 + 2 + 1)² / (1 + 4 + 1 + ε) / 3 = 16 / 18
    assert ess_ratio(s, valid).item() == pytest.approx(16 / 18, rel=1e-8)  # ε = 1e-8 in the denominator
    everything = torch.ones(4, dtype=torch.bool)
    # clipped: (1 + 2 + 1 + 8)² / (1 + 4 + 1 + 64) / 4 = 144 / 280
    assert ess_ratio(s, everything, clip=8.0).item() == pytest.approx(144 / 280, rel=1e-9)
    assert ess_ratio(s, torch.zeros(4, dtype=torch.bool)).item() == 0.0
    # over ranks: a reduce_sum that doubles (two identical ranks) leaves the ratio
    assert ess_ratio(s, valid, reduce_sum=lambda x: 2 * x).item() == pytest.approx(16 / 18, rel=1e-8)


def test_lr_scale_by_hand():
    assert ess_lr_scale(torch.tensor(0.25)).item() == pytest.approx(0.5)  # √0.25
    assert ess_lr_scale(torch.tensor(0.25), rule="linear").item() == pytest.approx(0.25)
    assert ess_lr_scale(torch.tensor(0.25), base_ess_ratio=0.5).item() == pytest.approx(math.sqrt(0.5))
    assert ess_lr_scale(torch.tensor(0.9), base_ess_ratio=0.5).item() == 1.0  # never above 1
    with pytest.raises(ValueError, match="'sqrt' or 'linear'"):
        ess_lr_scale(torch.tensor(0.5), rule="cube")


def test_opob_by_hand():
    # one group of 3: R = (1, 0, 0), ‖g‖² = (4, 1, 1), s = (0, log 2, 0) → W = (4, 4, 1)
    rewards = torch.tensor([1.0, 0.0, 0.0])
    norms = torch.tensor([4.0, 1.0, 1.0])
    s = torch.tensor([0.0, math.log(2.0), 0.0])
    valid = torch.ones(3, dtype=torch.bool)
    adv, base = opob_advantages(rewards, norms, s, valid, 3, norm_by_std=False, eps=0.0)
    b = 4 / 9  # (4·1 + 4·0 + 1·0) / 9
    torch.testing.assert_close(base, torch.full((3,), b, dtype=torch.float64))
    torch.testing.assert_close(adv, torch.tensor([1 - b, -b, -b], dtype=torch.float64))
    # with the group's population std σ = √(2/9)
    adv_std, _ = opob_advantages(rewards, norms, s, valid, 3, eps=0.0)
    torch.testing.assert_close(adv_std, adv / math.sqrt(2 / 9))
    # without IS weights W = ‖g‖² = (4, 1, 1): b = 4/6; with L = (2, 1, 1): W = ‖g‖²·w²/L² = (1, 4, 1), b = 1/6
    _, base_no_is = opob_advantages(rewards, norms, s, valid, 3, use_is_weights=False, norm_by_std=False, eps=0.0)
    assert base_no_is[0].item() == pytest.approx(4 / 6)
    _, base_len = opob_advantages(rewards, norms, s, valid, 3, lengths=torch.tensor([2.0, 1.0, 1.0]), norm_by_std=False, eps=0.0)
    assert base_len[0].item() == pytest.approx(1 / 6)
    # mini-batch scope: values are advantages, one baseline for everything
    adv_mb, base_mb = opob_advantages(torch.tensor([0.5, -0.5, 0.0]), norms, s, valid, 3, scope="minibatch", eps=0.0)
    assert base_mb[0].item() == pytest.approx((4 * 0.5 - 4 * 0.5) / 9, abs=1e-6)  # fp32 log 2
    # a zero-variance group is not divided by its std, and an invalid trajectory gets 0
    flat, _ = opob_advantages(torch.ones(3), norms, s, torch.tensor([True, True, False]), 3, eps=0.0)
    torch.testing.assert_close(flat, torch.zeros(3, dtype=torch.float64))


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    groups=st.integers(1, 3),
    group_size=st.integers(2, 4),
    scope=st.sampled_from(["group", "minibatch"]),
    use_is_weights=st.booleans(),
    clipped=st.booleans(),
    by_length=st.booleans(),
    norm_by_std=st.booleans(),
)
def test_opob_matches_the_official_loop(data, groups, group_size, scope, use_is_weights, clipped, by_length, norm_by_std):
    n = groups * group_size
    floats = st.floats(-2.0, 2.0, allow_nan=False)
    rewards = data.draw(st.lists(st.sampled_from([0.0, 0.5, 1.0]), min_size=n, max_size=n))
    advantages = data.draw(st.lists(floats, min_size=n, max_size=n))
    norms = data.draw(st.lists(st.floats(1e-3, 50.0), min_size=n, max_size=n))
    log_w = data.draw(st.lists(floats, min_size=n, max_size=n))
    lengths = data.draw(st.lists(st.integers(1, 9), min_size=n, max_size=n)) if by_length else None
    clip = 1.5 if clipped else None
    got, _ = opob_advantages(
        torch.tensor(rewards if scope == "group" else advantages, dtype=torch.float64), torch.tensor(norms, dtype=torch.float64),
        torch.tensor(log_w, dtype=torch.float64), torch.ones(n, dtype=torch.bool), group_size, scope=scope,
        use_is_weights=use_is_weights, clip=clip, lengths=None if lengths is None else torch.tensor(lengths),
        norm_by_std=norm_by_std,
    )
    want = official_reference(rewards, advantages, norms, log_w, group_size, scope=scope, use_is_weights=use_is_weights,
                              clip=clip, lengths=lengths, norm_by_std=norm_by_std)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-9, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-3.0, 3.0), min_size=1, max_size=12), st.floats(0.1, 20.0))
def test_ess_is_in_the_unit_interval_and_scale_free(log_w, shift):
    s = torch.tensor(log_w, dtype=torch.float64)
    valid = torch.ones_like(s, dtype=torch.bool)
    ratio = ess_ratio(s, valid, eps=0.0)
    assert 1 / len(log_w) - 1e-12 <= ratio.item() <= 1 + 1e-12
    torch.testing.assert_close(ess_ratio(s + math.log(shift), valid, eps=0.0), ratio)  # all weights × shift
