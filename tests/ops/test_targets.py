"""LCO (arXiv 2603.00963, methods.md §3): target rules, binary decomposition, per-token losses."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from steadyrl.ops.targets import (
    binary_kl,
    lco_kld_loss,
    lco_lch_loss,
    lco_mse_loss,
    logit_shift_for_target,
    ratio_rule_target,
    shifted_probability,
)
from steadyrl.types import LossInputs


def _inputs(logprobs, old, adv, mask, token_logits=None, old_token_logits=None):
    return LossInputs(
        logprobs=logprobs,
        old_logprobs=old,
        advantages=adv,
        response_mask=mask,
        token_logits=token_logits,
        old_token_logits=old_token_logits,
    )


def full_target(p_old_full: torch.Tensor, a: int, p_target: float) -> torch.Tensor:
    """Loop reference from the paper: π'(a) = p', π'(v) = π_old(v)·(1 − p')/(1 − p_old(a)) for v ≠ a."""
    out = torch.empty_like(p_old_full)
    rest = 1.0 - p_old_full[a].item()
    for v in range(p_old_full.numel()):
        out[v] = p_target if v == a else p_old_full[v].item() * (1.0 - p_target) / rest
    return out


def test_ratio_rule_hand_values():
    # p_old = 0.25: Â > 0 -> p' = 1.8 * 0.25 = 0.45; Â < 0 -> 0.9 * 0.25 = 0.225; Â = 0 -> 0.25.
    p = torch.tensor([0.25, 0.25, 0.25, 0.7])
    adv = torch.tensor([1.0, -2.0, 0.0, 1.0])
    got = ratio_rule_target(p, adv)
    # 0.7 * 1.8 = 1.26 > 1 -> capped at 1 - 1e-4.
    assert torch.allclose(got, torch.tensor([0.45, 0.225, 0.25, 1 - 1e-4]))


def test_logit_shift_closed_form():
    # methods.md §3: e^{Δz} = ρ(1 − p)/(1 − ρ p). p = 0.25, ρ = 1.8: 1.8 * 0.75 / (1 − 0.45) = 1.35/0.55.
    p = torch.tensor([0.25])
    shift = logit_shift_for_target(p, torch.tensor([0.45]))
    assert math.isclose(shift.item(), math.log(1.35 / 0.55), rel_tol=1e-6)
    # and shifting by it recovers p' = 0.45
    assert math.isclose(shifted_probability(p, shift).item(), 0.45, rel_tol=1e-6)


def test_shifted_probability_matches_softmax_of_shifted_logits():
    torch.manual_seed(0)
    z = torch.randn(7)
    a = 3
    shift = torch.tensor(0.8)
    z2 = z.clone()
    z2[a] += shift
    expected = torch.softmax(z2, 0)[a]
    got = shifted_probability(torch.softmax(z, 0)[a], shift)
    assert torch.allclose(got, expected, atol=1e-6)


def test_binary_kl_hand_value():
    # KL(Bern(0.5) || Bern(0.25)) = 0.5 ln(0.5/0.25) + 0.5 ln(0.5/0.75) = 0.5 ln 2 + 0.5 ln(2/3)
    got = binary_kl(torch.tensor([0.5]), torch.log(torch.tensor([0.25])))
    assert math.isclose(got.item(), 0.5 * math.log(2) + 0.5 * math.log(2 / 3), rel_tol=1e-6)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("target", ["ratio", "exp"])
def test_on_policy_kld_equals_full_vocabulary_kl_value_and_gradient(seed, target):
    """The key identity: with π_old = π_θ the binary loss has the full KL(π' ‖ π_θ)'s value and logit gradient."""
    torch.manual_seed(seed)
    n, vocab = 6, 11
    z = torch.randn(n, vocab, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(vocab, (n,))
    adv = torch.randn(n, dtype=torch.float64)
    logp_full = torch.log_softmax(z, -1)
    logp = logp_full.gather(1, ids[:, None]).squeeze(1)
    inputs = _inputs(logp[None], logp.detach()[None], adv[None], torch.ones(1, n, dtype=torch.bool))
    loss = lco_kld_loss(inputs, target=target, beta=0.7).loss.sum()
    (grad_binary,) = torch.autograd.grad(loss, z)

    z_ref = z.detach().clone().requires_grad_(True)
    p_old = torch.softmax(z_ref.detach(), -1)
    total = torch.zeros((), dtype=torch.float64)
    for i in range(n):
        p_a = p_old[i, ids[i]].item()
        if target == "ratio":
            rho = 1.8 if adv[i] > 0 else 0.9 if adv[i] < 0 else 1.0
            p_t, weight = min(rho * p_a, 1 - 1e-4), abs(adv[i].item())
        else:
            e = math.exp(adv[i].item() / 0.7)
            p_t, weight = p_a * e / (1 - p_a + p_a * e), 1.0
        q = full_target(p_old[i], ids[i].item(), p_t)
        total = total + weight * torch.sum(q * (torch.log(q) - torch.log_softmax(z_ref[i], -1)))
    (grad_full,) = torch.autograd.grad(total, z_ref)
    assert torch.allclose(loss, total, atol=1e-9)
    assert torch.allclose(grad_binary, grad_full, atol=1e-9)


def test_off_policy_decomposition_identity():
    """KL(π'‖π_θ) = KL_bin(p'‖p_θ) + (1 − p')·KL(π_old(·|rest) ‖ π_θ(·|rest)); the loss keeps the first term."""
    torch.manual_seed(3)
    vocab, a = 9, 4
    p_old = torch.softmax(torch.randn(vocab, dtype=torch.float64), 0)
    p_new = torch.softmax(torch.randn(vocab, dtype=torch.float64), 0)
    p_t = 0.6
    q = full_target(p_old, a, p_t)
    full = torch.sum(q * (q.log() - p_new.log()))
    rest = torch.arange(vocab) != a
    old_rest, new_rest = p_old[rest] / p_old[rest].sum(), p_new[rest] / p_new[rest].sum()
    within = torch.sum(old_rest * (old_rest.log() - new_rest.log()))
    binary = binary_kl(torch.tensor(p_t, dtype=torch.float64), p_new[a].log())
    assert torch.allclose(full, binary + (1 - p_t) * within, atol=1e-12)


def test_mse_and_lch_on_sampled_logit_shift():
    # exp rule, β = 0.5, Â = 1 -> Δz = 2. z_θ − z_old = 0.5 -> residual −1.5:
    # MSE = ½·2.25 = 1.125, gradient w.r.t. z_θ = −1.5; LCH = log cosh(1.5), gradient tanh(−1.5).
    z = torch.tensor([[0.5]], requires_grad=True)
    inputs = _inputs(
        torch.log(torch.tensor([[0.3]])), torch.log(torch.tensor([[0.3]])), torch.ones(1, 1),
        torch.ones(1, 1, dtype=torch.bool), token_logits=z, old_token_logits=torch.zeros(1, 1),
    )
    mse = lco_mse_loss(inputs, beta=0.5).loss
    assert math.isclose(mse.item(), 1.125, rel_tol=1e-6)
    (g,) = torch.autograd.grad(mse.sum(), z)
    assert math.isclose(g.item(), -1.5, rel_tol=1e-6)
    lch = lco_lch_loss(inputs, beta=0.5).loss
    assert math.isclose(lch.item(), math.log(math.cosh(1.5)), rel_tol=1e-5)
    (g,) = torch.autograd.grad(lch.sum(), z)
    assert math.isclose(g.item(), math.tanh(-1.5), rel_tol=1e-5)


def test_mse_without_logits_is_a_clear_error():
    inputs = _inputs(torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="token_logits"):
        lco_mse_loss(inputs)


@settings(deadline=None, max_examples=25)
@given(st.integers(0, 10_000), st.sampled_from([lco_kld_loss, lco_mse_loss, lco_lch_loss]))
def test_masked_garbage_changes_nothing(seed, loss_fn):
    g = torch.Generator().manual_seed(seed)
    b, t = 3, 5
    logp = -torch.rand(b, t, generator=g) * 3 - 1e-3
    old = -torch.rand(b, t, generator=g) * 3 - 1e-3
    adv = torch.randn(b, t, generator=g)
    zl, zo = torch.randn(b, t, generator=g), torch.randn(b, t, generator=g)
    mask = torch.rand(b, t, generator=g) > 0.3
    clean = loss_fn(_inputs(logp, old, adv, mask, zl, zo)).loss
    dirty = [torch.where(mask, x, torch.full_like(x, float("nan"))) for x in (logp, old, adv, zl, zo)]
    got = loss_fn(_inputs(*dirty[:3], mask, *dirty[3:])).loss
    assert torch.equal(clean, got)
    assert torch.all(got[~mask] == 0)
