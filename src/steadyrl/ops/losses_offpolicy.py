"""Per-token policy losses for off-policy and mismatched data: MiniRL, DPPO, CPGD, BAPO, VESPO, MinPRO.

Same contract as ``losses.py`` (read its module docstring): ``fn(inputs, *, hyper-parameters) ->
LossResult(loss (B, T), metrics)``, 0 at masked positions, gradient only through ``inputs.logprobs``,
every importance / trust-region weight detached, no reduction.

The behaviour policy μ is ``inputs.rollout_logprobs`` (what the sampler used).  When it is None every loss
here falls back to ``inputs.old_logprobs``, i.e. it assumes the trainer's recompute π_old is the sampler
(no train–inference mismatch); the fallback is the documented behaviour, not an error.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from steadyrl.ops.kl import k3
from steadyrl.ops.losses import (
    _behaviour_logprobs,
    _clean,
    _clipped_surrogate,
    _frac,
    _surrogate_metrics,
    _weighted_logprob_loss,
)
from steadyrl.ops.masking import masked_fill_zero, masked_max, masked_mean, masked_min, masked_sum
from steadyrl.ops.ratios import prefix_min_log_ratio, token_log_ratio
from steadyrl.types import LossInputs, LossResult, Metrics


def _is_metrics(prefix: str, is_ratio: Tensor, is_cap: float, mask: Tensor) -> Metrics:
    return {
        f"{prefix}/is_weight_mean": masked_mean(is_ratio.clamp(max=is_cap), mask),
        f"{prefix}/is_weight_max": masked_max(is_ratio.clamp(max=is_cap), mask),
        f"{prefix}/is_truncated_frac": _frac(is_ratio > is_cap, mask),
    }


def reinforce_is_loss(
    inputs: LossInputs, *, clip_low: float = 0.2, clip_high: float = 0.27, is_cap: float = 5.0
) -> LossResult:
    """MiniRL: truncated-IS REINFORCE with a staleness mask (Zheng et al., arXiv 2512.01374; methods.md §5).

        r_t = π_θ(y_t)/π_old(y_t)                                       (staleness)
        M_t = 0 if (Â_t > 0 and r_t > 1 + ε_high) or (Â_t < 0 and r_t < 1 − ε_low), else 1
        ℓ_t = −M_t · sg[min(π_θ(y_t)/μ(y_t), C)] · Â_t · log π_θ(y_t)

    μ is ``rollout_logprobs`` (falls back to ``old_logprobs``).  C = 5 per one note on the paper;
    sail-sg/Stable-RL uses 10.  No length normalisation is intended: aggregate with ``seq_mean_token_sum``
    or ``constant_norm``, not a per-sequence token mean.  Matches Stable-RL ``ppo_recompute`` mode.
    Metrics: ``minirl/masked_frac`` (staleness-masked valid tokens), ``minirl/is_weight_mean|_max`` (of the
    truncated weight), ``minirl/is_truncated_frac`` (π_θ/μ > C).
    """
    c = _clean(inputs)
    mu = _behaviour_logprobs(inputs, c.mask)
    logp = c.logprobs.detach()
    staleness = torch.exp(token_log_ratio(logp, c.old_logprobs, c.mask))
    masked_out = c.mask & (
        ((c.advantages > 0) & (staleness > 1.0 + clip_high))
        | ((c.advantages < 0) & (staleness < 1.0 - clip_low))
    )
    is_ratio = torch.exp(token_log_ratio(logp, mu, c.mask))
    weight = torch.where(masked_out, torch.zeros_like(is_ratio), is_ratio.clamp(max=is_cap))
    metrics = {
        "minirl/masked_frac": _frac(masked_out, c.mask),
        **_is_metrics("minirl", is_ratio, is_cap, c.mask),
    }
    return LossResult(_weighted_logprob_loss(weight, c.advantages, c.logprobs, c.mask), metrics)


def _dppo_loss(
    inputs: LossInputs, divergence: str, delta_low: float, delta_high: float, is_cap: float, anchor: str
) -> LossResult:
    if anchor not in ("rollout", "old"):
        raise ValueError(
            f"DPPO anchor must be 'rollout' (μ) or 'old' (π_old, the _recompute variant), got {anchor!r}."
        )
    c = _clean(inputs)
    mu = _behaviour_logprobs(inputs, c.mask)
    anchor_logp = mu if anchor == "rollout" else c.old_logprobs
    logp = c.logprobs.detach()
    prob, anchor_prob = torch.exp(logp), torch.exp(anchor_logp)
    if divergence == "tv":
        div = (prob - anchor_prob).abs()
    else:  # binary KL between Bernoulli(anchor_prob) and Bernoulli(prob); 1e-8 guards 1 − p = 0
        div = anchor_prob * (anchor_logp - logp) + (1.0 - anchor_prob) * torch.log(
            (1.0 - anchor_prob + 1e-8) / (1.0 - prob + 1e-8)
        )
    # A token is kept only when its divergence is within the bound (verl's form), so an impossible input
    # (a log-prob above 0 makes the binary KL NaN) is rejected rather than kept.
    too_far_up = ~(div <= delta_high) & (prob > anchor_prob)
    too_far_down = ~(div <= delta_low) & (prob < anchor_prob)
    blocked_pos = c.mask & (c.advantages > 0) & too_far_up
    blocked_neg = c.mask & (c.advantages < 0) & too_far_down
    is_ratio = torch.exp(token_log_ratio(logp, mu, c.mask))
    weight = torch.where(blocked_pos | blocked_neg, torch.zeros_like(is_ratio), is_ratio.clamp(max=is_cap))
    metrics = {
        "dppo/masked_frac": _frac(blocked_pos | blocked_neg, c.mask),
        "dppo/masked_frac_pos": _frac(blocked_pos, c.mask),
        "dppo/masked_frac_neg": _frac(blocked_neg, c.mask),
        "dppo/divergence_mean": masked_mean(div, c.mask),
        **_is_metrics("dppo", is_ratio, is_cap, c.mask),
    }
    return LossResult(_weighted_logprob_loss(weight, c.advantages, c.logprobs, c.mask), metrics)


def dppo_binary_tv_loss(
    inputs: LossInputs,
    *,
    delta_low: float = 0.15,
    delta_high: float = 0.15,
    is_cap: float = 10.0,
    anchor: Literal["rollout", "old"] = "rollout",
) -> LossResult:
    """DPPO with a binary-TV trust region (Qi et al., arXiv 2602.04879; methods.md §6.6).

        a = the sampled token y_t;  p = π_θ(a),  q = anchor(a)  (μ for anchor="rollout", π_old for "old")
        D = |p − q|
        M_t = 0 if (Â_t > 0 and D > δ_high and p > q) or (Â_t < 0 and D > δ_low and p < q), else 1
        ℓ_t = −Â_t · sg[min(π_θ(a)/μ(a), C)] · M_t · log π_θ(a)

    Only moves in the advantage's direction beyond the trust region are masked.  As in sail-sg/Stable-RL
    (``_compute_token_mask_for_policy_loss`` / ``compute_policy_loss_with_mask``) the IS weight is always
    taken against μ (``rollout_logprobs``, falling back to ``old_logprobs``); ``anchor`` moves only the
    trust region ("old" = the ``_recompute`` variants).  δ = 0.15 (TRL's DPPO config), C = 10 (Stable-RL).
    Metrics: ``dppo/masked_frac`` (and ``_pos`` / ``_neg`` by advantage sign), ``dppo/divergence_mean``,
    ``dppo/is_weight_mean|_max``, ``dppo/is_truncated_frac``.
    """
    return _dppo_loss(inputs, "tv", delta_low, delta_high, is_cap, anchor)


def dppo_binary_kl_loss(
    inputs: LossInputs,
    *,
    delta_low: float = 0.05,
    delta_high: float = 0.05,
    is_cap: float = 10.0,
    anchor: Literal["rollout", "old"] = "rollout",
) -> LossResult:
    """DPPO with a binary-KL trust region (Qi et al., arXiv 2602.04879; methods.md §6.6).

        D = q log(q/p) + (1 − q) log((1 − q + 1e-8)/(1 − p + 1e-8))      (Bernoulli KL, anchor q vs π_θ p)

    Mask, loss, IS weight, ``anchor`` and metrics exactly as ``dppo_binary_tv_loss``; δ = 0.05 (TRL), C = 10.
    """
    return _dppo_loss(inputs, "kl", delta_low, delta_high, is_cap, anchor)


_DRIFT_ESTIMATORS = {
    "k1": lambda log_r: -log_r,
    "k2": lambda log_r: 0.5 * log_r**2,
    "k3": k3,
}


def cpgd_loss(
    inputs: LossInputs,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    drift_coef: float = 0.1,
    kl_estimator: Literal["k1", "k2", "k3"] = "k3",
) -> LossResult:
    """CPGD: clipped log-ratio policy gradient plus a policy-drift penalty (Liu et al., arXiv 2505.12504; §6.9).

        log r_t = log π_θ(y_t) − log π_old(y_t)
        ℓ_t = −min(log r_t · Â_t, clip(log r_t, log(1 − ε_low), log(1 + ε_high)) · Â_t) + α · KL̂_t(π_old ‖ π_θ)
        KL̂: k1 = −log r,  k2 = ½ (log r)²,  k3 = r − 1 − log r      (tokens sampled from π_old)

    INFERRED [methods.md marks the exact form unverified]: the objective above is the abstract-level
    reading; the per-token KL estimator (default k3) and α (default 0.1) are our choices, exposed as
    ``kl_estimator`` and ``drift_coef``; ε defaults to 0.2.  The drift term carries gradient (it is a
    penalty on π_θ); the clipped term has gradient −Â ∇log π_θ where unclipped (no ratio factor).
    Metrics: the PPO ratio metrics (clip fractions in log space, same sides) and ``cpgd/drift_mean``.
    """
    if kl_estimator not in _DRIFT_ESTIMATORS:
        raise ValueError(
            f"cpgd kl_estimator must be one of {sorted(_DRIFT_ESTIMATORS)}, got {kl_estimator!r}."
        )
    c = _clean(inputs)
    log_ratio = token_log_ratio(inputs.logprobs, c.old_logprobs, c.mask)
    # The clipped surrogate is the PPO one applied to log r with bounds in log space.
    sur = _clipped_surrogate(
        log_ratio, c.advantages, c.mask, math.log(1.0 - clip_low), math.log1p(clip_high), None
    )
    drift = masked_fill_zero(_DRIFT_ESTIMATORS[kl_estimator](log_ratio), c.mask)
    metrics = _surrogate_metrics(sur, torch.exp(log_ratio), log_ratio, c.mask)
    metrics["cpgd/drift_mean"] = masked_mean(drift.detach(), c.mask)
    return LossResult(masked_fill_zero(sur.loss + drift_coef * drift, c.mask), metrics)


def _bound_path(start: float, stop: float, step: float) -> list[float]:
    values = [start]
    while step > 0 and values[-1] < stop:
        values.append(min(values[-1] + step, stop))
    return values


def bapo_loss(
    inputs: LossInputs,
    *,
    low_start: float = 0.6,
    low_max: float = 0.8,
    low_step: float = 0.05,
    high_start: float = 1.2,
    high_max: float = 2.0,
    high_step: float = 0.05,
    target: float = 1.0,
    dual_clip: float = 3.0,
    eps: float = 1e-8,
) -> LossResult:
    """BAPO: PPO clip with adaptive asymmetric ratio bounds (Xi et al., arXiv 2510.18927; methods.md §6.8).

    Bound search, per call, as WooooDyy/BAPO ``compute_policy_loss_bapo`` (bounds are true ratio bounds):
        ρ_eff,t = min(r_t, c_high) if Â_t ≥ 0 else max(r_t, c_low)
        pos = Σ_t max(ρ_eff,t Â_t, 0),  neg = Σ_t max(−ρ_eff,t Â_t, 0)      (summed over all ranks)
        accept (c_low, c_high) when neg ≤ 0 or pos / (neg + eps) ≥ target
    Candidates in order: c_low = low_start, +low_step, … up to low_max with c_high = high_start; then
    c_high = high_start + high_step, … up to high_max with c_low = low_max.  The first accepted pair wins,
    the last pair if none is.  All candidate sums go through one ``inputs.reduce_sum`` call, so every rank
    picks the same bounds; the choice is per call (per micro-batch), as in the official code.  Then

        ℓ_t = −min(r_t Â_t, clip(r_t, c_low, c_high) Â_t), and for Â_t < 0 at most −c Â_t (dual clip c = 3)

    target = 1.0 is the recipe YAML (0.5 in its example script).  Metrics: ``bapo/c_low``, ``bapo/c_high``,
    ``bapo/pos_share`` (pos / (pos + neg) at the chosen bounds) and the PPO ratio metrics.
    """
    c = _clean(inputs)
    log_ratio = token_log_ratio(inputs.logprobs, c.old_logprobs, c.mask)
    ratio = torch.exp(log_ratio)
    lows, highs = _bound_path(low_start, low_max, low_step), _bound_path(high_start, high_max, high_step)
    path = [(low, high_start) for low in lows] + [(lows[-1], high) for high in highs[1:]]
    detached = ratio.detach()
    sums = []
    for low, high in path:
        effective = torch.where(c.advantages >= 0, detached.clamp(max=high), detached.clamp(min=low))
        contribution = masked_fill_zero(effective * c.advantages, c.mask)
        sums.append(torch.stack([contribution.clamp(min=0).sum(), (-contribution).clamp(min=0).sum()]))
    pos, neg = inputs.reduce_sum(torch.stack(sums, dim=1))  # (2, K): one collective for the whole search
    accepted = (neg <= 0) | (pos / (neg + eps) >= target)
    accepted = torch.cat([accepted, accepted.new_ones(1)])  # "none accepted" selects the last pair
    choice = accepted.float().argmax().clamp(max=len(path) - 1)
    bounds = torch.tensor(path, dtype=ratio.dtype, device=ratio.device)[choice]
    sur = _clipped_surrogate(ratio, c.advantages, c.mask, bounds[0], bounds[1], dual_clip)
    metrics = _surrogate_metrics(sur, ratio, log_ratio, c.mask)
    total = pos[choice] + neg[choice]
    metrics["bapo/c_low"], metrics["bapo/c_high"] = bounds[0], bounds[1]
    metrics["bapo/pos_share"] = torch.where(
        total > 0, pos[choice] / total.clamp(min=eps), torch.zeros_like(total)
    )
    return LossResult(sur.loss, metrics)


def vespo_loss(
    inputs: LossInputs,
    *,
    c1_pos: float = 2.0,
    c2_pos: float = 3.0,
    c1_neg: float = 3.0,
    c2_neg: float = 2.0,
    log_w_clamp: float = 20.0,
) -> LossResult:
    """VESPO: soft sequence-weight kernel on REINFORCE (Shen et al., arXiv 2602.10693; methods.md §6.10).

        log W_i = Σ_t (log π_θ(y_{i,t}) − log μ(y_{i,t}))        (true sequence ratio, no 1/|y|)
        φ(W) = W^{c1} exp(c2 (1 − W)),  φ(1) = 1;   (c1, c2) = (2, 3) if Â ≥ 0, (3, 2) if Â < 0
        ℓ_{i,t} = −sg[φ(W_i)] · Â_{i,t} · log π_θ(y_{i,t})

    Summing ℓ over t gives −φ(W_i) Â_i log π_θ(y_i): no length normalisation is intended (aggregate with
    ``seq_mean_token_sum`` / ``constant_norm``).  Computed in log space, log φ = c1 log W + c2 (1 − e^{log W}),
    with each token log-ratio and log W clamped to ±``log_w_clamp`` so e^{log W} cannot overflow.  μ is
    ``rollout_logprobs`` (fallback ``old_logprobs``); the official code's optional token TIS is a separate
    correction here.  The sign picking (c1, c2) is Â_{i,t}'s (equal to Â_i for broadcast advantages).
    Metrics: ``vespo/phi_mean|_max`` (valid tokens), ``vespo/log_w_mean|_max|_min`` (valid sequences).
    """
    c = _clean(inputs)
    mu = _behaviour_logprobs(inputs, c.mask)
    token_lr = token_log_ratio(c.logprobs.detach(), mu, c.mask, clamp=log_w_clamp)
    log_w = masked_sum(token_lr, c.mask, dim=1).clamp(-log_w_clamp, log_w_clamp).unsqueeze(1)  # (B, 1)
    positive = c.advantages >= 0
    c1 = torch.where(positive, c1_pos, c1_neg).to(log_w.dtype)
    c2 = torch.where(positive, c2_pos, c2_neg).to(log_w.dtype)
    phi = masked_fill_zero(torch.exp(c1 * log_w - c2 * torch.expm1(log_w)), c.mask)
    valid_seq = c.mask.any(dim=1)
    seq_log_w = log_w.squeeze(1)
    metrics = {
        "vespo/phi_mean": masked_mean(phi, c.mask),
        "vespo/phi_max": masked_max(phi, c.mask),
        "vespo/log_w_mean": masked_mean(seq_log_w, valid_seq),
        "vespo/log_w_max": masked_max(seq_log_w, valid_seq),
        "vespo/log_w_min": masked_min(seq_log_w, valid_seq),
    }
    return LossResult(_weighted_logprob_loss(phi, c.advantages, c.logprobs, c.mask), metrics)


def minpro_loss(inputs: LossInputs, *, is_cap: float = 10.0, include_current: bool = False) -> LossResult:
    """MinPRO, inferred reading (Lei et al., arXiv 2601.22718; methods.md §6.7).

        ρ_t = π_θ(y_t)/μ(y_t)
        w_t = min(ρ_t, C) · min(min_{i<t} ρ_i, 1)          (the min runs over valid earlier tokens; 1 at t = 1)
        ℓ_t = −sg[w_t] · Â_t · log π_θ(y_t)

    INFERRED: the paper replaces the cumulative prefix ratio Π_{i≤t} ρ_i by a non-cumulative surrogate built
    from the smallest ratio in the prefix; the exact formula was not recovered.  This is methods.md's best
    reading; ``include_current=True`` also lets ρ_t into the prefix min; C = 10 is our choice (not from the
    paper).  μ is ``rollout_logprobs`` (fallback ``old_logprobs``).
    Metrics: ``minpro/weight_mean|_max``, ``minpro/prefix_weight_mean``, ``minpro/is_truncated_frac``.
    """
    c = _clean(inputs)
    mu = _behaviour_logprobs(inputs, c.mask)
    log_rho = token_log_ratio(c.logprobs.detach(), mu, c.mask)
    prefix = torch.exp(prefix_min_log_ratio(log_rho, c.mask, include_current=include_current))
    rho = torch.exp(log_rho)
    weight = masked_fill_zero(rho.clamp(max=is_cap) * prefix, c.mask)
    metrics = {
        "minpro/weight_mean": masked_mean(weight, c.mask),
        "minpro/weight_max": masked_max(weight, c.mask),
        "minpro/prefix_weight_mean": masked_mean(prefix, c.mask),
        "minpro/is_truncated_frac": _frac(rho > is_cap, c.mask),
    }
    return LossResult(_weighted_logprob_loss(weight, c.advantages, c.logprobs, c.mask), metrics)
