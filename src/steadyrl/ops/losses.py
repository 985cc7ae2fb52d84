"""Per-token policy losses: the unreduced (B, T) term to minimise, on-policy and PPO-family surrogates.

Every loss has the same signature, so the registry binds hyper-parameters once and the trainer never
branches on a name::

    fn(inputs: LossInputs, *, <keyword hyper-parameters>) -> LossResult(loss (B, T), metrics)

Contract shared by every function here and in ``losses_offpolicy.py``:

* ``loss`` is exactly 0 at masked positions (``response_mask`` False), which may hold any garbage, NaN
  included; every input is selected with ``torch.where`` before any arithmetic touches it.
* The gradient flows only through ``inputs.logprobs``; importance and trust-region weights are detached.
* Nothing is reduced here: aggregation (token mean, sequence mean, constant normaliser) belongs to
  ``aggregation.py`` and uses global counts.
* Metrics are 0-d tensors: masked means over valid tokens unless the name ends in ``_max`` / ``_min``.

Naming of the clip statistics: ``ratio/clip_frac_low`` (``_high``) is the fraction of valid tokens whose
gradient is zero because the lower (upper) clip is active, i.e. Â < 0 and r < lower (Â > 0 and r > upper);
``ratio/dual_clip_frac`` the same for the dual clip (Â < 0 and r > c). Losses that clip a detached weight
instead of the surrogate (CISPO) say in their docstring what their fractions count.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor

from steadyrl.ops.kl import k3
from steadyrl.ops.masking import (
    masked_count,
    masked_fill_zero,
    masked_max,
    masked_mean,
    masked_min,
    masked_sum,
)
from steadyrl.ops.ratios import gspo_token_log_ratio, sequence_log_ratio, token_log_ratio
from steadyrl.types import LossInputs, LossResult, Metrics

# ---------------------------------------------------------------------------------------------------------
# Shared pieces (also used by losses_offpolicy.py)
# ---------------------------------------------------------------------------------------------------------


class _Clean(NamedTuple):
    mask: Tensor  # (B, T) bool
    logprobs: Tensor  # (B, T) log π_θ, with gradient, 0 at masked positions
    old_logprobs: Tensor  # (B, T) log π_old, detached, 0 at masked positions
    advantages: Tensor  # (B, T) Â, detached, 0 at masked positions


def _clean(inputs: LossInputs) -> _Clean:
    mask = inputs.response_mask.bool()
    return _Clean(
        mask=mask,
        logprobs=masked_fill_zero(inputs.logprobs, mask),
        old_logprobs=masked_fill_zero(inputs.old_logprobs.detach(), mask),
        advantages=masked_fill_zero(inputs.advantages.detach(), mask),
    )


def _behaviour_logprobs(inputs: LossInputs, mask: Tensor) -> Tensor:
    """log μ: ``rollout_logprobs`` when given, else ``old_logprobs`` (π_old stands in for the sampler)."""
    mu = inputs.rollout_logprobs if inputs.rollout_logprobs is not None else inputs.old_logprobs
    return masked_fill_zero(mu.detach(), mask)


def _weighted_logprob_loss(weight: Tensor, advantages: Tensor, logprobs: Tensor, mask: Tensor) -> Tensor:
    """ℓ = −sg[w] · Â · log π_θ, 0 at masked positions: gradient −w·Â exactly."""
    return masked_fill_zero(-weight.detach() * advantages * logprobs, mask)


def _frac(flags: Tensor, mask: Tensor) -> Tensor:
    return masked_mean(flags.float(), mask)


def _approx_kl_old(log_ratio: Tensor, mask: Tensor) -> Tensor:
    """k3 estimate of KL(π_old ‖ π_θ) on tokens sampled from π_old, 0-d, log r = log π_θ − log π_old."""
    return masked_mean(masked_fill_zero(k3(log_ratio.detach()), mask), mask)


class _Surrogate(NamedTuple):
    loss: Tensor  # (B, T) −surrogate, 0 at masked positions
    clipped_low: Tensor  # (B, T) bool: Â < 0 and r < lower (gradient zeroed by the lower clip)
    clipped_high: Tensor  # (B, T) bool: Â > 0 and r > upper
    dual_clipped: Tensor  # (B, T) bool: Â < 0 and r > c


def _clipped_surrogate(
    ratio: Tensor,  # (B, T) r, carries the gradient
    advantages: Tensor,  # (B, T) detached, clean
    mask: Tensor,  # (B, T) bool
    lower: float | Tensor,  # true ratio bound (1 − ε_low)
    upper: float | Tensor,  # true ratio bound (1 + ε_high)
    dual_clip: float | None,
) -> _Surrogate:
    """−min(r·Â, clip(r, lower, upper)·Â), and for Â < 0 with a dual clip c: min(that, −c·Â).

    Written with explicit masks rather than max/min so that the gradient is exactly −Â·r where no clip is
    active and exactly 0 where one is (torch's max splits the gradient on ties).  The value equals verl's
    ``compute_policy_loss_vanilla``: for Â > 0 the surrogate is Â·min(r, upper), for Â < 0 it is
    Â·max(r, lower), capped at c·Â by the dual clip.
    """
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (it bounds the ratio for Â < 0), got {dual_clip}.")
    as_t = lambda v: torch.as_tensor(v, dtype=ratio.dtype, device=ratio.device)  # noqa: E731
    lower_t, upper_t = as_t(lower), as_t(upper)
    positive, negative = advantages > 0, advantages < 0
    detached = ratio.detach()
    clipped_high = mask & positive & (detached > upper_t)
    clipped_low = mask & negative & (detached < lower_t)
    if dual_clip is None:
        dual_clipped = torch.zeros_like(mask)
        effective = ratio
    else:
        dual_clipped = mask & negative & (detached > dual_clip)
        effective = torch.where(dual_clipped, as_t(dual_clip), ratio)
    effective = torch.where(clipped_high, upper_t, torch.where(clipped_low, lower_t, effective))
    return _Surrogate(
        masked_fill_zero(-effective * advantages, mask), clipped_low, clipped_high, dual_clipped
    )


def _surrogate_metrics(sur: _Surrogate, ratio: Tensor, log_ratio: Tensor, mask: Tensor) -> Metrics:
    return {
        "ratio/clip_frac_low": _frac(sur.clipped_low, mask),
        "ratio/clip_frac_high": _frac(sur.clipped_high, mask),
        "ratio/dual_clip_frac": _frac(sur.dual_clipped, mask),
        "ratio/mean": masked_mean(ratio.detach(), mask),
        "ratio/ratio_max": masked_max(ratio, mask),
        "kl/approx_old": _approx_kl_old(log_ratio, mask),
    }


# ---------------------------------------------------------------------------------------------------------
# On-policy and PPO-family losses
# ---------------------------------------------------------------------------------------------------------


def reinforce_loss(inputs: LossInputs) -> LossResult:
    """On-policy REINFORCE: ℓ_t = −Â_t · log π_θ(y_t).

    No ratio and no clip: the gradient is −Â_t ∇log π_θ(y_t), which is the policy gradient only when the
    samples come from π_θ itself (one update per rollout batch, no train–inference mismatch).
    The §6.1 GRPO family with r ≡ 1.  Metrics: none.
    """
    c = _clean(inputs)
    return LossResult(masked_fill_zero(-c.advantages * c.logprobs, c.mask), {})


def ppo_clip_loss(
    inputs: LossInputs, *, clip_low: float = 0.2, clip_high: float = 0.2, dual_clip: float | None = None
) -> LossResult:
    """PPO / GRPO clipped surrogate with base π_old (GRPO arXiv 2402.03300 §6.1, DAPO arXiv 2503.14476 §6.3).

        r_t = π_θ(y_t) / π_old(y_t)
        ℓ_t = −min(r_t Â_t, clip(r_t, 1 − ε_low, 1 + ε_high) Â_t)
        dual clip c (Ye et al. arXiv 1912.09729, as verl): for Â_t < 0, ℓ_t = min(ℓ_t, −c Â_t)

    ``clip_high = 0.28`` is DAPO's clip-higher.  The GRPO KL term to π_ref is not part of this loss (kl.py).
    Metrics: ``ratio/clip_frac_low|high``, ``ratio/dual_clip_frac``, ``ratio/mean``, ``ratio/ratio_max``,
    ``kl/approx_old`` (k3 estimate of KL(π_old ‖ π_θ), detached).
    """
    c = _clean(inputs)
    log_ratio = token_log_ratio(inputs.logprobs, c.old_logprobs, c.mask)
    ratio = torch.exp(log_ratio)
    sur = _clipped_surrogate(ratio, c.advantages, c.mask, 1.0 - clip_low, 1.0 + clip_high, dual_clip)
    return LossResult(sur.loss, _surrogate_metrics(sur, ratio, log_ratio, c.mask))


def gspo_loss(inputs: LossInputs, *, clip_low: float = 3e-4, clip_high: float = 4e-4) -> LossResult:
    """GSPO, sequence level (Zheng et al., arXiv 2507.18071; methods.md §6.4).

        s_i = (π_θ(y_i)/π_old(y_i))^{1/|y_i|} = exp((1/|y_i|) Σ_t log r_{i,t})
        ℓ_{i,t} = −min(s_i Â_i, clip(s_i, 1 − ε_l, 1 + ε_h) Â_i)      on every valid token t of y_i

    Â_i is the mean of ``inputs.advantages`` over the tokens of y_i (the broadcast sequence advantage; use
    ``gspo_token_loss`` for advantages that vary along a sequence).  The gradient of each token's term
    flows through s_i, i.e. to every token of the sequence.

    How this relates to the paper's objective J = (1/G) Σ_i min(s_i Â_i, clip(s_i) Â_i):
    * ``seq_mean_token_mean`` gives (1/G) Σ_i (1/|y_i|) Σ_t ℓ_{i,t} = −J exactly (the term is constant in t);
    * ``token_mean`` gives Σ_i |y_i| ℓ_i / Σ_i |y_i|, a length-weighted version of the sequence objective;
    * ``seq_mean_token_sum`` / ``constant_norm`` weight sequence i by |y_i| as well.
    Metrics as ``ppo_clip_loss``, with ``ratio/*`` describing s_i on each token (clip fractions count the
    tokens of clipped sequences); ``kl/approx_old`` stays the token-level k3.
    """
    c = _clean(inputs)
    log_s = sequence_log_ratio(inputs.logprobs, c.old_logprobs, c.mask)  # (B,)
    seq_ratio = torch.exp(log_s).unsqueeze(1).expand_as(c.logprobs)
    lengths = masked_count(c.mask, dim=1).clamp(min=1.0)
    seq_adv = (masked_sum(c.advantages, c.mask, dim=1) / lengths).unsqueeze(1).expand_as(c.logprobs)
    sur = _clipped_surrogate(seq_ratio, seq_adv, c.mask, 1.0 - clip_low, 1.0 + clip_high, None)
    log_ratio = token_log_ratio(inputs.logprobs, c.old_logprobs, c.mask)
    return LossResult(sur.loss, _surrogate_metrics(sur, seq_ratio, log_ratio, c.mask))


def gspo_token_loss(inputs: LossInputs, *, clip_low: float = 3e-4, clip_high: float = 4e-4) -> LossResult:
    """GSPO-token (arXiv 2507.18071; methods.md §6.4): per-token advantages with the sequence ratio's value.

        s_{i,t} = sg[s_i] · π_θ(y_{i,t}) / sg[π_θ(y_{i,t})]
        ℓ_{i,t} = −min(s_{i,t} Â_{i,t}, clip(s_{i,t}, 1 − ε_l, 1 + ε_h) Â_{i,t})

    Same value as ``gspo_loss`` when Â is constant along each sequence; the gradient of token t flows only
    through its own log-prob (−s_i Â_{i,t} ∇log π_θ(y_{i,t}) where unclipped).
    """
    c = _clean(inputs)
    ratio = torch.exp(gspo_token_log_ratio(inputs.logprobs, c.old_logprobs, c.mask))
    sur = _clipped_surrogate(ratio, c.advantages, c.mask, 1.0 - clip_low, 1.0 + clip_high, None)
    log_ratio = token_log_ratio(inputs.logprobs, c.old_logprobs, c.mask)
    return LossResult(sur.loss, _surrogate_metrics(sur, ratio, log_ratio, c.mask))


def cispo_loss(inputs: LossInputs, *, clip_high: float = 4.0, clip_low: float | None = None) -> LossResult:
    """CISPO (MiniMax-M1, arXiv 2506.13585): clip the detached IS weight, keep every token.

        ℓ_t = −sg[clip(r_t, 1 − ε_low, 1 + ε_high)] · Â_t · log π_θ(y_t),     r_t = π_θ(y_t)/π_old(y_t)

    ``clip_high`` is ε_high, so the weight is capped at 1 + ε_high, as in the paper and verl
    (``clip_ratio_high``). TRL 1.16 caps at its ``epsilon_high`` itself (ScaleRL's ε_max, arXiv 2510.13786,
    recommended 5.0): TRL ``epsilon_high=c`` is ``clip_high=c − 1`` here, and the default 4.0 is that cap of 5.
    ``clip_low=None`` clips only from above (TRL, ScaleRL); a number gives verl's two-sided clip.  Every token
    keeps a gradient, so ``ratio/clip_frac_low|high`` here count tokens whose weight was clipped on that side
    (the gradient is scaled, not zeroed).
    """
    c = _clean(inputs)
    log_ratio = token_log_ratio(inputs.logprobs.detach(), c.old_logprobs, c.mask)
    ratio = torch.exp(log_ratio)
    weight = ratio.clamp(max=1.0 + clip_high)
    clipped_low = torch.zeros_like(c.mask)
    if clip_low is not None:
        weight = weight.clamp(min=1.0 - clip_low)
        clipped_low = ratio < 1.0 - clip_low
    metrics = {
        "ratio/clip_frac_low": _frac(clipped_low, c.mask),
        "ratio/clip_frac_high": _frac(ratio > 1.0 + clip_high, c.mask),
        "ratio/mean": masked_mean(ratio, c.mask),
        "ratio/ratio_max": masked_max(ratio, c.mask),
        "kl/approx_old": _approx_kl_old(log_ratio, c.mask),
    }
    return LossResult(_weighted_logprob_loss(weight, c.advantages, c.logprobs, c.mask), metrics)


# ---------------------------------------------------------------------------------------------------------
# Entropy-aware losses: STEER, Clip-Cov, KL-Cov
# ---------------------------------------------------------------------------------------------------------


def _steer_weights(
    c: _Clean,
    entropy: Tensor,
    weight_min: float,
    weight_max: float,
    mapping: str,
    omega_abs_min: Tensor | float | None,
    omega_abs_max: Tensor | float | None,
) -> tuple[Tensor, Tensor]:
    """λ_t from |Ω_t| (detached), and |Ω| (0 at masked positions)."""
    prob = torch.exp(c.logprobs.detach()).clamp(1e-8, 1.0 - 1e-8)
    old_prob = torch.exp(c.old_logprobs).clamp(1e-8, 1.0)
    omega = c.advantages / old_prob * prob * (1.0 - prob) * (torch.log(prob) + entropy)
    omega_abs = torch.where(c.mask & torch.isfinite(omega), omega.abs(), torch.zeros_like(omega))
    lo = masked_min(omega_abs, c.mask) if omega_abs_min is None else omega_abs_min
    hi = masked_max(omega_abs, c.mask) if omega_abs_max is None else omega_abs_max
    lo, hi = (torch.as_tensor(v, dtype=omega_abs.dtype, device=omega_abs.device) for v in (lo, hi))
    if mapping == "linear":
        span = hi - lo
        safe_span = torch.where(span > 0, span, torch.ones_like(span))
        scaled = weight_max - (omega_abs - lo) * (weight_max - weight_min) / safe_span
        weight = torch.where(span > 0, scaled, torch.full_like(scaled, (weight_min + weight_max) / 2))
        weight = weight.clamp(weight_min, weight_max)
    elif mapping == "exp":
        k = -torch.log(torch.as_tensor(weight_min, dtype=hi.dtype, device=hi.device)) / torch.clamp(
            hi, min=0.02
        )
        weight = torch.exp(-k * omega_abs).clamp(weight_min, 1.0)
    else:
        raise ValueError(f"steer mapping must be 'linear' or 'exp', got {mapping!r}.")
    return masked_fill_zero(weight, c.mask), omega_abs


def steer_loss(
    inputs: LossInputs,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float = 3.0,
    weight_min: float = 0.8,
    weight_max: float = 1.2,
    mapping: Literal["linear", "exp"] = "linear",
    omega_abs_min: Tensor | float | None = None,
    omega_abs_max: Tensor | float | None = None,
) -> LossResult:
    """STEER token reweighting of dual-clip PPO (Hao et al., arXiv 2510.10150; methods.md §6.15).

        Ω_t = (Â_t / π_old(y_t)) · π_θ(y_t) (1 − π_θ(y_t)) · (log π_θ(y_t) + H_t)     (estimated entropy change)
        linear: λ_t = λ_max − (|Ω_t| − min|Ω|)(λ_max − λ_min)/(max|Ω| − min|Ω|)   (midpoint if max = min)
        exp:    λ_t = clip(exp(−k|Ω_t|), λ_min, 1),  k = −log λ_min / max(max|Ω|, 0.02)
        ℓ_t = sg[λ_t] · ℓ^{PPO, dual clip}_t

    As the official ``compute_token_weights``: probabilities are clamped to [1e-8, 1 − 1e-8] (π_old to
    [1e-8, 1]), a non-finite Ω counts as 0, and the exponential map is capped at 1 rather than λ_max.
    H_t is ``inputs.entropy`` (required).  min/max |Ω| are taken over this call's valid tokens (per
    micro-batch, as the official code does; a max cannot be formed from ``reduce_sum``): pass
    ``omega_abs_min`` / ``omega_abs_max`` (e.g. all-reduced with MIN/MAX by the caller) for batch-level
    bounds.  Metrics: the PPO ones plus ``steer/weight_mean|_min|_max`` and ``steer/omega_abs_max``.
    """
    if inputs.entropy is None:
        raise ValueError(
            "steer_loss needs inputs.entropy (the per-token full-vocabulary entropy of π_θ); "
            "compute it in the policy forward pass and put it in LossInputs."
        )
    c = _clean(inputs)
    entropy = masked_fill_zero(inputs.entropy.detach(), c.mask)
    weight, omega_abs = _steer_weights(
        c, entropy, weight_min, weight_max, mapping, omega_abs_min, omega_abs_max
    )
    log_ratio = token_log_ratio(inputs.logprobs, c.old_logprobs, c.mask)
    ratio = torch.exp(log_ratio)
    sur = _clipped_surrogate(ratio, c.advantages, c.mask, 1.0 - clip_low, 1.0 + clip_high, dual_clip)
    metrics = _surrogate_metrics(sur, ratio, log_ratio, c.mask)
    metrics["steer/weight_mean"] = masked_mean(weight, c.mask)
    metrics["steer/weight_min"] = masked_min(weight, c.mask)
    metrics["steer/weight_max"] = masked_max(weight, c.mask)
    metrics["steer/omega_abs_max"] = masked_max(omega_abs, c.mask)
    return LossResult(masked_fill_zero(weight * sur.loss, c.mask), metrics)


def _token_covariance(c: _Clean, inputs: LossInputs) -> Tensor:
    """cov_t = (Â_t − mean Â)(log π_θ,t − mean log π_θ), means over valid tokens of all ranks; detached."""
    logp = c.logprobs.detach()
    stats = inputs.reduce_sum(
        torch.stack(
            [masked_sum(c.advantages, c.mask), masked_sum(logp, c.mask), masked_count(c.mask).to(logp.dtype)]
        )
    )
    n = stats[2].clamp(min=1.0)
    return masked_fill_zero((c.advantages - stats[0] / n) * (logp - stats[1] / n), c.mask)


def _rank_among(keys: Tensor, candidates: Tensor) -> Tensor:
    """Rank (0 = smallest key) of each candidate among the candidates, row-major stable on ties."""
    flat = torch.where(candidates, keys, torch.full_like(keys, float("inf"))).reshape(-1)
    order = torch.argsort(flat, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device)
    return rank.reshape(keys.shape)


def clip_cov_loss(
    inputs: LossInputs,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    clip_cov_ratio: float = 2e-4,
    cov_low: float = 1.0,
    cov_high: float = 5.0,
    generator: torch.Generator | None = None,
) -> LossResult:
    """Clip-Cov (Cui et al., arXiv 2505.22617; methods.md §6.16; verl ``compute_policy_loss_clip_cov``).

        cov_t = (Â_t − mean Â)(log π_θ(y_t) − mean log π_θ)        means over valid tokens (all ranks)
        candidates: valid, not already PPO-clipped, ω_low < cov_t < ω_high
        pick n = min(max(⌊r · N⌋, 1), #candidates) of them uniformly at random, N = valid tokens here
        ℓ_t = 0 on the picked tokens (no gradient, as verl's multiply-by-0), PPO-clip ℓ_t elsewhere

    Randomness: one ``torch.rand((B, T), generator=generator)`` draw (on the generator's device, CPU by
    default); the n candidates with the smallest draws are picked.  Pass a seeded generator to reproduce.
    Metrics: the PPO ones plus ``clipcov/selected_frac`` and ``clipcov/candidate_frac``.
    """
    c = _clean(inputs)
    log_ratio = token_log_ratio(inputs.logprobs, c.old_logprobs, c.mask)
    ratio = torch.exp(log_ratio)
    sur = _clipped_surrogate(ratio, c.advantages, c.mask, 1.0 - clip_low, 1.0 + clip_high, None)
    cov = _token_covariance(c, inputs)
    already_clipped = sur.clipped_low | sur.clipped_high
    candidates = c.mask & ~already_clipped & (cov > cov_low) & (cov < cov_high)
    device = generator.device if generator is not None else torch.device("cpu")
    keys = torch.rand(c.mask.shape, generator=generator, device=device).to(c.mask.device)
    n_pick = torch.floor(clip_cov_ratio * masked_count(c.mask)).clamp(min=1.0)
    selected = candidates & (_rank_among(keys, candidates) < n_pick)
    metrics = _surrogate_metrics(sur, ratio, log_ratio, c.mask)
    metrics["clipcov/selected_frac"] = _frac(selected, c.mask)
    metrics["clipcov/candidate_frac"] = _frac(candidates, c.mask)
    return LossResult(masked_fill_zero(sur.loss, c.mask & ~selected), metrics)


def kl_cov_loss(
    inputs: LossInputs,
    *,
    kl_cov_ratio: float = 2e-3,
    kl_coef: float = 1.0,
    clip_low: float | None = None,
    clip_high: float | None = None,
) -> LossResult:
    """KL-Cov (Cui et al., arXiv 2505.22617; methods.md §6.16; verl ``compute_policy_loss_kl_cov``).

        cov_t as in ``clip_cov_loss``;  S = the k = max(⌊ratio · N⌋, 1) valid tokens with the largest cov
        ℓ_t = −r_t Â_t + β_kl · |log r_t| · 𝟙[t ∈ S],      r_t = π_θ(y_t)/π_old(y_t)

    The base surrogate is unclipped, as in the paper's code and verl; ``clip_low`` / ``clip_high`` switch
    on a PPO clip for the base term on that side (None = no clip).  k = 2e-3 is the 7B setting (2e-4 for
    32B).  Ties in cov are broken by position.  The penalty |log r| carries gradient β·sign(log r).
    Metrics: the PPO ones plus ``klcov/selected_frac`` and ``klcov/abs_log_ratio_mean`` (over all valid).
    """
    c = _clean(inputs)
    log_ratio = token_log_ratio(inputs.logprobs, c.old_logprobs, c.mask)
    ratio = torch.exp(log_ratio)
    lower = 1.0 - clip_low if clip_low is not None else 0.0  # r > 0, so 0 never clips
    upper = 1.0 + clip_high if clip_high is not None else float("inf")
    sur = _clipped_surrogate(ratio, c.advantages, c.mask, lower, upper, None)
    cov = _token_covariance(c, inputs)
    k = torch.floor(kl_cov_ratio * masked_count(c.mask)).clamp(min=1.0)
    selected = c.mask & (_rank_among(-cov, c.mask) < k)
    penalty = torch.where(selected, kl_coef * log_ratio.abs(), torch.zeros_like(log_ratio))
    metrics = _surrogate_metrics(sur, ratio, log_ratio, c.mask)
    metrics["klcov/selected_frac"] = _frac(selected, c.mask)
    metrics["klcov/abs_log_ratio_mean"] = masked_mean(log_ratio.detach().abs(), c.mask)
    return LossResult(masked_fill_zero(sur.loss + penalty, c.mask), metrics)
