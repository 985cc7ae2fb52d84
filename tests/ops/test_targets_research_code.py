"""LCO's options that reproduce the authors' research code (homzer/llama-rlhf; docs/methods/lco.md).

Each option is checked against a full-vocabulary loop written from our reading of the code's construction
(``estimate_vocab_adv`` + ``create_lco_log_target``; ``create_target_distribution``), on-policy, value and
logit gradient.  The last test records a finding about the code's ratio rule (its target keeps a gradient).

Run: .venv/bin/python -m pytest -q tests/ops/test_targets_research_code.py
"""

from __future__ import annotations

import math

import pytest
import torch

from steadyrl.ops.aggregation import global_counts, token_mean
from steadyrl.ops.targets import exp_rule_shift, lco_kld_loss, lco_lch_loss, lco_mse_loss, ratio_rule_target
from steadyrl.types import LossInputs

F64 = torch.float64


def _problem(seed, n=8, vocab=9, confident=False):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, vocab, generator=g, dtype=F64) * (4.0 if confident else 1.0)
    ids = torch.randint(vocab, (n,), generator=g)
    adv = torch.randn(n, generator=g, dtype=F64)
    adv[0] = 0.0  # a zero-advantage token (the code puts it in the negative group)
    return z, ids, adv


def _binary(z, ids, adv, loss_fn, **kw):
    """Our loss on-policy: log π_θ(a) from the logits, π_old = π_θ; (value Σ over tokens, ∂/∂z)."""
    z = z.clone().requires_grad_()
    logp = torch.log_softmax(z, -1).gather(1, ids[:, None]).squeeze(1)
    inputs = LossInputs(logprobs=logp[None], old_logprobs=logp.detach()[None], advantages=adv[None],
                        response_mask=torch.ones(1, len(ids), dtype=torch.bool))
    value = loss_fn(inputs, **kw).loss.sum()
    (grad,) = torch.autograd.grad(value, z)
    return value.detach(), grad


def _full_kl(z, targets, weights):
    """Σ_i w_i KL(q_i ‖ softmax(z_i)) over the full vocabulary with detached targets; (value, ∂/∂z)."""
    z = z.clone().requires_grad_()
    logp = torch.log_softmax(z, -1)
    value = sum(w * (q * (q.log() - lp)).sum() for q, w, lp in zip(targets, weights, logp))
    (grad,) = torch.autograd.grad(value, z)
    return value.detach(), grad


def _code_exp_target(z_old_row, a, adv, beta, floor):
    """create_lco_log_target(old_logits, estimate_vocab_adv(...)) for one token, as a loop."""
    p_old = torch.softmax(z_old_row, -1)
    pa = p_old[a].item()
    vocab_adv = []
    for v in range(len(z_old_row)):
        if v == a:
            vocab_adv.append(adv * (1 - pa) if floor is not None else adv)
        else:
            vocab_adv.append(-pa * adv * (1 - pa) / max(1 - pa, floor) if floor is not None else 0.0)
    log_target = torch.log_softmax(z_old_row, -1) + torch.tensor(vocab_adv, dtype=F64) / beta
    return torch.softmax(log_target, -1)


def _code_ratio_target(z_row, a, rho, min_p, max_p):
    """create_target_distribution for one token (values only), as a loop."""
    p = torch.softmax(z_row, -1)
    pa = p[a].item()
    rp = rho * pa
    if rho < 1 and rp < min_p:
        rp = pa
    if rho > 1 and rp > max_p:
        rp = max_p
    return torch.tensor([rp if v == a else p[v].item() * (1 - rp) / (1 - pa) for v in range(len(z_row))], dtype=F64)


def test_exp_shift_damping_hand_values():
    # p = 0.5: (1 − p)(1 + p/(1 − p)) = 1 → Δz = Â/β unchanged;  p = 0.95: 0.05·(1 + 0.95/0.1) = 0.525
    p = torch.tensor([0.5, 0.95, 0.9], dtype=F64)
    adv = torch.tensor([1.0, 1.0, -2.0], dtype=F64)
    got = exp_rule_shift(p, adv, beta=2.0, vocab_floor=0.1)
    torch.testing.assert_close(got, torch.tensor([0.5, 0.2625, -1.0], dtype=F64))  # p = 0.9 is the edge: −2/2
    torch.testing.assert_close(exp_rule_shift(p, adv, beta=2.0), adv / 2.0)
    # β for Â ≤ 0: the last trainers' 100·β
    torch.testing.assert_close(exp_rule_shift(p, adv, beta=2.0, beta_neg=200.0), torch.tensor([0.5, 0.5, -0.01], dtype=F64))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("floor", [None, 0.1])
@pytest.mark.parametrize("confident", [False, True])
def test_exp_rule_options_equal_the_code_construction(seed, floor, confident):
    z, ids, adv = _problem(seed, confident=confident)
    beta, beta_neg = 0.8, 80.0
    targets = [
        _code_exp_target(z[i], ids[i].item(), adv[i].item(), beta if adv[i] > 0 else beta_neg, floor)
        for i in range(len(ids))
    ]
    expected = _full_kl(z, targets, [1.0] * len(ids))
    ours = _binary(z, ids, adv, lco_kld_loss, target="exp", beta=beta, beta_neg=beta_neg, vocab_floor=floor)
    torch.testing.assert_close(ours[0], expected[0], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(ours[1], expected[1], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("gates", [(None, None), (0.8, 0.99), (0.3, 0.7)])
def test_ratio_rule_gates_equal_the_code_construction(seed, gates):
    z, ids, adv = _problem(seed, confident=True)
    min_p, max_p = gates
    rho_pos, rho_neg = 1.2, 0.8
    targets, weights = [], []
    for i in range(len(ids)):
        rho = rho_pos if adv[i] > 0 else rho_neg if adv[i] < 0 else 1.0
        q = _code_ratio_target(z[i], ids[i].item(), rho, min_p if min_p is not None else 0.0,
                               max_p if max_p is not None else 1 - 1e-4)
        targets.append(q)
        weights.append(abs(adv[i].item()))
    expected = _full_kl(z, targets, weights)
    ours = _binary(z, ids, adv, lco_kld_loss, target="ratio", rho_pos=rho_pos, rho_neg=rho_neg,
                   min_target_prob=min_p, max_target_prob=max_p)
    torch.testing.assert_close(ours[0], expected[0], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(ours[1], expected[1], rtol=1e-9, atol=1e-12)


def test_ratio_rule_gate_hand_values():
    # ρ⁻ = 0.9: p = 0.5 → 0.45 < 0.8 → not moved;  p = 0.95 → 0.855 ≥ 0.8 → moved.  ρ⁺ = 1.8: p = 0.6 → 1.08 → 0.99
    p = torch.tensor([0.5, 0.95, 0.6, 0.3], dtype=F64)
    adv = torch.tensor([-1.0, -1.0, 1.0, 1.0], dtype=F64)
    got = ratio_rule_target(p, adv, min_target_prob=0.8, max_target_prob=0.99)
    torch.testing.assert_close(got, torch.tensor([0.5, 0.855, 0.99, 0.54], dtype=F64))
    # with ρ⁻ = 0.8 and the 0.8 gate a negative token moves only if p = 1: in practice never (the code's defaults)
    assert torch.equal(ratio_rule_target(p, adv, rho_neg=0.8, min_target_prob=0.8)[:2], p[:2])


@pytest.mark.parametrize("loss_fn", [lco_kld_loss, lco_mse_loss, lco_lch_loss])
def test_sign_balanced_gives_the_sum_of_the_two_means(loss_fn):
    # tokens: Â = [2, −1, 0, 1, −3]; positive {0, 3}, the rest {1, 2, 4} (Â = 0 counts as negative, as the code)
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(1, 5, generator=g, dtype=F64) - 0.1
    zl = torch.randn(1, 5, generator=g, dtype=F64)
    inputs = LossInputs(logprobs=logp, old_logprobs=logp - 0.05, advantages=torch.tensor([[2.0, -1.0, 0.0, 1.0, -3.0]], dtype=F64),
                        response_mask=torch.ones(1, 5, dtype=torch.bool), token_logits=zl, old_token_logits=zl - 0.1)
    per_token = loss_fn(inputs).loss[0]
    balanced = loss_fn(inputs, sign_balanced=True).loss
    expected = per_token[[0, 3]].mean() + per_token[[1, 2, 4]].mean()
    torch.testing.assert_close(token_mean(balanced, inputs.response_mask, global_counts(inputs.response_mask, 1.0)), expected)
    # counts come through reduce_sum: another rank with 3 more tokens, 1 positive → N = 8, N₊ = 3, N₋ = 5
    other = torch.tensor([3.0, 1.0], dtype=F64)
    spread = loss_fn(LossInputs(**{**inputs.__dict__, "reduce_sum": lambda x: x + other}), sign_balanced=True).loss[0]
    torch.testing.assert_close(spread[[0, 3]], per_token[[0, 3]] * 8 / 3)
    torch.testing.assert_close(spread[[1, 2, 4]], per_token[[1, 2, 4]] * 8 / 5)


def test_research_code_ratio_target_keeps_a_gradient_that_lowers_positive_tokens():
    """Finding (docs/methods/lco.md): ``create_target_distribution`` builds π' from the *current* logits
    without a detach, so the KL's gradient also flows through π'.  For a positive-advantage token with
    ρ·p below the 0.99 cap the total logit gradient then has the opposite sign: descent lowers p.
    ``lco_kld_loss`` keeps π' fixed, so descent raises p toward ρ·p."""
    vocab, a, rho = 6, 2, 1.8
    z = torch.randn(vocab, generator=torch.Generator().manual_seed(1), dtype=F64)
    rest = torch.logsumexp(torch.cat([z[:a], z[a + 1 :]]), 0)
    z[a] = rest + math.log(0.3 / 0.7)  # p = 0.3, ρ p = 0.54 < 0.99
    zl = z.clone().requires_grad_()
    logp = torch.log_softmax(zl, 0)
    others = torch.logsumexp(torch.cat([zl[:a], zl[a + 1 :]]), 0)
    rp = rho * logp[a].exp()
    shifted = zl + torch.nn.functional.one_hot(torch.tensor(a), vocab).to(F64) * (others - zl[a] + torch.log(rp / (1 - rp)))
    log_q = torch.log_softmax(shifted, 0)
    (code_grad,) = torch.autograd.grad((log_q.exp() * (log_q - logp)).sum(), zl)
    _, our_grad = _binary(z[None], torch.tensor([a]), torch.tensor([1.0], dtype=F64), lco_kld_loss, rho_pos=rho)
    assert code_grad[a] > 0.1  # descent lowers the sampled logit
    assert our_grad[0, a] < -0.2  # descent raises it: −(ρ p − p) = −0.24
    torch.testing.assert_close(our_grad[0, a], torch.tensor(-0.24, dtype=F64))
