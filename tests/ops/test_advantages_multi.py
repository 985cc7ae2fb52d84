"""Tests for steadyrl.ops.advantages_multi (GDPO, MaxRL, GPG, optimal token baseline) and ops.kl_is.

Run: .venv/bin/python -m pytest -q tests/ops/test_advantages_multi.py
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import reference_adopted as ref
from reference_losses import close
from steadyrl.ops.advantages import grpo_advantages
from steadyrl.ops.advantages_multi import (
    gdpo_advantages,
    gpg_advantages,
    maxrl_advantages,
    optimal_token_baseline_advantages,
)
from steadyrl.ops.kl import kl_k3
from steadyrl.ops.kl_is import kl_k3_is

F64 = torch.float64
NAN = float("nan")


def t(x):
    return torch.tensor(x, dtype=F64)


# ----------------------------------------------------------------------------------------------------- GDPO


def test_gdpo_hand():
    # two prompts × 2 completions, components (accuracy, format):
    #   group 0: acc [1, 0] → z = ±(0.5/0.70710678) = ±0.70710678 (unbiased std, +1e-4);  fmt [1, 1] → no signal, 0
    #   group 1: acc [0, 0] → 0;  fmt [1, 0] → ±0.70710678 ... with weights (1, 0.5): S = [a, −a, 0.5a, −0.5a]
    rewards = t([[1.0, 1.0], [0.0, 1.0], [0.0, 1.0], [0.0, 0.0]])
    z = 0.5 / (math.sqrt(0.5) + 1e-4)
    out = gdpo_advantages(rewards, 2, weights=(1.0, 0.5), batch_norm="none")
    close(out.advantages, [z, -z, 0.5 * z, -0.5 * z])
    # batch step ("std"): mean 0, unbiased std of S = z·√(2·1.25/3)
    sd = z * math.sqrt((1 + 1 + 0.25 + 0.25) / 3)
    out = gdpo_advantages(rewards, 2, weights=(1.0, 0.5))
    close(out.advantages, [z / (sd + 1e-4), -z / (sd + 1e-4), 0.5 * z / (sd + 1e-4), -0.5 * z / (sd + 1e-4)])
    assert out.sample_mask.all()
    close(out.metrics["gdpo/component_zero_std_frac"], 0.5)  # acc: 1 of 2 groups flat, fmt: 1 of 2


def test_gdpo_decouples_a_dominant_component():
    # GRPO on the sum: format (±10) drowns accuracy (±1). GDPO: both count equally after normalisation.
    acc = [1.0, 0.0, 1.0, 0.0]
    fmt = [10.0, 10.0, 0.0, 0.0]
    summed = grpo_advantages(t([a + f for a, f in zip(acc, fmt)]), 4).advantages
    decoupled = gdpo_advantages(t(list(zip(acc, fmt))), 4, batch_norm="none").advantages
    assert summed[0] > 0 and summed[1] > 0  # the wrong answer 1 is rewarded under the summed reward
    assert decoupled[0] > decoupled[1]  # and not under GDPO: 0 and 1 differ only in accuracy
    close(decoupled[0] - decoupled[1], decoupled[2] - decoupled[3])


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("batch_norm", ["std", "whiten", "none"])
def test_gdpo_matches_loop(seed, batch_norm):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randint(0, 3, (12, 3), generator=g).to(F64)
    rewards[torch.rand(12, 3, generator=g) < 0.1] = NAN
    rewards[5] = NAN  # a completion with no component at all
    kw = {"weights": (1.0, 0.3, 2.0), "eps": 1e-3, "batch_norm": batch_norm, "batch_eps": 1e-3}
    out = gdpo_advantages(rewards, 3, **kw)
    close(out.advantages, ref.gdpo(rewards.tolist(), 3, (1.0, 0.3, 2.0), 1e-3, batch_norm, 1e-3), tol=1e-10)
    assert not out.sample_mask[5] and out.advantages[5] == 0


@settings(max_examples=30, deadline=None)
@given(st.lists(st.sampled_from([0.0, 0.25, 0.5, 1.0]), min_size=12, max_size=12))
def test_gdpo_with_one_component_is_grpo(values):
    rewards = t(values)
    a = gdpo_advantages(rewards, 4, batch_norm="none", eps=1e-6).advantages
    b = grpo_advantages(rewards, 4, eps=1e-6).advantages
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(gdpo_advantages(rewards.unsqueeze(1), 4, batch_norm="none", eps=1e-6).advantages, b)


def test_gdpo_rejects_bad_shapes():
    with pytest.raises(ValueError, match="one weight per component"):
        gdpo_advantages(torch.zeros(4, 2), 2, weights=(1.0,))
    with pytest.raises(ValueError, match="batch_norm"):
        gdpo_advantages(torch.zeros(4), 2, batch_norm="token")
    with pytest.raises(ValueError, match=r"\(B, K\)"):
        gdpo_advantages(torch.zeros(4, 2, 1), 2)


# ---------------------------------------------------------------------------------------------------- MaxRL


def test_maxrl_hand():
    # binary, n = 4: K = 1 success → success (4−1)/1 = 3, failures −1;  K = 3 → success 1/3, failure −1
    # all-fail group: μ = 0 → 0 (the guard), all-pass: no signal → 0
    rewards = t([1, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 1, 1, 1, 1])
    out = maxrl_advantages(rewards, 4, eps=0.0)
    close(out.advantages, [3, -1, -1, -1, 1 / 3, 1 / 3, 1 / 3, -1, 0, 0, 0, 0, 0, 0, 0, 0])
    # the official p_normalization also divides by n
    close(maxrl_advantages(rewards, 4, eps=0.0, divide_by_group_size=True).advantages[:4], [0.75, -0.25, -0.25, -0.25])
    # a zero-mean group that is not flat (rewards ±1) is also 0 under the guard
    close(maxrl_advantages(t([1.0, -1.0]), 2).advantages, [0.0, 0.0])


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("divide", [False, True])
def test_maxrl_matches_loop(seed, divide):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randint(0, 2, (20,), generator=g).to(F64)
    rewards[3] = NAN
    out = maxrl_advantages(rewards, 5, divide_by_group_size=divide)
    close(out.advantages, ref.maxrl(rewards.tolist(), 5, 1e-6, divide), tol=1e-10)


@settings(max_examples=40, deadline=None)
@given(k=st.integers(1, 7))
def test_maxrl_is_grpo_direction_scaled_by_one_over_pass_rate(k):
    # binary group of 8 with k successes: Â_maxrl = (R − p)/p, i.e. the Dr.GRPO advantage divided by p
    rewards = t([1.0] * k + [0.0] * (8 - k))
    p = k / 8
    close(maxrl_advantages(rewards, 8, eps=0.0).advantages, (rewards - p) / p)


# ------------------------------------------------------------------------------------------------------ GPG


def test_gpg_hand():
    # rewards [1, 0 | 1, 1 | 0, 0 | 1, 0]: N = 8; non-zero rewards 4 → α = 2 (verl); non-zero advantages 4 → 2 too
    rewards = t([1, 0, 1, 1, 0, 0, 1, 0])
    out = gpg_advantages(rewards, 2)
    close(out.advantages, [1, -1, 0, 0, 0, 0, 1, -1])
    close(out.metrics["gpg/alpha"], 2.0)
    # rewards [1, 0 | 1, 1 | 1, 1]: non-zero rewards 5 → α = 6/5 (verl); non-zero advantages 2 → α = 3 (paper)
    rewards = t([1, 0, 1, 1, 1, 1])
    close(gpg_advantages(rewards, 2).advantages, [0.6, -0.6, 0, 0, 0, 0])
    close(gpg_advantages(rewards, 2, alpha_count="nonzero_advantages").advantages, [1.5, -1.5, 0, 0, 0, 0])


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("count", ["nonzero_rewards", "nonzero_advantages"])
def test_gpg_matches_loop(seed, count):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randint(0, 3, (16,), generator=g).to(F64)
    rewards[7] = NAN
    out = gpg_advantages(rewards, 4, f_norm=2.0, alpha_count=count)
    close(out.advantages, ref.gpg(rewards.tolist(), 4, 2.0, count), tol=1e-10)


# ---------------------------------------------------------------------------------- optimal token baseline


def _otb_inputs(seed, B=6, T=5):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None] < lengths[:, None]
    old = -3 * torch.rand(B, T, generator=g, dtype=F64) - 0.01
    sum_sq = torch.rand(B, T, generator=g, dtype=F64) * 0.9 + 0.05
    rewards = torch.randint(0, 2, (B,), generator=g).to(F64)
    return rewards, old, sum_sq, mask


def test_otb_hand():
    # one group of 2, T = 2, π_old(y) = 0.5 everywhere, Σπ² = 0.5 → w = 1 − 1 + 0.5 = 0.5; W = [0.5, 1.0]
    # member 0 (R = 1) has 2 tokens, member 1 (R = 0) has 1 token
    # t = 0: b = (1·0.5 + 0·0.5)/(0.5 + 0.5) = 0.5 → Â = [0.5, −0.5]
    # t = 1: only member 0: it is the unique longest past the second longest (1) → b = 0 with the zero tail → Â = 1
    rewards = t([1.0, 0.0])
    old = t([[math.log(0.5)] * 2] * 2)
    sum_sq = t([[0.5, 0.5], [0.5, 0.5]])
    mask = torch.tensor([[True, True], [True, False]])
    out = optimal_token_baseline_advantages(rewards, 2, old_logprobs=old, sum_pi_squared=sum_sq, response_mask=mask, eps=0.0)
    close(out.advantages, [[0.5, 1.0], [-0.5, 0.0]])
    # without the zero tail t = 1 has b = 1·1.0/1.0 = 1 → Â = 0
    out = optimal_token_baseline_advantages(
        rewards, 2, old_logprobs=old, sum_pi_squared=sum_sq, response_mask=mask, handle_zero_tail=False, eps=0.0
    )
    close(out.advantages, [[0.5, 0.0], [-0.5, 0.0]])


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("zero_tail", [True, False])
@pytest.mark.parametrize("with_is", [False, True])
def test_otb_matches_loop(seed, zero_tail, with_is):
    rewards, old, sum_sq, mask = _otb_inputs(seed)
    if seed == 3:
        rewards[1] = NAN
    is_w = (torch.rand(old.shape, generator=torch.Generator().manual_seed(seed), dtype=F64) + 0.5) if with_is else None
    out = optimal_token_baseline_advantages(
        rewards, 3, old_logprobs=old, sum_pi_squared=sum_sq, response_mask=mask, rollout_is_weights=is_w,
        handle_zero_tail=zero_tail,
    )
    close(out.advantages, ref.otb(rewards.tolist(), 3, old, sum_sq, mask, is_w, zero_tail), tol=1e-10)
    assert torch.equal(out.sample_mask, ~torch.isnan(rewards))


def test_otb_with_equal_weights_is_the_group_mean_baseline():
    # w equal for every token and equal lengths: b_t = mean_g R, i.e. Dr.GRPO's advantage on every token
    rewards = t([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    mask = torch.ones(6, 4, dtype=torch.bool)
    old = torch.full((6, 4), math.log(0.3), dtype=F64)
    out = optimal_token_baseline_advantages(rewards, 3, old_logprobs=old, sum_pi_squared=torch.full((6, 4), 0.2, dtype=F64),
                                            response_mask=mask, eps=0.0)
    expected = (rewards.view(2, 3) - rewards.view(2, 3).mean(1, keepdim=True)).reshape(-1, 1).expand(6, 4)
    close(out.advantages, expected)


def test_otb_rejects_mismatched_shapes():
    rewards, old, sum_sq, mask = _otb_inputs(0)
    with pytest.raises(ValueError, match="sum_pi_squared"):
        optimal_token_baseline_advantages(rewards, 3, old_logprobs=old, sum_pi_squared=sum_sq[:, :2], response_mask=mask)


# ----------------------------------------------------------------------------------------------- KL (IS k3)


def _kl_inputs(seed, B=4, T=6):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, T, generator=g) > 0.2
    logp = -3 * torch.rand(B, T, generator=g, dtype=F64) - 0.05
    ref_lp = logp + 0.3 * torch.randn(B, T, generator=g, dtype=F64)
    old = logp + 0.2 * torch.randn(B, T, generator=g, dtype=F64)
    return logp, ref_lp, old, mask


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("with_old", [True, False])
def test_kl_k3_is_matches_loop(seed, with_old):
    logp, ref_lp, old, mask = _kl_inputs(seed)
    leaf = logp.clone().requires_grad_()
    value = kl_k3_is(leaf, ref_lp, mask, old_logprobs=old if with_old else None)
    (grad,) = torch.autograd.grad(value.sum(), leaf)
    exp_value, exp_grad = ref.kl_k3_is(logp, ref_lp, old if with_old else None, mask)
    close(value.detach(), exp_value, tol=1e-10)
    close(grad, exp_grad, tol=1e-10)


def test_kl_k3_is_hand():
    # π_θ/π_old = 2, π_ref/π_θ = 0.5: k3 = 0.5 − ln 0.5 − 1 = 0.1931472; value 2·k3 = 0.3862944
    # gradient w(k3 + 1 − π_ref/π_θ) = 2(0.1931472 + 0.5) = 1.3862944
    lp = t([[math.log(0.4)]]).requires_grad_()
    value = kl_k3_is(lp, t([[math.log(0.2)]]), torch.tensor([[True]]), old_logprobs=t([[math.log(0.2)]]))
    value.sum().backward()
    close(value.detach(), [[2 * (0.5 - math.log(0.5) - 1)]])
    close(lp.grad, [[2 * (0.5 - math.log(0.5) - 1 + 0.5)]])


def test_kl_k3_is_on_policy_value_is_k3():
    logp, ref_lp, _, mask = _kl_inputs(1)
    off = dict(log_ratio_clamp=float("inf"), kl_clamp=float("inf"))
    torch.testing.assert_close(kl_k3_is(logp, ref_lp, mask), kl_k3(logp, ref_lp, mask, **off))


def test_kl_k3_is_is_unbiased_where_plain_k3_is_not():
    # exact expectations over a 3-token vocabulary with samples from π_old:
    # Σ_y π_old(y) · w(y) k3(y) = KL(π_θ ‖ π_ref) exactly; Σ_y π_old(y) k3(y) is not.
    p_old, p, p_ref = t([0.6, 0.3, 0.1]), t([0.3, 0.5, 0.2]), t([0.2, 0.2, 0.6])
    mask = torch.ones(1, 3, dtype=torch.bool)
    weighted = kl_k3_is(p.log()[None], p_ref.log()[None], mask, old_logprobs=p_old.log()[None])[0]
    plain = kl_k3(p.log()[None], p_ref.log()[None], mask)[0]
    true_kl = (p * (p / p_ref).log()).sum()
    close((p_old * weighted).sum(), true_kl, tol=1e-12)
    assert abs((p_old * plain).sum() - true_kl) > 0.05
