"""Per-token losses the frameworks made configuration switches in 2025-2026 (methods-addendum §3.1).

SAPO (TRL / verl ``sapo``), GMPO (verl ``geo_mean``), LUSPO (TRL ``luspo``), DRO (verl ``dro``), the
Kimi-K2.5 / prime-rl default loss, and DCPO's probability-dependent clip bounds.  GPG's loss is plain
REINFORCE (``losses.reinforce_loss``); its advantage is ``advantages_multi.gpg_advantages``.

Same contract as ``losses.py`` (read its module docstring): ``fn(inputs, *, hyper-parameters) ->
LossResult(loss (B, T), metrics)``, exactly 0 at masked positions, gradient only through
``inputs.logprobs``, nothing reduced.  Where a framework computes the same method, the docstring names its
function and ``tests/ops/test_parity_{trl,verl}.py`` compares value and gradient on the same tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor

from steadyrl.ops.losses import (
    _approx_kl_old,
    _behaviour_logprobs,
    _clean,
    _clipped_surrogate,
    _frac,
    _surrogate_metrics,
    gspo_loss,
)
from steadyrl.ops.masking import masked_count, masked_fill_zero, masked_max, masked_mean, masked_sum
from steadyrl.ops.ratios import token_log_ratio
from steadyrl.types import LossInputs, LossResult


def _ratio_metrics(ratio: Tensor, log_ratio: Tensor, mask: Tensor) -> dict[str, Tensor]:
    return {
        "ratio/mean": masked_mean(ratio.detach(), mask),
        "ratio/ratio_max": masked_max(ratio, mask),
        "kl/approx_old": _approx_kl_old(log_ratio.detach(), mask),
    }


def sapo_loss(inputs: LossInputs, *, tau_pos: float = 1.0, tau_neg: float = 1.05) -> LossResult:
    """SAPO soft-gated surrogate (Gao et al., arXiv 2511.20347; TRL ``loss_type="sapo"``, verl ``sapo``).

        r_t = π_θ(y_t)/π_old(y_t),   τ_t = τ⁺ if Â_t > 0 else τ⁻
        f(r) = σ(τ (r − 1)) · 4/τ
        ℓ_t = −f(r_t) · Â_t

    A smooth, temperature-controlled trust region in place of the hard clip: f'(r) = 4σ(1 − σ) is 1 at r = 1
    (the gradient there is REINFORCE's, −Â ∇log π) and decays as r leaves 1; τ⁻ > τ⁺ damps negative tokens
    faster.  Defaults τ⁺ = 1.0, τ⁻ = 1.05 are both frameworks'.  Both recommend (verl forces) the
    ``seq_mean_token_mean`` aggregation.  log r is clamped to ±20 before exp (verl; TRL does not clamp).
    Metrics: ``sapo/gate_mean`` (f·τ/4 = σ, 0.5 at r = 1), ``ratio/mean``, ``ratio/ratio_max``,
    ``kl/approx_old``.
    """
    if tau_pos <= 0 or tau_neg <= 0:
        raise ValueError(f"SAPO temperatures must be positive, got tau_pos={tau_pos}, tau_neg={tau_neg}.")
    c = _clean(inputs)
    log_ratio = token_log_ratio(inputs.logprobs, c.old_logprobs, c.mask)
    ratio = torch.exp(log_ratio)
    tau = torch.where(c.advantages > 0, torch.full_like(ratio, tau_pos), torch.full_like(ratio, tau_neg))
    sigma = torch.sigmoid(tau * (ratio - 1.0))
    loss = masked_fill_zero(-sigma * (4.0 / tau) * c.advantages, c.mask)
    metrics = {"sapo/gate_mean": masked_mean(sigma.detach(), c.mask), **_ratio_metrics(ratio, log_ratio, c.mask)}
    return LossResult(loss, metrics)


def gmpo_loss(inputs: LossInputs, *, clip_low: float = 0.4, clip_high: float = 0.4) -> LossResult:
    """GMPO, geometric-mean policy optimisation (Zhao et al., arXiv 2507.20673; verl ``geo_mean``).

        x_t = log π_θ(y_t) − log π_old(y_t)
        x̃_t = min(x_t, ε_h) if Â_t > 0,  max(x_t, −ε_l) if Â_t < 0,  0 if Â_t = 0   (clip in log space)
        L_i = −Ā_i · exp((1/|y_i|) Σ_t x̃_t),     Ā_i = (1/|y_i|) Σ_t Â_t
        ℓ_{i,t} = L_i on every valid token of y_i

    The sequence objective is the geometric mean of the token ratios, so one outlying token moves it far
    less than it moves the arithmetic mean.  As ``gspo_loss``, the sequence term sits on each token:
    ``seq_mean_token_mean`` gives mean_i L_i, verl's ``torch.mean(pg_losses)``, exactly (verl divides by
    every row, empty ones included).  ε = 0.4 in log space, i.e. r ∈ (e^{−0.4}, e^{0.4}), is the paper's
    and verl's GMPO recipe; verl's actor default (0.2) applies if you pass it.  Metrics:
    ``ratio/clip_frac_low|high`` (tokens whose log-ratio is clipped on the side that zeroes their
    gradient), ``gmpo/seq_ratio_mean``, ``kl/approx_old``.
    """
    c = _clean(inputs)
    x = token_log_ratio(inputs.logprobs, c.old_logprobs, c.mask, clamp=float("inf"))
    positive, negative = c.advantages > 0, c.advantages < 0
    detached = x.detach()
    clipped_high = c.mask & positive & (detached > clip_high)
    clipped_low = c.mask & negative & (detached < -clip_low)
    x_clipped = torch.where(clipped_high, torch.full_like(x, clip_high), x)
    x_clipped = torch.where(clipped_low, torch.full_like(x, -clip_low), x_clipped)
    x_clipped = torch.where(positive | negative, x_clipped, torch.zeros_like(x))
    lengths = masked_count(c.mask, dim=1).clamp(min=1.0).to(x.dtype)
    seq_ratio = torch.exp(masked_sum(x_clipped, c.mask, dim=1) / lengths)  # (B,)
    seq_adv = masked_sum(c.advantages, c.mask, dim=1) / lengths
    loss = masked_fill_zero((-seq_adv * seq_ratio).unsqueeze(1).expand_as(x), c.mask)
    seq_valid = c.mask.any(dim=1)
    metrics = {
        "ratio/clip_frac_low": _frac(clipped_low, c.mask),
        "ratio/clip_frac_high": _frac(clipped_high, c.mask),
        "gmpo/seq_ratio_mean": masked_mean(seq_ratio.detach(), seq_valid),
        "kl/approx_old": _approx_kl_old(detached, c.mask),
    }
    return LossResult(loss, metrics)


def luspo_loss(inputs: LossInputs, *, clip_low: float = 3e-4, clip_high: float = 4e-4) -> LossResult:
    """LUSPO, length-unbiased GSPO (arXiv 2602.05261; TRL ``loss_type="luspo"``).

        ℓ_{i,t} = −min(s_i Â_i, clip(s_i, 1 − ε_l, 1 + ε_h) Â_i),   s_i = exp((1/|y_i|) Σ_t log r_{i,t})
        J = (1/G) Σ_i |y_i| ℓ_i

    The per-token term is GSPO's (``losses.gspo_loss``); LUSPO changes only the weighting of sequences, by
    their length instead of 1/|y_i|.  So pair it with ``seq_mean_token_sum``: Σ_{i,t} ℓ_{i,t} / G is TRL's
    ``(per_token_loss * mask).sum(-1).mean()`` with ``importance_sampling_level="sequence"`` exactly.
    ``token_mean`` gives the same objective divided by N/G (a per-step constant); ``seq_mean_token_mean``
    gives back plain GSPO.  The clip defaults are GSPO's [INF: TRL's generic default ε = 0.2 is meant for
    token ratios; the LUSPO paper's values were not re-read].  Metrics as ``gspo_loss``.
    """
    return gspo_loss(inputs, clip_low=clip_low, clip_high=clip_high)


def dro_loss(inputs: LossInputs, *, beta: float = 0.1) -> LossResult:
    """DRO with a quadratic log-ratio penalty (Richemond et al., arXiv 2405.19107; verl ``dro``, Tinker ``dro``).

        ℓ_t = −(Â_t · log π_θ(y_t) − ½ β (log π_θ(y_t) − log π_old(y_t))²)

    A policy gradient term plus a smooth trust region: ∂ℓ/∂log π = −Â + β log r.  The penalty acts on every
    valid token, advantage 0 included (as verl and Tinker).  verl requires ``dro_beta`` and has no
    default; β = 0.1 here is a choice [INF].  Metrics: ``kl/approx_old``, ``dro/log_ratio_sq_mean``.
    """
    if beta <= 0:
        raise ValueError(f"DRO beta must be positive (it weighs the quadratic penalty), got {beta}.")
    c = _clean(inputs)
    log_ratio = token_log_ratio(inputs.logprobs, c.old_logprobs, c.mask, clamp=float("inf"))
    loss = masked_fill_zero(-(c.advantages * c.logprobs - 0.5 * beta * log_ratio.square()), c.mask)
    metrics = {
        "kl/approx_old": _approx_kl_old(log_ratio.detach(), c.mask),
        "dro/log_ratio_sq_mean": masked_mean(log_ratio.detach().square(), c.mask),
    }
    return LossResult(loss, metrics)


def kimi_dppo_loss(
    inputs: LossInputs,
    *,
    dppo_mask_low: float = 0.2,
    dppo_mask_high: float = 0.2,
    adv_tau: float = 1.0,
    kl_tau: float = 1e-3,
) -> LossResult:
    """prime-rl's default loss: DPPO binary-TV mask + Kimi-K2.5's squared train-infer log-ratio penalty
    (Kimi K2.5, arXiv 2602.02276; DPPO, arXiv 2602.04879; prime-rl ``default_loss_fn``).

        ρ_t = π_θ(y_t)/μ(y_t),   Δp_t = π_θ(y_t) − μ(y_t)        μ = rollout (inference) log-probs
        masked_t = Δp_t > δ_high if Â_t > 0, Δp_t < −δ_low otherwise
        ℓ_t = −𝟙[¬masked_t] · τ_A Â_t · ρ_t + τ_KL (log ρ_t)²

    ρ carries the gradient (no detach, no cap, as prime-rl): the policy term's gradient is −τ_A Â ρ ∇log π.
    The penalty's gradient is 2 τ_KL log ρ ∇log π on every valid token, masked or not.  μ falls back to
    ``old_logprobs`` without rollout log-probs.  Defaults are prime-rl's ``DefaultLossConfig``.  Metrics:
    ``dppo/masked_frac``, ``dppo/masked_frac_pos|neg``, ``mismatch/kl_k3`` (ρ − 1 − log ρ on kept tokens).
    """
    c = _clean(inputs)
    mu = _behaviour_logprobs(inputs, c.mask)
    log_rho = token_log_ratio(inputs.logprobs, mu, c.mask, clamp=float("inf"))
    rho = torch.exp(log_rho)
    prob_diff = torch.exp(c.logprobs.detach()) - torch.exp(mu)
    positive = c.advantages > 0
    masked = torch.where(positive, prob_diff > dppo_mask_high, prob_diff < -dppo_mask_low) & c.mask
    keep = c.mask & ~masked
    policy = torch.where(keep, -adv_tau * c.advantages * rho, torch.zeros_like(rho))
    loss = masked_fill_zero(policy + kl_tau * log_rho.square(), c.mask)
    metrics = {
        "dppo/masked_frac": _frac(masked, c.mask),
        "dppo/masked_frac_pos": _frac(masked & positive, c.mask),
        "dppo/masked_frac_neg": _frac(masked & (c.advantages < 0), c.mask),
        "mismatch/kl_k3": _approx_kl_old(log_rho.detach(), keep),
    }
    return LossResult(loss, metrics)


def dcpo_clip_bounds(
    old_logprobs: Tensor, clip_low: float, clip_high: float, upper_cap: float
) -> tuple[Tensor, Tensor]:
    """DCPO's dynamic-adaptive ratio bounds from q = π_old(y_t) (arXiv 2509.02333 §4.1): (lower, upper), (B, T).

        lower = ½ + ½ √max(1 − 4ε_low/q, 0),    upper = min(½ + ½ √(1 + 4ε_high/q), cap)

    They come from |(r − 1) r q| ≤ ε: a token the old policy found unlikely may move further.  The upper
    cap is the official code's max(clip_ratio_c, 10) (``get_clip_low_high``); q = 0 gives lower 1 and the cap.
    """
    q = torch.exp(old_logprobs)
    safe_q = torch.where(q > 0, q, torch.ones_like(q))
    low_radicand = torch.where(q > 0, 1.0 - 4.0 * clip_low / safe_q, torch.ones_like(q)).clamp(min=0.0)
    high_radicand = 1.0 + 4.0 * clip_high / safe_q
    lower = 0.5 + 0.5 * torch.sqrt(low_radicand)
    upper = torch.where(q > 0, 0.5 + 0.5 * torch.sqrt(high_radicand), torch.full_like(q, upper_cap))
    return lower, upper.clamp(max=upper_cap)


def dcpo_loss(
    inputs: LossInputs,
    *,
    clip_low: float = 0.16,
    clip_high: float = 0.2,
    dual_clip: float | None = 3.0,
    upper_cap: float = 10.0,
) -> LossResult:
    """DCPO's probability-dependent clip (Yang et al., arXiv 2509.02333; official lime-RL/DCPO
    ``compute_policy_loss_dcpo`` with ``clip_type="dynamic"``).

        ℓ_t = −min(r_t Â_t, clip(r_t, lower(q_t), upper(q_t)) Â_t), dual clip c for Â_t < 0
        q_t = π_old(y_t), bounds from ``dcpo_clip_bounds``

    ε_low = 0.16, ε_high = 0.2 are the README's; the dual clip c = 3 is verl's default, which the official
    code keeps on for ``dynamic``; the upper bound is capped at max(c, 10) = ``upper_cap``.  The ratio is
    not clamped before exp in the official code (here: ±20, an overflow guard).  DCPO's smooth advantage and
    its ``seq_mean_token_sum`` aggregation (addendum §3.2, "OTM") are separate choices.  Metrics: the PPO
    ones plus ``dcpo/lower_mean``, ``dcpo/upper_mean``.
    """
    if dual_clip is not None:
        upper_cap = max(upper_cap, dual_clip)
    c = _clean(inputs)
    log_ratio = token_log_ratio(inputs.logprobs, c.old_logprobs, c.mask)
    ratio = torch.exp(log_ratio)
    lower, upper = dcpo_clip_bounds(c.old_logprobs, clip_low, clip_high, upper_cap)
    sur = _clipped_surrogate(ratio, c.advantages, c.mask, lower, upper, dual_clip)
    metrics = _surrogate_metrics(sur, ratio, log_ratio, c.mask)
    metrics["dcpo/lower_mean"] = masked_mean(lower, c.mask)
    metrics["dcpo/upper_mean"] = masked_mean(upper, c.mask)
    return LossResult(sur.loss, metrics)
