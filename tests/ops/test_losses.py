"""Tests for steadyrl.ops.losses: hand-computed values, loop references, properties.

Run: .venv/bin/python -m pytest -q tests/ops/test_losses.py
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import reference_losses as ref
from reference_losses import F64, NAN, assert_same_result, close, make, poison, run
from steadyrl.ops import losses as L

SHAPES = [(1, 1, 0), (2, 5, 1), (4, 7, 2), (3, 16, 3), (8, 4, 4), (5, 9, 5)]


L15, L05, L11, L4 = math.log(1.5), math.log(0.5), math.log(1.1), math.log(4.0)

# ---------------------------------------------------------------------------------------------------------
# Hand-computed values
# ---------------------------------------------------------------------------------------------------------


def test_reinforce_hand():
    inputs = make([[-1.0, -2.0, NAN]], adv=[[0.5, -1.0, NAN]], mask=[[True, True, False]])
    loss, grad, metrics = run(L.reinforce_loss, inputs)
    # ℓ = −Â log π: −0.5·(−1) = 0.5 ; −(−1)·(−2) = −2 ; masked 0.   ∂ℓ/∂log π = −Â
    close(loss, [[0.5, -2.0, 0.0]])
    close(grad, [[-0.5, 1.0, 0.0]])
    assert metrics == {}


def test_ppo_clip_hand():
    # old = 0 so r = exp(log π): r = 1.5, 0.5, 1.1, 4.0, and a masked NaN token; ε = 0.2
    inputs = make([[L15, L05, L11, L4, NAN]], old=[[0.0] * 5], adv=[[1.0, -1.0, 2.0, -1.0, NAN]], mask=[[True, True, True, True, False]])
    loss, grad, m = run(L.ppo_clip_loss, inputs)
    # t0 Â>0, r=1.5>1.2: −min(1.5, 1.2) = −1.2, clipped high → grad 0
    # t1 Â<0, r=0.5<0.8: −min(−0.5, −0.8) = 0.8, clipped low → grad 0
    # t2 unclipped: −1.1·2 = −2.2, grad −Â r = −2.2
    # t3 Â<0, r=4: −min(−4, −1.2) = 4, unclipped → grad −Â r = 4
    close(loss, [[-1.2, 0.8, -2.2, 4.0, 0.0]])
    close(grad, [[0.0, 0.0, -2.2, 4.0, 0.0]])
    close(m["ratio/clip_frac_low"], 0.25)
    close(m["ratio/clip_frac_high"], 0.25)
    close(m["ratio/dual_clip_frac"], 0.0)
    close(m["ratio/mean"], (1.5 + 0.5 + 1.1 + 4.0) / 4)  # 1.775
    close(m["ratio/ratio_max"], 4.0)
    # k3 = r − 1 − log r: 0.094535 + 0.193147 + 0.004690 + 1.613706 = 1.906078 → /4
    close(m["kl/approx_old"], 0.4765193828818914)
    loss, grad, m = run(L.ppo_clip_loss, inputs, dual_clip=3.0)
    # dual clip c = 3 caps t3 (Â<0, r=4>3): min(4, −3·Â = 3) = 3, grad 0
    close(loss, [[-1.2, 0.8, -2.2, 3.0, 0.0]])
    close(grad, [[0.0, 0.0, -2.2, 0.0, 0.0]])
    close(m["ratio/dual_clip_frac"], 0.25)
    loss, _, _ = run(L.ppo_clip_loss, inputs, clip_high=0.6)
    close(loss[0, 0], -1.5)  # clip-higher: r = 1.5 < 1.6 is no longer clipped


def test_ppo_clip_rejects_dual_clip_below_one():
    with pytest.raises(ValueError, match="dual_clip"):
        L.ppo_clip_loss(make([[-1.0]], adv=[[1.0]]), dual_clip=0.9)


def test_gspo_hand():
    # seq 0: log r = [0.2, 0.0] (+ masked) → s = e^{0.1} = 1.10517 > 1 + 4e-4; Â = 1 → clipped: ℓ = −1.0004
    # seq 1: log r = 0 → s = 1; Â = −2 → ℓ = −(1·−2) = 2 on each of 3 tokens
    #   Σ_t ℓ = 3·(−Â s), s = exp(mean log r) → ∂/∂log π_t = 3·(−Â)·s/3 = −Â s = 2
    inputs = make(
        [[-1.0, -2.0, NAN], [-1.0, -0.5, -0.7]],
        old=[[-1.2, -2.0, NAN], [-1.0, -0.5, -0.7]],
        adv=[[1.0, 1.0, NAN], [-2.0, -2.0, -2.0]],
        mask=[[True, True, False], [True, True, True]],
    )
    loss, grad, m = run(L.gspo_loss, inputs)
    close(loss, [[-1.0004, -1.0004, 0.0], [2.0, 2.0, 2.0]])
    close(grad, [[0.0, 0.0, 0.0], [2.0, 2.0, 2.0]])
    close(m["ratio/clip_frac_high"], 2 / 5)  # the 2 tokens of the clipped sequence
    # seq_mean_token_mean recovers the sequence objective: mean_i(mean_t ℓ) = (−1.0004 + 2)/2
    per_seq = loss.sum(1) / inputs.response_mask.sum(1)
    close(per_seq.mean(), (-1.0004 + 2.0) / 2)


def test_gspo_token_hand():
    # seq 1 is on-policy (s = 1) with per-token Â = [−2, 1, −2]: ℓ = −Â, grad −Â s = −Â
    inputs = make(
        [[-1.0, -2.0, NAN], [-1.0, -0.5, -0.7]],
        old=[[-1.2, -2.0, NAN], [-1.0, -0.5, -0.7]],
        adv=[[1.0, 1.0, NAN], [-2.0, 1.0, -2.0]],
        mask=[[True, True, False], [True, True, True]],
    )
    loss, grad, _ = run(L.gspo_token_loss, inputs)
    close(loss, [[-1.0004, -1.0004, 0.0], [2.0, -1.0, 2.0]])
    close(grad, [[0.0, 0.0, 0.0], [2.0, -1.0, 2.0]])
    # unclipped, off-policy: s = e^{0.1} inside [0.5, 1.5] → grad of token t is −Â_t s (own token only)
    loss, grad, _ = run(L.gspo_token_loss, inputs, clip_low=0.5, clip_high=0.5)
    s = math.exp(0.1)
    close(grad[0, :2], [-s, -s])


def test_cispo_hand():
    # r = 7, 0.5, 1 ; Â = 1, 1, −2 ; log π = −1, −2, −0.5 ; default ε_high = 4 → w = min(r, 1 + 4) = 5, 0.5, 1
    # (TRL's cispo with epsilon_high = 5 caps at 5 too: its epsilon_high is the cap itself)
    lp = [[-1.0, -2.0, -0.5]]
    inputs = make(lp, old=[[-1.0 - math.log(7.0), -2.0 - L05, -0.5]], adv=[[1.0, 1.0, -2.0]])
    loss, grad, m = run(L.cispo_loss, inputs)
    # ℓ = −w Â log π: −5·1·(−1) = 5 ; −0.5·1·(−2) = 1 ; −1·(−2)·(−0.5) = −1 ; grad −w Â
    close(loss, [[5.0, 1.0, -1.0]])
    close(grad, [[-5.0, -0.5, 2.0]])
    close(m["ratio/clip_frac_high"], 1 / 3)
    close(m["ratio/clip_frac_low"], 0.0)
    loss, grad, m = run(L.cispo_loss, inputs, clip_high=5.0, clip_low=0.2)
    # verl two-sided with ε_high = 5: w_0 = min(7, 6) = 6, w_1 = max(0.5, 0.8) = 0.8 → ℓ = 6, 1.6, grad −6, −0.8
    close(loss, [[6.0, 1.6, -1.0]])
    close(grad, [[-6.0, -0.8, 2.0]])
    close(m["ratio/clip_frac_low"], 1 / 3)


def _steer_inputs():
    # on-policy, π = 0.5, 0.25, 0.8 ; H = 1, 0.5, 2 ; Â = 1, −1, 2 → Ω = Â(1 − π)(log π + H):
    # |Ω| = 0.5·0.306853 = 0.153426 ; 0.75·0.886294 = 0.664721 ; 0.4·1.776856 = 0.710743
    lp = [[math.log(0.5), math.log(0.25), math.log(0.8), NAN]]
    return make(lp, adv=[[1.0, -1.0, 2.0, NAN]], entropy=[[1.0, 0.5, 2.0, NAN]], mask=[[True, True, True, False]])


def test_steer_linear_hand():
    loss, grad, m = run(L.steer_loss, _steer_inputs())
    # λ = 1.2 − (|Ω| − 0.153426)·0.4/(0.710743 − 0.153426) = 1.2, 0.833031, 0.8 ; r = 1 → ℓ = λ·(−Â)
    lam = [1.2, 0.8330310234168791, 0.8]
    close(loss, [[-lam[0], lam[1], -2 * lam[2], 0.0]])
    close(grad, [[-lam[0], lam[1], -2 * lam[2], 0.0]])
    close(m["steer/weight_min"], 0.8)
    close(m["steer/weight_max"], 1.2)
    close(m["steer/omega_abs_max"], 0.7107425794743162)


def test_steer_exp_and_given_bounds_hand():
    loss, _, _ = run(L.steer_loss, _steer_inputs(), mapping="exp")
    # k = −log 0.8 / 0.710743 = 0.313958 ; λ = clip(exp(−k|Ω|), 0.8, 1) = 0.952972, 0.811643, 0.8
    close(loss, [[-0.9529722455995587, 0.8116430563348711, -1.6, 0.0]])
    # caller-supplied batch bounds [0, 1]: λ = 1.2 − 0.4|Ω| = 1.138629, 0.934112, 0.915703
    loss, _, _ = run(L.steer_loss, _steer_inputs(), omega_abs_min=0.0, omega_abs_max=1.0)
    om = [0.15342640972002736, 0.6647207708399179, 0.7107425794743162]
    close(loss, [[-(1.2 - 0.4 * om[0]), 1.2 - 0.4 * om[1], -2 * (1.2 - 0.4 * om[2]), 0.0]])


def test_steer_requires_entropy():
    with pytest.raises(ValueError, match="entropy"):
        L.steer_loss(make([[-1.0]], adv=[[1.0]]))


def _cov_inputs(reduce_sum=None):
    # on-policy; mean Â = 0, mean log π = −2 → cov = Â (log π + 2) = 2, 2, −2, −2 (+ a masked NaN token)
    return make(
        [[-1.0, -3.0, -3.0, -1.0, NAN]],
        adv=[[2.0, -2.0, 2.0, -2.0, NAN]],
        mask=[[True, True, True, True, False]],
        reduce_sum=reduce_sum,
    )


def test_clip_cov_hand():
    # candidates: 1 < cov < 5 → t0, t1. ratio 0.5 → n = max(⌊0.5·4⌋, 1) = 2 → both zeroed
    loss, grad, m = run(L.clip_cov_loss, _cov_inputs(), clip_cov_ratio=0.5)
    close(loss, [[0.0, 0.0, -2.0, 2.0, 0.0]])  # others: on-policy PPO ℓ = −Â
    close(grad, [[0.0, 0.0, -2.0, 2.0, 0.0]])
    close(m["clipcov/selected_frac"], 0.5)
    close(m["clipcov/candidate_frac"], 0.5)
    # default r = 2e-4 → n = max(0, 1) = 1: exactly one of t0, t1 is zeroed
    loss, _, _ = run(L.clip_cov_loss, _cov_inputs(), generator=torch.Generator().manual_seed(0))
    assert (loss[0, :2] == 0).sum() == 1 and loss[0, 2:4].tolist() == [-2.0, 2.0]


def test_clip_cov_means_span_ranks():
    # another rank holds 4 tokens with ΣÂ = 8, Σlog π = −8 → global mean Â = 1, mean log π = −2
    # cov = (Â − 1)(log π + 2) = 1, 3, −1, −3 → only t1 is in (1, 5)
    other = torch.tensor([8.0, -8.0, 4.0], dtype=F64)
    loss, _, _ = run(L.clip_cov_loss, _cov_inputs(lambda x: x + other), clip_cov_ratio=0.5)
    close(loss, [[-2.0, 0.0, -2.0, 2.0, 0.0]])


def test_kl_cov_hand():
    # as the Clip-Cov example but log r = 0.1, 0.1, −0.1, −0.1 (old = log π − log r); cov = 2, 2, −2, −2
    inputs = _cov_inputs()
    inputs.old_logprobs = torch.tensor([[-1.1, -3.1, -2.9, -0.9, NAN]], dtype=F64)
    loss, grad, m = run(L.kl_cov_loss, inputs, kl_cov_ratio=0.25, kl_coef=1.0)
    # k = ⌊0.25·4⌋ = 1 → top cov: tie t0/t1 broken by position → t0
    # t0: −r Â + β|log r| = −2e^{0.1} + 0.1 = −2.110342 ; grad −r Â + β sign(log r) = −2.210342 + 1
    # t1: −e^{0.1}(−2) = 2.210342 ; t2: −2e^{−0.1} = −1.809675 ; t3: 1.809675 ; grads −r Â = the same values
    e1, em1 = 2.2103418361512954, 1.809674836071919
    close(loss, [[-e1 + 0.1, e1, -em1, em1, 0.0]])
    close(grad, [[-e1 + 1.0, e1, -em1, em1, 0.0]])
    close(m["klcov/selected_frac"], 0.25)
    close(m["klcov/abs_log_ratio_mean"], 0.1)


# ---------------------------------------------------------------------------------------------------------
# Loop references over random shapes and seeds
# ---------------------------------------------------------------------------------------------------------


def _compare(fn, kw, reference, inputs):
    loss, grad, _ = run(fn, inputs, **kw)
    ref_loss, ref_grad = reference[:2]
    close(loss, ref_loss, 1e-9)
    close(grad, ref_grad, 1e-9)


@pytest.mark.parametrize("B,T,seed", SHAPES)
def test_against_reference(B, T, seed):
    i = ref.random_inputs(B, T, seed)
    it = ref.random_inputs(B, T, seed, per_token_adv=True)
    lp, old, adv, m = i.logprobs, i.old_logprobs, i.advantages, i.response_mask
    _compare(L.reinforce_loss, {}, ref.reinforce(lp, it.advantages, m), it)
    for kw in [{}, {"clip_high": 0.28, "dual_clip": 3.0}, {"clip_low": 0.1, "clip_high": 0.1, "dual_clip": 1.2}]:
        ref_kw = (kw.get("clip_low", 0.2), kw.get("clip_high", 0.2), kw.get("dual_clip"))
        _compare(L.ppo_clip_loss, kw, ref.ppo_clip(lp, old, it.advantages, m, *ref_kw), it)
    for eps in (3e-4, 0.05, 0.3):
        _compare(L.gspo_loss, dict(clip_low=eps, clip_high=eps), ref.gspo(lp, old, adv, m, eps, eps), i)
        want = ref.gspo(lp, old, it.advantages, m, eps, eps, per_token=True)
        _compare(L.gspo_token_loss, dict(clip_low=eps, clip_high=eps), want, it)
    _compare(L.cispo_loss, {}, ref.cispo(lp, old, adv, m, 4.0), i)
    _compare(L.cispo_loss, dict(clip_high=0.2, clip_low=0.1), ref.cispo(lp, old, adv, m, 0.2, 0.1), i)
    for mapping in ("linear", "exp"):
        want = ref.steer(lp, old, it.advantages, it.entropy, m, 0.2, 0.28, 3.0, 0.8, 1.2, mapping)
        _compare(L.steer_loss, dict(clip_high=0.28, mapping=mapping), want, it)
    for ratio in (2e-4, 0.3):
        keys = torch.rand((B, T), generator=torch.Generator().manual_seed(seed))
        want = ref.clip_cov(lp, old, it.advantages, m, 0.2, 0.2, ratio, 1.0, 5.0, keys)
        gen = torch.Generator().manual_seed(seed)
        _compare(L.clip_cov_loss, dict(clip_cov_ratio=ratio, generator=gen), want, it)
    for kw in [dict(kl_cov_ratio=0.3), dict(kl_cov_ratio=0.1, kl_coef=0.5, clip_low=0.2, clip_high=0.28)]:
        want = ref.kl_cov(lp, old, it.advantages, m, kw["kl_cov_ratio"], kw.get("kl_coef", 1.0),
                          kw.get("clip_low"), kw.get("clip_high"))  # fmt: skip
        _compare(L.kl_cov_loss, kw, want, it)


# ---------------------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------------------

CASES = {
    "reinforce": (L.reinforce_loss, {}),
    "ppo_clip": (L.ppo_clip_loss, {"dual_clip": 2.0}),
    "gspo": (L.gspo_loss, {"clip_low": 0.05, "clip_high": 0.05}),
    "gspo_token": (L.gspo_token_loss, {"clip_low": 0.05, "clip_high": 0.05}),
    "cispo": (L.cispo_loss, {"clip_high": 0.2, "clip_low": 0.2}),
    "steer": (L.steer_loss, {}),
    # ratio 1 selects every candidate, which makes the random draw irrelevant (needed for padding)
    "clip_cov": (L.clip_cov_loss, {"clip_cov_ratio": 1.0, "cov_low": 0.0, "cov_high": 3.0}),
    "kl_cov": (L.kl_cov_loss, {"kl_cov_ratio": 0.3}),
}

dims = given(B=st.integers(1, 4), T=st.integers(1, 6), seed=st.integers(0, 10_000), per_token=st.booleans())
few = settings(max_examples=15, deadline=None)


@pytest.mark.parametrize("name", CASES)
@few
@dims
def test_masked_garbage_changes_nothing(name, B, T, seed, per_token):
    fn, kw = CASES[name]
    clean = poison(ref.random_inputs(B, T, seed, per_token_adv=per_token), 0.0)
    assert_same_result(fn, kw, clean, poison(clean, NAN))
    assert_same_result(fn, kw, clean, poison(clean, 1e30))


@pytest.mark.parametrize("name", CASES)
@few
@dims
def test_appended_padding_changes_nothing(name, B, T, seed, per_token):
    fn, kw = CASES[name]
    inputs = ref.random_inputs(B, T, seed, per_token_adv=per_token)
    pad = lambda x, v: torch.cat([x.detach(), torch.full((B, 3), v, dtype=x.dtype)], 1)  # noqa: E731
    padded = dataclasses.replace(
        inputs,
        logprobs=pad(inputs.logprobs, NAN).requires_grad_(),
        old_logprobs=pad(inputs.old_logprobs, NAN),
        advantages=pad(inputs.advantages, NAN),
        response_mask=torch.cat([inputs.response_mask, torch.zeros(B, 3, dtype=torch.bool)], 1),
        rollout_logprobs=pad(inputs.rollout_logprobs, NAN),
        entropy=pad(inputs.entropy, NAN),
    )
    assert_same_result(fn, kw, inputs, padded, crop=T)


@pytest.mark.parametrize("name", CASES)
@few
@dims
def test_only_logprobs_receive_gradient_and_fractions_are_fractions(name, B, T, seed, per_token):
    fn, kw = CASES[name]
    inputs = ref.random_inputs(B, T, seed, per_token_adv=per_token)
    leaf = lambda x: x.detach().clone().requires_grad_()  # noqa: E731
    others = [leaf(inputs.old_logprobs), leaf(inputs.advantages), leaf(inputs.rollout_logprobs), leaf(inputs.entropy)]
    inputs = dataclasses.replace(
        inputs, old_logprobs=others[0], advantages=others[1], rollout_logprobs=others[2], entropy=others[3]
    )
    out = fn(inputs, **kw)
    out.loss.sum().backward()
    assert all(x.grad is None for x in others)
    assert torch.isfinite(inputs.logprobs.grad).all()
    assert torch.all(out.loss[~inputs.response_mask] == 0)
    for key, value in out.metrics.items():
        assert value.dim() == 0, key
        # ±inf is the identity a *_max / *_min takes on an empty mask (ops.masking); everything else is finite
        assert torch.isfinite(value) or (key.endswith(("_max", "_min")) and not inputs.response_mask.any()), key
        if "frac" in key:
            assert 0.0 <= value.item() <= 1.0, key


@pytest.mark.parametrize("name", ["ppo_clip", "gspo", "gspo_token", "cispo", "kl_cov"])
@few
@dims
def test_on_policy_gradient_equals_reinforce(name, B, T, seed, per_token):
    """At r ≡ 1 (π_θ = π_old numerically) every clip is inactive: the gradient is −Â ∇log π_θ."""
    fn, kw = CASES[name]
    inputs = ref.random_inputs(B, T, seed, per_token_adv=per_token and name != "gspo")
    inputs.old_logprobs = inputs.logprobs.detach().clone()
    _, want, _ = run(L.reinforce_loss, inputs)
    _, grad, _ = run(fn, inputs, **kw)
    torch.testing.assert_close(grad, want, rtol=1e-12, atol=1e-12)
