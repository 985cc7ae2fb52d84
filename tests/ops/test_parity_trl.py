"""Parity with TRL 1.16: TRL's own ``GRPOTrainer._compute_loss`` and steadyrl's ops on the same tensors,
value and gradient ≤ 1e-6 relative (float64).

Run: .venv/bin/python -m pytest -q tests/ops/test_parity_trl.py   (needs the trl extra: pip install -e '.[trl]')

TRL's loss is one scalar: the per-token terms reduced by the loss type's normaliser.  steadyrl splits the same
computation into a per-token loss (and masks / KL terms) and an aggregation, so each test names the pairing:
``sapo`` / ``grpo`` ↔ ``seq_mean_token_mean``, ``bnpo`` ↔ ``token_mean``, ``luspo`` ↔ ``seq_mean_token_sum``.
GDPO's ``normalize_then_sum`` lives inside TRL's generation step with no separable function; it is
parity-tested against verl's ``compute_gdpo_outcome_advantage`` (test_parity_verl.py).
"""

from __future__ import annotations

import pytest
import torch

from extras import requires_extra
from framework_parity import trl_grpo_loss
from steadyrl.ops.aggregation import global_counts, seq_mean_token_mean, seq_mean_token_sum, token_mean
from steadyrl.ops.kl import kl_k3
from steadyrl.ops.kl_is import kl_k3_is
from steadyrl.ops.losses import ppo_clip_loss
from steadyrl.ops.losses_adopted import luspo_loss, sapo_loss
from steadyrl.ops.masking import masked_fill_zero
from steadyrl.ops.token_masks import high_entropy_mask
from steadyrl.types import LossInputs

pytestmark = [requires_extra("trl", "trl"), pytest.mark.integration]
F64 = torch.float64
RTOL, ATOL = 1e-6, 1e-10


def _tensors(seed: int, B: int = 6, T: int = 7, spread: float = 0.3):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None] < lengths[:, None]  # right-padded, every row non-empty (as TRL's batches)
    logp = -(3 * torch.rand(B, T, generator=g, dtype=F64) + 0.05)
    old = (logp + spread * torch.randn(B, T, generator=g, dtype=F64)).clamp(max=-1e-3)
    ref = (logp + 0.4 * torch.randn(B, T, generator=g, dtype=F64)).clamp(max=-1e-3)
    adv = 1.5 * torch.randn(B, generator=g, dtype=F64)
    entropy = 3 * torch.rand(B, T, generator=g, dtype=F64)
    return logp, old, ref, adv, mask, entropy


def _ours(fn_scalar, logp):
    leaf = logp.clone().requires_grad_()
    value = fn_scalar(leaf)
    (grad,) = torch.autograd.grad(value, leaf)
    return value.detach(), grad


def _trl(logp, **kw):
    leaf = logp.clone().requires_grad_()
    value = trl_grpo_loss(logprobs=leaf, **kw)
    (grad,) = torch.autograd.grad(value, leaf)
    return value.detach(), grad


def _same(ours, theirs):
    torch.testing.assert_close(ours[0], theirs[0], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(ours[1], theirs[1], rtol=RTOL, atol=ATOL)
    assert ours[1].abs().sum() > 0  # a gradient that is 0 everywhere would pass trivially


def _inputs(leaf, old, adv, mask, **extra) -> LossInputs:
    return LossInputs(logprobs=leaf, old_logprobs=old, advantages=adv[:, None].expand_as(leaf), response_mask=mask, **extra)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("temps", [(1.0, 1.05), (0.5, 3.0)])
def test_sapo_matches_trl(seed, temps):
    logp, old, _, adv, mask, _ = _tensors(seed)
    tau_pos, tau_neg = temps

    def ours(leaf):
        loss = sapo_loss(_inputs(leaf, old, adv, mask), tau_pos=tau_pos, tau_neg=tau_neg).loss
        return seq_mean_token_mean(loss, mask, global_counts(mask, 1.0))

    theirs = _trl(logp, loss_type="sapo", old_logprobs=old, advantages=adv, mask=mask,
                  sapo_temperature_pos=tau_pos, sapo_temperature_neg=tau_neg)
    _same(_ours(ours, logp), theirs)


@pytest.mark.parametrize("seed", range(4))
def test_luspo_matches_trl_sequence_level(seed):
    logp, old, _, adv, mask, _ = _tensors(seed, spread=2e-3)  # sequence ratios straddle 1 ± 3e-4 / 4e-4

    def ours(leaf):
        loss = luspo_loss(_inputs(leaf, old, adv, mask), clip_low=3e-4, clip_high=4e-4).loss
        return seq_mean_token_sum(loss, mask, global_counts(mask, 1.0))

    theirs = _trl(logp, loss_type="luspo", old_logprobs=old, advantages=adv, mask=mask,
                  importance_sampling_level="sequence", epsilon_low=3e-4, epsilon_high=4e-4)
    _same(_ours(ours, logp), theirs)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("rho", [0.2, 0.5])
def test_top_entropy_quantile_matches_trl(seed, rho):
    logp, old, _, adv, mask, entropy = _tensors(seed)
    # TRL takes the quantile of float32 entropies (``.float()``): with fp32-representable values, as a real
    # forward produces, the float64 comparison against its threshold is exact on both sides.
    entropy = entropy.float().double()

    def ours(leaf):
        inputs = _inputs(leaf, old, adv, mask, entropy=entropy)
        keep = high_entropy_mask(inputs, top_entropy_quantile=rho).mask & mask
        loss = masked_fill_zero(ppo_clip_loss(inputs).loss, keep)
        # TRL keeps the normaliser: the masked tokens still count in the per-sequence lengths
        return seq_mean_token_mean(loss, mask, global_counts(mask, 1.0))

    theirs = _trl(logp, loss_type="grpo", old_logprobs=old, advantages=adv, mask=mask, entropies=entropy,
                  top_entropy_quantile=rho)
    _same(_ours(ours, logp), theirs)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("bias_correction", [True, False])
def test_kl_term_matches_trl(seed, bias_correction):
    logp, old, ref, adv, mask, _ = _tensors(seed)
    beta = 0.04

    def ours(leaf):
        policy = ppo_clip_loss(_inputs(leaf, old, adv, mask)).loss
        if bias_correction:
            kl = kl_k3_is(leaf, ref, mask, old_logprobs=old)
        else:
            kl = kl_k3(leaf, ref, mask, log_ratio_clamp=float("inf"), kl_clamp=float("inf"))
        return token_mean(policy + beta * kl, mask, global_counts(mask, 1.0))

    theirs = _trl(logp, loss_type="bnpo", old_logprobs=old, advantages=adv, mask=mask, ref_logprobs=ref, beta=beta,
                  use_bias_correction_kl=bias_correction)
    _same(_ours(ours, logp), theirs)


def test_kl_is_on_policy_matches_trl_without_old_logprobs():
    # TRL without an old forward uses old = logprobs.detach(): the IS weight is 1 in value, with gradient
    logp, _, ref, adv, mask, _ = _tensors(9)
    beta = 0.1

    def ours(leaf):
        policy = ppo_clip_loss(_inputs(leaf, leaf.detach(), adv, mask)).loss
        return token_mean(policy + beta * kl_k3_is(leaf, ref, mask), mask, global_counts(mask, 1.0))

    leaf = logp.clone().requires_grad_()
    value = trl_grpo_loss(loss_type="bnpo", logprobs=leaf, old_logprobs=None, advantages=adv, mask=mask,
                          ref_logprobs=ref, beta=beta)
    (grad,) = torch.autograd.grad(value, leaf)
    _same(_ours(ours, logp), (value.detach(), grad))
