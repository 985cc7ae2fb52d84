"""Tests for steadyrl.ops.losses_offpolicy: hand-computed values, loop references, properties.

Run: .venv/bin/python -m pytest -q tests/ops/test_losses_offpolicy.py
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import reference_losses as ref
from reference_losses import NAN, assert_same_result, close, make, poison, run
from steadyrl.ops import losses as L
from steadyrl.ops import losses_offpolicy as O

SHAPES = [(1, 1, 0), (2, 5, 1), (4, 7, 2), (3, 16, 3), (8, 4, 4), (5, 9, 5)]
log = math.log

# ---------------------------------------------------------------------------------------------------------
# Hand-computed values
# ---------------------------------------------------------------------------------------------------------


def _minirl_inputs(with_rollout=True):
    # staleness r = π_θ/π_old = 1.5, 0.7, 1, 1.2 ; IS ρ = π_θ/μ = 1, 1, 8, 0.5 ; Â = 1, −1, 1, −1 ; + masked NaN
    lp = [-1.0, -1.0, -2.0, -1.0, NAN]
    return make(
        [lp],
        old=[[-1.0 - log(1.5), -1.0 - log(0.7), -2.0, -1.0 - log(1.2), NAN]],
        rollout=[[-1.0, -1.0, -2.0 - log(8.0), -1.0 - log(0.5), NAN]] if with_rollout else None,
        adv=[[1.0, -1.0, 1.0, -1.0, NAN]],
        mask=[[True, True, True, True, False]],
    )


def test_reinforce_is_hand():
    loss, grad, m = run(O.reinforce_is_loss, _minirl_inputs())
    # t0 Â>0, r=1.5>1.27 → M=0 ; t1 Â<0, r=0.7<0.8 → M=0
    # t2 w = min(8, 5) = 5 → ℓ = −5·1·(−2) = 10, grad −5 ; t3 w = 0.5 → ℓ = −0.5·(−1)·(−1) = −0.5, grad 0.5
    close(loss, [[0.0, 0.0, 10.0, -0.5, 0.0]])
    close(grad, [[0.0, 0.0, -5.0, 0.5, 0.0]])
    close(m["minirl/masked_frac"], 0.5)
    close(m["minirl/is_weight_mean"], (1 + 1 + 5 + 0.5) / 4)  # truncated weights, before the mask
    close(m["minirl/is_weight_max"], 5.0)
    close(m["minirl/is_truncated_frac"], 0.25)


def test_reinforce_is_falls_back_to_old_without_rollout():
    loss, grad, _ = run(O.reinforce_is_loss, _minirl_inputs(with_rollout=False))
    # μ = π_old: t2 ρ = 1 → ℓ = 2, grad −1 ; t3 ρ = r = 1.2 → ℓ = −1.2·(−1)·(−1) = −1.2, grad 1.2
    close(loss, [[0.0, 0.0, 2.0, -1.2, 0.0]])
    close(grad, [[0.0, 0.0, -1.0, 1.2, 0.0]])


def _dppo_inputs(p, q, adv):
    lp = [[log(x) for x in p] + [NAN]]
    return make(lp, old=lp, rollout=[[log(x) for x in q] + [NAN]], adv=[adv + [NAN]], mask=[[True] * len(p) + [False]])


def test_dppo_binary_tv_hand():
    # (π_θ, μ, Â): (0.6, 0.4, +1) (0.3, 0.5, +1) (0.3, 0.5, −1) (0.45, 0.4, −1); δ = 0.15, π_old = π_θ
    inputs = _dppo_inputs([0.6, 0.3, 0.3, 0.45], [0.4, 0.5, 0.5, 0.4], [1.0, 1.0, -1.0, -1.0])
    loss, grad, m = run(O.dppo_binary_tv_loss, inputs)
    # t0 p − q = 0.2 > δ, Â>0 moving up → masked ; t1 moving down with Â>0 → kept, w = 0.6:
    #   ℓ = −1·0.6·log 0.3 = 0.722384, grad −0.6 ; t2 p − q = −0.2 < −δ with Â<0 → masked
    # t3 |p − q| = 0.05 → kept, w = 1.125: ℓ = 1.125·log 0.45 = −0.898321, grad 1.125
    close(loss, [[0.0, 0.7223836825955616, 0.0, -0.898321158244993, 0.0]])
    close(grad, [[0.0, -0.6, 0.0, 1.125, 0.0]])
    close(m["dppo/masked_frac"], 0.5)
    close(m["dppo/masked_frac_pos"], 0.25)
    close(m["dppo/masked_frac_neg"], 0.25)
    close(m["dppo/divergence_mean"], (0.2 + 0.2 + 0.2 + 0.05) / 4)
    # anchor at π_old (= π_θ here): D = 0, nothing masked; the IS weight stays π_θ/μ
    # t0 w = 1.5: ℓ = −1.5·log 0.6 = 0.766238 ; t2 w = 0.6, Â = −1: ℓ = 0.6·log 0.3 = −0.722384
    loss, grad, m = run(O.dppo_binary_tv_loss, inputs, anchor="old")
    close(loss, [[0.7662384356489861, 0.7223836825955616, -0.7223836825955616, -0.898321158244993, 0.0]])
    close(grad, [[-1.5, -0.6, 0.6, 1.125, 0.0]])
    close(m["dppo/masked_frac"], 0.0)
    with pytest.raises(ValueError, match="anchor"):
        O.dppo_binary_tv_loss(inputs, anchor="ref")


def test_dppo_binary_kl_rejects_an_impossible_token_rather_than_keeping_it():
    # log π_θ = +0.1 (p = 1.105 > 1, only numerically possible) makes the binary KL NaN: verl keeps a token
    # only when D ≤ δ, so NaN fails that test and the token is masked; "D > δ" would have kept it.
    inputs = _dppo_inputs([0.5, 0.5], [0.4, 0.4], [1.0, 1.0])
    inputs.logprobs.data[0, 0] = 0.1
    loss, grad, m = run(O.dppo_binary_kl_loss, inputs)
    assert loss[0, 0] == 0.0 and grad[0, 0] == 0.0
    close(m["dppo/masked_frac_pos"], 1 / 2)


def test_dppo_binary_kl_hand():
    # (π_θ, μ, Â): (0.6, 0.4, +1) (0.45, 0.5, +1) (0.3, 0.5, −1) (0.42, 0.4, −1); δ = 0.05
    inputs = _dppo_inputs([0.6, 0.45, 0.3, 0.42], [0.4, 0.5, 0.5, 0.4], [1.0, 1.0, -1.0, -1.0])
    loss, grad, m = run(O.dppo_binary_kl_loss, inputs)
    # D = q log(q/p) + (1−q) log((1−q)/(1−p)):
    # t0 0.4·log(0.4/0.6) + 0.6·log(0.6/0.4) = 0.081093 > δ, p > q, Â>0 → masked
    # t1 D = 0.005025, moving down with Â>0 → kept, w = 0.9: ℓ = −0.9·log 0.45 = 0.718657, grad −0.9
    # t2 D = 0.5·log(0.5/0.3) + 0.5·log(0.5/0.7) = 0.087177 > δ, p < q, Â<0 → masked
    # t3 D = 0.000825 → kept, w = 1.05: ℓ = 1.05·log 0.42 = −0.910876, grad 1.05
    close(loss, [[0.0, 0.7186569265959944, 0.0, -0.9108755960899593, 0.0]])
    close(grad, [[0.0, -0.9, 0.0, 1.05, 0.0]])
    close(m["dppo/masked_frac"], 0.5)
    close(m["dppo/divergence_mean"], (0.08109302162163282 + 0.005025167926750729 + 0.08717669357238891 + 0.0008248653376359376) / 4)


def test_cpgd_hand():
    # log r = log 1.5, log 0.5, 0.1 ; Â = 1, −1, 2 ; ε = 0.2 → bounds log 0.8 = −0.223144, log 1.2 = 0.182322
    inputs = make([[-1.0, -1.0, -1.0]], old=[[-1.0 - log(1.5), -1.0 - log(0.5), -1.1]], adv=[[1.0, -1.0, 2.0]])
    loss, grad, m = run(O.cpgd_loss, inputs)
    # t0 clipped high: −0.182322 + 0.1·k3(1.5) where k3 = r − 1 − log r = 0.094535 → −0.172868 ;
    #    grad: clip term 0, drift α(r − 1) = 0.05
    # t1 clipped low: −(−0.223144·−1) + 0.1·(0.5 − 1 + 0.693147) = −0.223144 + 0.019315 = −0.203829 ; grad −0.05
    # t2 unclipped: −0.1·2 + 0.1·(e^{0.1} − 1.1) = −0.199483 ; grad −Â + α(e^{0.1} − 1) = −1.989483
    close(loss, [[-0.17286806760477103, -0.20382883325821524, -0.19948290819243525]])
    close(grad, [[0.05, -0.05, -1.9894829081924352]])
    close(m["ratio/clip_frac_high"], 1 / 3)
    close(m["ratio/clip_frac_low"], 1 / 3)
    loss, grad, _ = run(O.cpgd_loss, inputs, kl_estimator="k1")
    # k1 = −log r: t2 ℓ = −0.2 + 0.1·(−0.1) = −0.21, grad −2 − 0.1 = −2.1
    close(loss[0, 2], -0.21)
    close(grad[0, 2], -2.1)
    with pytest.raises(ValueError, match="kl_estimator"):
        O.cpgd_loss(inputs, kl_estimator="k4")


def _bapo_inputs(reduce_sum=None):
    # old = 0 → r = 1, 1, 0.5, 2.5 ; Â = 1, −1, −1, 1 ; + masked NaN
    lp = [[0.0, 0.0, log(0.5), log(2.5), NAN]]
    return make(lp, old=[[0.0] * 5], adv=[[1.0, -1.0, -1.0, 1.0, NAN]], mask=[[True] * 4 + [False]], reduce_sum=reduce_sum)


def test_bapo_hand():
    # pos = 1 + min(2.5, c_high), neg = 1 + max(0.5, c_low) = 1 + c_low
    # target 1.52: raising c_low only lowers pos/neg (2.2/1.6 … 2.2/1.8); then c_high: (1+1.70)/1.8 = 1.5 < 1.52,
    # (1+1.75)/1.8 = 1.528 ≥ 1.52 → c_low = 0.8, c_high = 1.75
    loss, grad, m = run(O.bapo_loss, _bapo_inputs(), target=1.52)
    # ℓ: −1 ; 1 ; t2 r=0.5 < 0.8 → −(0.8·−1) = 0.8, grad 0 ; t3 r=2.5 > 1.75 → −1.75, grad 0
    close(loss, [[-1.0, 1.0, 0.8, -1.75, 0.0]])
    close(grad, [[-1.0, 1.0, 0.0, 0.0, 0.0]])
    close(m["bapo/c_low"], 0.8)
    close(m["bapo/c_high"], 1.75)
    close(m["bapo/pos_share"], 2.75 / (2.75 + 1.8))
    # target 1: the start (0.6, 1.2) already gives 2.2/1.6 = 1.375 → kept; target 100: never met → last (0.8, 2.0)
    loss, _, m = run(O.bapo_loss, _bapo_inputs(), target=1.0)
    close([m["bapo/c_low"], m["bapo/c_high"]], [0.6, 1.2])
    close(loss, [[-1.0, 1.0, 0.6, -1.2, 0.0]])
    _, _, m = run(O.bapo_loss, _bapo_inputs(), target=100.0)
    close([m["bapo/c_low"], m["bapo/c_high"]], [0.8, 2.0])


def test_bapo_search_uses_all_ranks():
    # the other rank adds pos 10 to every candidate's sums → pos/neg ≥ 1.52 at the start (0.6, 1.2)
    other = torch.zeros(2, 21, dtype=torch.float64)
    other[0] = 10.0
    _, _, m = run(O.bapo_loss, _bapo_inputs(lambda x: x + other), target=1.52)
    close([m["bapo/c_low"], m["bapo/c_high"]], [0.6, 1.2])


def test_bapo_split_batch_matches_whole_batch():
    whole = ref.random_inputs(6, 5, 7, spread=0.6)
    halves = [dataclasses.replace(whole, **{f: getattr(whole, f)[s] for f in
              ("logprobs", "old_logprobs", "advantages", "response_mask", "rollout_logprobs", "entropy")})
              for s in (slice(0, 3), slice(3, 6))]  # fmt: skip
    for target in (0.5, 1.0, 1.3, 2.0):
        captured = []
        O.bapo_loss(dataclasses.replace(halves[1], reduce_sum=lambda x, sink=captured: sink.append(x) or x), target=target)
        first = dataclasses.replace(halves[0], reduce_sum=lambda x, other=captured: x + other[0])
        _, _, m_split = run(O.bapo_loss, first, target=target)
        _, _, m_whole = run(O.bapo_loss, whole, target=target)
        close([m_split["bapo/c_low"], m_split["bapo/c_high"]], [m_whole["bapo/c_low"], m_whole["bapo/c_high"]])


def test_vespo_hand():
    # seq 0: log W = log 2 (+ a masked NaN token), Â = 1 → φ = W² e^{3(1−W)} = 4e^{−3} = 0.199148
    #        ℓ = −φ·1·log π = 0.199148, 0.398297 ; grad −φ
    # seq 1: W = 0.5, Â = −1 → φ = W³ e^{2(1−W)} = 0.125 e = 0.339785 ; ℓ = φ·log π = −0.169893, −0.339785 ; grad φ
    inputs = make(
        [[-1.0, -2.0, NAN], [-0.5, -1.0, -3.0]],
        rollout=[[-1.0 - log(2.0), -2.0, NAN], [-0.5 - log(0.5), -1.0, -3.0]],
        old=[[0.0, 0.0, NAN], [0.0, 0.0, 0.0]],  # VESPO weighs against μ, not π_old
        adv=[[1.0, 1.0, NAN], [-1.0, -1.0, -1.0]],
        mask=[[True, True, False], [True, True, False]],
    )
    phi0, phi1 = 4 * math.exp(-3), 0.125 * math.e
    loss, grad, m = run(O.vespo_loss, inputs)
    close(loss, [[phi0, 2 * phi0, 0.0], [-0.5 * phi1, -phi1, 0.0]])
    close(grad, [[-phi0, -phi0, 0.0], [phi1, phi1, 0.0]])
    close(m["vespo/phi_max"], phi1)
    close(m["vespo/log_w_mean"], 0.0)  # (log 2 + log 0.5)/2
    close(m["vespo/log_w_max"], log(2.0))
    close(m["vespo/log_w_min"], log(0.5))


def test_minpro_hand():
    # ρ = 0.5, 2, [masked 0.1], 1.5, 0.8 ; log π = −1, Â = 1 → ℓ = w, grad −w
    # w_t = min(ρ_t, C)·min(min_{i<t} ρ_i, 1): 0.5·1, 2·0.5, —, 1.5·0.5, 0.8·0.5 (the masked 0.1 never counts)
    rho = [0.5, 2.0, 0.1, 1.5, 0.8]
    inputs = make(
        [[-1.0, -1.0, NAN, -1.0, -1.0]],
        rollout=[[-1.0 - log(r) for r in rho]],
        adv=[[1.0, 1.0, NAN, 1.0, 1.0]],
        mask=[[True, True, False, True, True]],
    )
    loss, grad, m = run(O.minpro_loss, inputs)
    close(loss, [[0.5, 1.0, 0.0, 0.75, 0.4]])
    close(grad, [[-0.5, -1.0, 0.0, -0.75, -0.4]])
    close(m["minpro/prefix_weight_mean"], (1 + 0.5 + 0.5 + 0.5) / 4)
    loss, _, _ = run(O.minpro_loss, inputs, include_current=True)
    close(loss, [[0.25, 1.0, 0.0, 0.75, 0.4]])  # t0 now also takes min(ρ_0, 1) = 0.5
    loss, _, m = run(O.minpro_loss, inputs, is_cap=1.0)
    close(loss, [[0.5, 0.5, 0.0, 0.5, 0.4]])  # min(ρ, 1) · prefix
    close(m["minpro/is_truncated_frac"], 0.5)


# ---------------------------------------------------------------------------------------------------------
# Loop references over random shapes and seeds
# ---------------------------------------------------------------------------------------------------------


def _compare(fn, kw, reference, inputs):
    loss, grad, _ = run(fn, inputs, **kw)
    close(loss, reference[0], 1e-9)
    close(grad, reference[1], 1e-9)


@pytest.mark.parametrize("B,T,seed", SHAPES)
def test_against_reference(B, T, seed):
    i = ref.random_inputs(B, T, seed, per_token_adv=True)
    lp, old, mu, adv, m = i.logprobs, i.old_logprobs, i.rollout_logprobs, i.advantages, i.response_mask
    for kw in [{}, dict(clip_low=0.1, clip_high=0.1, is_cap=1.5)]:
        want = ref.reinforce_is(lp, old, mu, adv, m, kw.get("clip_low", 0.2), kw.get("clip_high", 0.27), kw.get("is_cap", 5.0))
        _compare(O.reinforce_is_loss, kw, want, i)
    for div, fn, delta in (("tv", O.dppo_binary_tv_loss, 0.15), ("kl", O.dppo_binary_kl_loss, 0.05)):
        for anchor in ("rollout", "old"):
            _compare(fn, dict(anchor=anchor), ref.dppo(lp, old, mu, adv, m, div, delta, delta, 10.0, anchor), i)
        kw = dict(delta_low=delta / 3, delta_high=delta / 2, is_cap=1.2)
        _compare(fn, kw, ref.dppo(lp, old, mu, adv, m, div, delta / 3, delta / 2, 1.2), i)
    for est in ("k1", "k2", "k3"):
        kw = dict(clip_low=0.1, clip_high=0.15, drift_coef=0.3, kl_estimator=est)
        _compare(O.cpgd_loss, kw, ref.cpgd(lp, old, adv, m, 0.1, 0.15, 0.3, est), i)
    wide = ref.random_inputs(B, T, seed, spread=0.6)
    for target in (0.5, 1.0, 1.5, 3.0):
        want = ref.bapo(wide.logprobs, wide.old_logprobs, wide.advantages, wide.response_mask,
                        0.6, 0.8, 0.05, 1.2, 2.0, 0.05, target, 3.0, 1e-8)  # fmt: skip
        loss, grad, metrics = run(O.bapo_loss, wide, target=target)
        close(loss, want[0], 1e-9)
        close(grad, want[1], 1e-9)
        close([metrics["bapo/c_low"], metrics["bapo/c_high"]], want[2:], 1e-9)
    _compare(O.vespo_loss, {}, ref.vespo(lp, mu, adv, m, 2.0, 3.0, 3.0, 2.0), i)
    _compare(O.vespo_loss, dict(c1_pos=1.0, c2_pos=1.0), ref.vespo(lp, mu, adv, m, 1.0, 1.0, 3.0, 2.0), i)
    for cap, current in ((10.0, False), (1.3, True)):
        want = ref.minpro(lp, mu, adv, m, cap, current)
        _compare(O.minpro_loss, dict(is_cap=cap, include_current=current), want, i)


# ---------------------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------------------


def _without_rollout(fn):
    return lambda inputs, **kw: fn(dataclasses.replace(inputs, rollout_logprobs=None), **kw)


CASES = {
    "reinforce_is": (O.reinforce_is_loss, {}),
    "reinforce_is_no_rollout": (_without_rollout(O.reinforce_is_loss), {}),
    "dppo_binary_tv": (O.dppo_binary_tv_loss, {}),
    "dppo_binary_tv_old": (O.dppo_binary_tv_loss, {"anchor": "old"}),
    "dppo_binary_kl": (O.dppo_binary_kl_loss, {}),
    "cpgd": (O.cpgd_loss, {}),
    "bapo": (O.bapo_loss, {}),
    "vespo": (O.vespo_loss, {}),
    "minpro": (O.minpro_loss, {}),
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
    assert_same_result(fn, kw, clean, poison(clean, -1e30))


@pytest.mark.parametrize("name", CASES)
@few
@dims
def test_appended_padding_changes_nothing(name, B, T, seed, per_token):
    fn, kw = CASES[name]
    inputs = ref.random_inputs(B, T, seed, per_token_adv=per_token)
    pad = lambda x: torch.cat([x.detach(), torch.full((B, 3), NAN, dtype=x.dtype)], 1)  # noqa: E731
    padded = dataclasses.replace(
        inputs,
        logprobs=pad(inputs.logprobs).requires_grad_(),
        old_logprobs=pad(inputs.old_logprobs),
        advantages=pad(inputs.advantages),
        response_mask=torch.cat([inputs.response_mask, torch.zeros(B, 3, dtype=torch.bool)], 1),
        rollout_logprobs=pad(inputs.rollout_logprobs),
        entropy=pad(inputs.entropy),
    )
    assert_same_result(fn, kw, inputs, padded, crop=T)


@pytest.mark.parametrize("name", CASES)
@few
@dims
def test_only_logprobs_receive_gradient_and_fractions_are_fractions(name, B, T, seed, per_token):
    fn, kw = CASES[name]
    inputs = ref.random_inputs(B, T, seed, spread=1.0, per_token_adv=per_token)
    leaf = lambda x: x.detach().clone().requires_grad_()  # noqa: E731
    others = [leaf(inputs.old_logprobs), leaf(inputs.advantages), leaf(inputs.rollout_logprobs)]
    inputs = dataclasses.replace(inputs, old_logprobs=others[0], advantages=others[1], rollout_logprobs=others[2])
    out = fn(inputs, **kw)
    out.loss.sum().backward()
    assert all(x.grad is None for x in others)
    assert torch.isfinite(inputs.logprobs.grad).all()
    assert torch.all(out.loss[~inputs.response_mask] == 0)
    for key, value in out.metrics.items():
        assert value.dim() == 0, key
        # ±inf is the identity a *_max / *_min takes on an empty mask (ops.masking); everything else is finite
        assert torch.isfinite(value) or (key.endswith(("_max", "_min")) and not inputs.response_mask.any()), key
        if "frac" in key or key == "bapo/pos_share":
            assert 0.0 <= value.item() <= 1.0, key


@pytest.mark.parametrize("name", ["reinforce_is", "dppo_binary_tv", "dppo_binary_kl", "cpgd", "bapo", "vespo", "minpro"])
@few
@dims
def test_on_policy_gradient_equals_reinforce(name, B, T, seed, per_token):
    """π_θ = π_old = μ numerically: no mask, unit weights, inactive clips → gradient −Â ∇log π_θ."""
    fn, kw = CASES[name]
    inputs = ref.random_inputs(B, T, seed, per_token_adv=per_token)
    inputs.old_logprobs = inputs.logprobs.detach().clone()
    inputs.rollout_logprobs = inputs.logprobs.detach().clone()
    _, want, _ = run(L.reinforce_loss, inputs)
    _, grad, _ = run(fn, inputs, **kw)
    torch.testing.assert_close(grad, want, rtol=1e-12, atol=1e-12)


def test_vespo_guards_overflow():
    # log W = 60 → clamped at 20: φ = exp(2·20 − 3(e^{20} − 1)) underflows to 0, no inf / NaN
    inputs = make([[-0.5, -0.5, -0.5]], rollout=[[-20.5, -20.5, -20.5]], adv=[[1.0, 1.0, 1.0]])
    loss, grad, m = run(O.vespo_loss, inputs)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    close(m["vespo/log_w_max"], 20.0)
    close(loss, torch.zeros(1, 3))
