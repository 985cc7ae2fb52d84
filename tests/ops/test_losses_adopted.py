"""Tests for steadyrl.ops.losses_adopted: hand-computed values, loop references, properties.

Run: .venv/bin/python -m pytest -q tests/ops/test_losses_adopted.py
Framework parity (TRL / verl functions on the same tensors): tests/ops/test_parity_{trl,verl}.py.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import reference_adopted as ref
import reference_losses as ref_losses
from reference_losses import NAN, assert_same_result, close, make, poison, random_inputs, run
from steadyrl.ops import losses as L
from steadyrl.ops.losses_adopted import (
    dcpo_clip_bounds,
    dcpo_loss,
    dro_loss,
    gmpo_loss,
    kimi_dppo_loss,
    luspo_loss,
    sapo_loss,
)

SHAPES = [(1, 1, 0), (2, 5, 1), (4, 7, 2), (3, 16, 3), (8, 4, 4), (5, 9, 5)]
LN = math.log

# ---------------------------------------------------------------------------------------------------------
# Hand-computed values
# ---------------------------------------------------------------------------------------------------------


def test_sapo_hand():
    # t0: r = 1, Â = 1, τ⁺ = 1: ℓ = −σ(0)·4·1 = −2; ∂ℓ/∂log π = −4Â σ(1−σ) r = −1
    # t1: r = 1, Â = −2, τ⁻ = 1.05: ℓ = −0.5·(4/1.05)·(−2) = 3.8095238; grad = −4·(−2)·0.25 = 2
    # t2: r = 2, Â = 1: σ(1) = 0.7310585786: ℓ = −2.9242343145; grad = −8·σ(1)(1 − σ(1)) = −1.5728954659
    inputs = make([[0.0, 0.0, LN(2.0), NAN]], old=[[0.0, 0.0, 0.0, NAN]], adv=[[1.0, -2.0, 1.0, NAN]],
                  mask=[[True, True, True, False]])
    loss, grad, m = run(sapo_loss, inputs)
    close(loss, [[-2.0, 4.0 / 1.05, -2.9242343145, 0.0]])
    close(grad, [[-1.0, 2.0, -1.5728954659, 0.0]])
    close(m["sapo/gate_mean"], (0.5 + 0.5 + 0.7310585786) / 3)
    close(m["ratio/mean"], 4.0 / 3)


def test_gmpo_hand():
    # seq 0, Â = 1, x = [0.1, 0.6, −0.2], ε = 0.4: only the upper clip acts → x̃ = [0.1, 0.4, −0.2], mean 0.1
    #   s = e^0.1 = 1.105170918, ℓ = −1.105170918 on each token; grad −s on unclipped tokens 0 and 2
    # seq 1, Â = −1, x = [−0.6, 0.3]: lower clip on token 0 → x̃ = [−0.4, 0.3], mean −0.05
    #   s = e^−0.05 = 0.951229425, ℓ = +s; grad: token 0 clipped → 0, token 1 → −Ā s = +s
    inputs = make([[0.1, 0.6, -0.2], [-0.6, 0.3, NAN]], old=[[0.0] * 3, [0.0, 0.0, NAN]],
                  adv=[[1.0] * 3, [-1.0, -1.0, NAN]], mask=[[True] * 3, [True, True, False]])
    loss, grad, m = run(gmpo_loss, inputs)
    s0, s1 = math.exp(0.1), math.exp(-0.05)
    close(loss, [[-s0, -s0, -s0], [s1, s1, 0.0]])
    close(grad, [[-s0, 0.0, -s0], [0.0, s1, 0.0]])
    close(m["ratio/clip_frac_high"], 1 / 5)
    close(m["ratio/clip_frac_low"], 1 / 5)
    close(m["gmpo/seq_ratio_mean"], (s0 + s1) / 2)


def test_dro_hand():
    # log π = −1, log π_old = −1.5, Â = 2, β = 0.1: d = 0.5
    # ℓ = −(2·(−1) − 0.05·0.25) = 2.0125;  ∂ℓ/∂log π = −Â + β d = −1.95
    loss, grad, m = run(dro_loss, make([[-1.0]], old=[[-1.5]], adv=[[2.0]]), beta=0.1)
    close(loss, [[2.0125]])
    close(grad, [[-1.95]])
    close(m["dro/log_ratio_sq_mean"], 0.25)


def test_kimi_dppo_hand():
    # t0: π = 0.5, μ = 0.2, Â = 1: Δp = 0.3 > 0.2 → masked; ℓ = 1e-3 (ln 2.5)² = 8.3958871e-4, grad 2e-3 ln 2.5
    # t1: π = 0.3, μ = 0.25, Â = 1: kept, ρ = 1.2: ℓ = −1.2 + 1e-3 (ln 1.2)², grad = −1.2 + 2e-3 ln 1.2
    # t2: π = 0.1, μ = 0.4, Â = −1: Δp = −0.3 < −0.2 → masked; ℓ = 1e-3 (ln 0.25)², grad 2e-3 ln 0.25
    inputs = make([[LN(0.5), LN(0.3), LN(0.1)]], rollout=[[LN(0.2), LN(0.25), LN(0.4)]], adv=[[1.0, 1.0, -1.0]])
    loss, grad, m = run(kimi_dppo_loss, inputs)
    close(loss, [[1e-3 * LN(2.5) ** 2, -1.2 + 1e-3 * LN(1.2) ** 2, 1e-3 * LN(0.25) ** 2]])
    close(grad, [[2e-3 * LN(2.5), -1.2 + 2e-3 * LN(1.2), 2e-3 * LN(0.25)]])
    close(m["dppo/masked_frac"], 2 / 3)
    close(m["dppo/masked_frac_pos"], 1 / 3)
    close(m["dppo/masked_frac_neg"], 1 / 3)


def test_dcpo_bounds_match_the_readme_table():
    # DCPO README table, ε_low = 0.16, ε_high = 0.2: q = 0.9 → p ∈ [0.69, min(1.06, 1)];  q = 0.01 → [0.005, 0.05]
    q = torch.tensor([[0.9, 0.01, 0.5]], dtype=torch.float64)
    lower, upper = dcpo_clip_bounds(q.log(), 0.16, 0.2, 10.0)
    # q = 0.9: lower = ½ + ½√(1 − 0.64/0.9) = 0.7687419, upper = ½ + ½√(1 + 0.8/0.9) = 1.1871843
    # q = 0.01: 1 − 64 < 0 → lower ½; upper = ½ + ½√81 = 5;   q = 0.5: lower ½, upper = ½ + ½√2.6 = 1.3062258
    close(lower, [[0.7687419, 0.5, 0.5]], tol=1e-7)
    close(upper, [[1.1871843, 5.0, 1.3062258]], tol=1e-7)
    close(q * lower, [[0.6918677, 0.005, 0.25]], tol=1e-7)  # "low p(x)" 0.69 and 0.005
    close(q * upper, [[1.0684658, 0.05, 0.6531129]], tol=1e-7)  # "high" 1.06 and 0.05
    # the cap: q = 1e-4 would give ½ + ½√8001 ≈ 45.2 → capped at 10
    _, capped = dcpo_clip_bounds(torch.tensor([[math.log(1e-4)]], dtype=torch.float64), 0.16, 0.2, 10.0)
    close(capped, [[10.0]])


def test_dcpo_hand():
    # t0: q = 0.01, r = 4, Â = 1: upper = 5 → unclipped (PPO ε = 0.2 would clip it): ℓ = −4, grad −4
    # t1: q = 0.75, r = 1.3, Â = 1: upper = ½ + ½√(1 + 0.8/0.75) = 1.2187953 → clipped: ℓ = −1.2187953, grad 0
    inputs = make([[LN(0.04), LN(0.975)]], old=[[LN(0.01), LN(0.75)]], adv=[[1.0, 1.0]])
    loss, grad, m = run(dcpo_loss, inputs)
    close(loss, [[-4.0, -1.2187953]], tol=1e-7)
    close(grad, [[-4.0, 0.0]])
    close(m["ratio/clip_frac_high"], 0.5)
    ppo, _, _ = run(L.ppo_clip_loss, inputs)
    close(ppo[0, 0], -1.2)  # the fixed clip would have cut the rare token at 1.2


def test_luspo_is_the_gspo_term():
    inputs = random_inputs(4, 6, seed=7, spread=0.01)
    a, b = run(luspo_loss, inputs), run(L.gspo_loss, inputs)
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(a[1], b[1])


# ---------------------------------------------------------------------------------------------------------
# Loop references on random inputs (value and gradient)
# ---------------------------------------------------------------------------------------------------------


def _check(fn, kw, inputs, expected):
    loss, grad, _ = run(fn, inputs, **kw)
    close(loss, expected[0], tol=1e-9)
    close(grad, expected[1], tol=1e-9)


@pytest.mark.parametrize("B,T,seed", SHAPES)
def test_sapo_matches_loop(B, T, seed):
    x = random_inputs(B, T, seed, per_token_adv=True)
    _check(sapo_loss, {"tau_pos": 1.3, "tau_neg": 2.0}, x,
           ref.sapo(x.logprobs, x.old_logprobs, x.advantages, x.response_mask, 1.3, 2.0))


@pytest.mark.parametrize("B,T,seed", SHAPES)
@pytest.mark.parametrize("per_token", [False, True])
def test_gmpo_matches_loop(B, T, seed, per_token):
    x = random_inputs(B, T, seed, per_token_adv=per_token)
    _check(gmpo_loss, {"clip_low": 0.2, "clip_high": 0.3}, x,
           ref.gmpo(x.logprobs, x.old_logprobs, x.advantages, x.response_mask, 0.2, 0.3))


@pytest.mark.parametrize("B,T,seed", SHAPES)
def test_luspo_matches_gspo_loop(B, T, seed):
    x = random_inputs(B, T, seed, spread=0.05)
    _check(luspo_loss, {"clip_low": 0.02, "clip_high": 0.03}, x,
           ref_losses.gspo(x.logprobs, x.old_logprobs, x.advantages, x.response_mask, 0.02, 0.03))


@pytest.mark.parametrize("B,T,seed", SHAPES)
def test_dro_matches_loop(B, T, seed):
    x = random_inputs(B, T, seed, per_token_adv=True)
    _check(dro_loss, {"beta": 0.3}, x, ref.dro(x.logprobs, x.old_logprobs, x.advantages, x.response_mask, 0.3))


@pytest.mark.parametrize("B,T,seed", SHAPES)
def test_kimi_dppo_matches_loop(B, T, seed):
    x = random_inputs(B, T, seed, per_token_adv=True)
    kw = {"dppo_mask_low": 0.1, "dppo_mask_high": 0.15, "adv_tau": 0.7, "kl_tau": 0.05}
    _check(kimi_dppo_loss, kw, x,
           ref.kimi_dppo(x.logprobs, x.rollout_logprobs, x.advantages, x.response_mask, 0.1, 0.15, 0.7, 0.05))


def test_kimi_dppo_falls_back_to_old_logprobs():
    x = random_inputs(3, 5, 11)
    fallback = dataclasses.replace(x, rollout_logprobs=None)
    _check(kimi_dppo_loss, {}, fallback,
           ref.kimi_dppo(x.logprobs, x.old_logprobs, x.advantages, x.response_mask, 0.2, 0.2, 1.0, 1e-3))


@pytest.mark.parametrize("B,T,seed", SHAPES)
@pytest.mark.parametrize("dual", [None, 3.0])
def test_dcpo_matches_loop(B, T, seed, dual):
    x = random_inputs(B, T, seed, per_token_adv=True, spread=0.8)
    kw = {"clip_low": 0.16, "clip_high": 0.2, "dual_clip": dual, "upper_cap": 4.0}
    cap = 4.0 if dual is None else max(4.0, dual)
    _check(dcpo_loss, kw, x,
           ref.dcpo(x.logprobs, x.old_logprobs, x.advantages, x.response_mask, 0.16, 0.2, dual, cap))


# ---------------------------------------------------------------------------------------------------------
# Masked garbage, properties
# ---------------------------------------------------------------------------------------------------------

ALL = [(sapo_loss, {}), (gmpo_loss, {}), (luspo_loss, {}), (dro_loss, {}), (kimi_dppo_loss, {}), (dcpo_loss, {})]


@pytest.mark.parametrize("fn,kw", ALL)
@pytest.mark.parametrize("garbage", [NAN, float("inf"), -1e30])
def test_masked_garbage_changes_nothing(fn, kw, garbage):
    x = random_inputs(4, 6, 3, per_token_adv=True)
    assert_same_result(fn, kw, poison(x, 0.0), poison(x, garbage))


@settings(max_examples=40, deadline=None)
@given(adv=st.floats(-3, 3).filter(lambda a: a != 0), tau_pos=st.floats(0.1, 5), tau_neg=st.floats(0.1, 5))
def test_sapo_at_ratio_one_is_reinforce(adv, tau_pos, tau_neg):
    # f'(1) = 4σ(0)(1 − σ(0)) = 1, so at π_θ = π_old the gradient is REINFORCE's −Â; the value is −2Â/τ.
    inputs = make([[-0.7]], adv=[[adv]])
    loss, grad, _ = run(sapo_loss, inputs, tau_pos=tau_pos, tau_neg=tau_neg)
    _, grad_pg, _ = run(L.reinforce_loss, inputs)
    close(grad, grad_pg)
    close(loss, [[-2.0 * adv / (tau_pos if adv > 0 else tau_neg)]])


@settings(max_examples=40, deadline=None)
@given(log_r=st.floats(-4, 4), adv=st.floats(-3, 3), tau=st.floats(0.2, 4))
def test_sapo_gradient_never_exceeds_reinforce_at_the_same_ratio(log_r, adv, tau):
    # |∂ℓ/∂log π| = 4σ(1−σ)·r·|Â| ≤ r|Â| (the unclipped surrogate's): a soft trust region, never an amplifier.
    inputs = make([[log_r]], old=[[0.0]], adv=[[adv]])
    _, grad, _ = run(sapo_loss, inputs, tau_pos=tau, tau_neg=tau)
    assert abs(grad.item()) <= math.exp(log_r) * abs(adv) * (1 + 1e-12) + 1e-300  # + subnormal rounding


@settings(max_examples=40, deadline=None)
@given(q=st.floats(1e-6, 1.0), eps_low=st.floats(0.0, 0.5), eps_high=st.floats(0.0, 0.5))
def test_dcpo_bounds_solve_the_probability_constraint(q, eps_low, eps_high):
    # the bounds are where |(r − 1) r q| = ε (README §4.1): u(u − 1) = ε_h/q, l(1 − l) = ε_l/q when it has a root
    lower, upper = dcpo_clip_bounds(torch.tensor([math.log(q)], dtype=torch.float64), eps_low, eps_high, 1e12)
    u, l = upper.item(), lower.item()
    assert 0.5 <= l <= 1.0 <= u
    assert math.isclose(u * (u - 1.0) * q, eps_high, rel_tol=1e-9, abs_tol=1e-12)
    if 4 * eps_low <= q:
        assert math.isclose(l * (1.0 - l) * q, eps_low, rel_tol=1e-9, abs_tol=1e-12)


def test_gmpo_with_zero_log_ratio_is_minus_the_mean_advantage():
    x = random_inputs(4, 6, 5, per_token_adv=True)
    x = dataclasses.replace(x, old_logprobs=x.logprobs.detach().clone())
    loss, _, _ = run(gmpo_loss, x)
    mask = x.response_mask
    mean_adv = torch.where(mask, x.advantages, 0).sum(1) / mask.sum(1).clamp(min=1)
    close(loss, torch.where(mask, -mean_adv.unsqueeze(1).expand_as(loss), 0))


def test_gmpo_geometric_mean_moves_less_than_the_arithmetic_one():
    # one outlier token: exp(mean log r) ≤ mean r (AM-GM), the reason GMPO is less sensitive to it
    inputs = make([[LN(0.9), LN(1.0), LN(6.0)]], old=[[0.0] * 3], adv=[[-1.0] * 3])
    _, _, m = run(gmpo_loss, inputs, clip_low=10.0, clip_high=10.0)
    assert m["gmpo/seq_ratio_mean"].item() < (0.9 + 1.0 + 6.0) / 3


def test_dro_and_kimi_are_zero_gradient_free_of_advantage_terms_at_zero_advantage():
    # Â = 0: only the penalties act, and they vanish where π_θ equals the anchor
    inputs = make([[-1.0, -2.0]], old=[[-1.0, -2.0]], adv=[[0.0, 0.0]], rollout=[[-1.0, -2.0]])
    for fn in (dro_loss, kimi_dppo_loss):
        loss, grad, _ = run(fn, inputs)
        close(loss, [[0.0, 0.0]])
        close(grad, [[0.0, 0.0]])


def test_bad_hyperparameters_name_the_fix():
    x = make([[-1.0]], adv=[[1.0]])
    with pytest.raises(ValueError, match="temperatures"):
        sapo_loss(x, tau_pos=0.0)
    with pytest.raises(ValueError, match="beta"):
        dro_loss(x, beta=0.0)
    with pytest.raises(ValueError, match="dual_clip"):
        dcpo_loss(x, dual_clip=0.5)
