"""Rollout-vs-trainer corrections: importance weights and rejection masks (methods.md §6.23).

The rollout engine (vLLM, SGLang, our native sampler) samples from μ, which differs from the trainer's own
probabilities even at identical parameters (kernels, precision, MoE routing). With

    ρ_t = π_anchor(y_t) / μ(y_t)        μ = ``inputs.rollout_logprobs``

and ``anchor`` choosing the trainer side of the ratio:

    "old"      π_anchor = π_old = ``inputs.old_logprobs``   decoupled mode (three policies; the PPO ratio
               π_θ/π_old handles staleness, this correction only the engine mismatch)
    "current"  π_anchor = π_θ   = ``inputs.logprobs``       bypass / pure-IS mode (two policies; the weight
               carries mismatch and staleness together)

every function here has the signature ``fn(inputs, *, anchor="old", <hyper-parameters>) -> CorrectionResult``:

    weights (B, T)  detached; 1 wherever no weight applies (padding, methods that only reject)
    mask    (B, T)  bool, False = a valid token this correction rejects; True at padding (it rejects
                    nothing there), so combine as ``response_mask & mask``
    metrics         see below

Methods (verl ``rollout_corr_helper.py``, TRL ``vllm_importance_sampling_mode``, "When Speed Kills
Stability", Liu, Li et al. 2025; Yao et al. 2025 "Your efficient RL framework secretly brings you off-policy
RL training"):

    token_tis    w_t = min(ρ_t, C)                                     C = 2.0 (verl default)
    seq_tis      w_i = min(Π_t ρ_t, C), broadcast over tokens           log space: exp(min(Σ log ρ, log C))
    token_mis    w_t = ρ_t · 𝟙[C_min ≤ ρ_t ≤ C_max], mask the rest      0.5, 2.0 (verl's RS band)
    seq_mis      w_i = Π_t ρ_t · 𝟙[C_min ≤ Π_t ρ_t ≤ C_max]             0.5, 2.0 (verl decoupled_seq_is_rs)
    icepop       token_mis with IcePop's band [0.5, 5] (arXiv 2510.18855; verl decoupled_token_icepop)

TRL 1.16's ``vllm_importance_sampling_correction`` defaults to ``sequence_mask`` with C_max = 3.0 and no
lower bound (``vllm_importance_sampling_clip_min=None``): ``seq_mis`` with ratio_min=0, ratio_max=3.0.
TRL keeps masked tokens in its loss denominator; steadyrl's trainer removes rejected tokens from every
normaliser (train/update.py), so with ``token_mean`` the two differ by that count.
    geo_rs       reject sequence i if exp(mean_t log ρ_t) ∉ [lower, upper]      0.999, 1.001 (verl preset)
    geo_rs_k3    reject sequence i if mean_t (ρ_t − log ρ_t − 1) > k3_max      0.01 (verl preset)
    opsm         DeepSeek-V3.2 off-policy sequence masking (arXiv 2512.02556), see ``opsm``

Metrics (every method; "units" are tokens for token-level methods and sequences for sequence-level ones;
a valid sequence has at least one valid token):

    mismatch/kl_k1          mean over valid tokens of log μ − log π_anchor  (k1 estimate of KL(μ‖π_anchor)
                            on μ-samples; may be negative on a finite sample)
    mismatch/kl_k3          mean over valid tokens of ρ − log ρ − 1         (k3 estimate, ≥ 0)
    mismatch/is_weight_mean / _min / _max, mismatch/is_ess
                            statistics of the weights that reach the loss: over valid, kept units;
                            ESS = (Σw)² / (N Σw²) (``diagnostics.effective_sample_size``)
    mismatch/masked_frac    fraction of valid *tokens* rejected (0 for TIS)
    mismatch/masked_seq_frac   (sequence-level rejections) fraction of valid sequences rejected
    mismatch/truncated_frac (TIS) fraction of valid units with ρ > C

ρ is computed from log-probabilities clamped per token to ±20 (``ratios.token_log_ratio``): an overflow
guard, not a trust region. ``mismatch_metrics`` measures the mismatch without correcting anything and is
what the trainer logs every step.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from steadyrl.ops.diagnostics import at_least_fp32, is_weight_stats
from steadyrl.ops.kl import k3
from steadyrl.ops.masking import masked_max, masked_mean, masked_min, masked_sum
from steadyrl.ops.ratios import LOG_RATIO_CLAMP, token_log_ratio
from steadyrl.types import CorrectionResult, LossInputs, Metrics

__all__ = [
    "geo_rs",
    "geo_rs_k3",
    "icepop",
    "mismatch_metrics",
    "opsm",
    "seq_mis",
    "seq_tis",
    "token_mis",
    "token_tis",
]

_ANCHORS = ("old", "current")
_IS = "mismatch/is_"


def _log(x: float) -> float:
    return math.log(x) if x > 0 else float("-inf")


def _check_band(ratio_min: float, ratio_max: float) -> None:
    if not (0.0 <= ratio_min <= ratio_max):
        raise ValueError(
            f"need 0 <= ratio_min <= ratio_max, got ratio_min={ratio_min}, ratio_max={ratio_max}."
        )


def _log_rho(inputs: LossInputs, anchor: str, method: str) -> tuple[Tensor, Tensor]:
    """(log ρ (B, T) detached, 0 at padding, clamped to ±20; valid mask (B, T) bool)."""
    if inputs.rollout_logprobs is None:
        raise ValueError(
            f"{method} needs inputs.rollout_logprobs (log μ of the sampled tokens from the rollout engine): "
            "have the rollout backend return them (RolloutBatch.rollout_logprobs) and pass them into "
            "LossInputs, or turn the rollout correction off."
        )
    if anchor == "old":
        target = inputs.old_logprobs
    elif anchor == "current":
        target = inputs.logprobs
    else:
        raise ValueError(f"{method}: anchor must be one of {_ANCHORS}, got {anchor!r}.")
    mask = inputs.response_mask.bool()
    for name, t in (("rollout_logprobs", inputs.rollout_logprobs), (f"{anchor} logprobs", target)):
        if t.shape != mask.shape:
            raise ValueError(
                f"{method}: {name} has shape {tuple(t.shape)}, response_mask {tuple(mask.shape)}."
            )
    return token_log_ratio(at_least_fp32(target), at_least_fp32(inputs.rollout_logprobs), mask), mask


def _kl_metrics(log_rho: Tensor, mask: Tensor) -> Metrics:
    return {
        "mismatch/kl_k1": masked_mean(-log_rho, mask),
        "mismatch/kl_k3": masked_mean(k3(log_rho), mask),
    }


def _result(weights: Tensor, keep: Tensor, mask: Tensor, metrics: Metrics) -> CorrectionResult:
    """Weights 1 and mask True at padding, so masked garbage can never leak out."""
    one = torch.ones((), dtype=weights.dtype, device=weights.device)
    return CorrectionResult(torch.where(mask, weights, one).detach(), keep | ~mask, metrics)


def _seq_broadcast(x: Tensor, mask: Tensor) -> Tensor:
    return x.unsqueeze(1).expand_as(mask)


def token_tis(inputs: LossInputs, *, anchor: str = "old", cap: float = 2.0) -> CorrectionResult:
    """Token-level truncated importance sampling: w_t = sg[min(ρ_t, C)], nothing rejected.

    ρ_t = π_anchor(y_t)/μ(y_t); C = ``cap`` (verl default 2.0, typical 1.5–5). Biased (truncation) but low
    variance; multiply the per-token loss by ``weights``.  Extra metric: ``mismatch/truncated_frac``.
    """
    if cap <= 0:
        raise ValueError(f"token_tis: cap must be positive, got {cap}.")
    log_rho, mask = _log_rho(inputs, anchor, "token_tis")
    weights = torch.exp(log_rho.clamp(max=_log(cap)))
    metrics = _kl_metrics(log_rho, mask)
    metrics.update(is_weight_stats(weights, mask, prefix=_IS))
    metrics["mismatch/masked_frac"] = torch.zeros_like(metrics["mismatch/kl_k1"])
    metrics["mismatch/truncated_frac"] = masked_mean((log_rho > _log(cap)).to(log_rho.dtype), mask)
    return _result(weights, mask, mask, metrics)


def seq_tis(inputs: LossInputs, *, anchor: str = "old", cap: float = 2.0) -> CorrectionResult:
    """Sequence-level truncated IS: w_i = sg[min(Π_t ρ_{i,t}, C)] broadcast to the tokens of sequence i.

    Computed in log space, w_i = exp(min(Σ_t log ρ_{i,t}, log C)), so the product never overflows. Unbiased
    up to the truncation but high variance for long sequences (verl: typical C 2–10).  Weight statistics,
    ESS and ``mismatch/truncated_frac`` are over valid sequences.
    """
    if cap <= 0:
        raise ValueError(f"seq_tis: cap must be positive, got {cap}.")
    log_rho, mask = _log_rho(inputs, anchor, "seq_tis")
    seq_log_rho = masked_sum(log_rho, mask, dim=1)  # (B,)
    seq_weight = torch.exp(seq_log_rho.clamp(max=_log(cap)))
    seq_valid = mask.any(dim=1)
    metrics = _kl_metrics(log_rho, mask)
    metrics.update(is_weight_stats(seq_weight, seq_valid, prefix=_IS))
    metrics["mismatch/masked_frac"] = torch.zeros_like(metrics["mismatch/kl_k1"])
    metrics["mismatch/truncated_frac"] = masked_mean((seq_log_rho > _log(cap)).to(log_rho.dtype), seq_valid)
    return _result(_seq_broadcast(seq_weight, mask), mask, mask, metrics)


def token_mis(
    inputs: LossInputs, *, anchor: str = "old", ratio_min: float = 0.5, ratio_max: float = 2.0
) -> CorrectionResult:
    """Token-level masked IS: w_t = sg[ρ_t · 𝟙[C_min ≤ ρ_t ≤ C_max]]; tokens outside the band are rejected.

    Discards instead of clipping ("toxic tails", Liu, Li et al. 2025). Defaults C_min = 0.5, C_max = 2.0 (verl's
    rejection band); the band is inclusive. TRL 1.16's ``token_mask`` default is ratio_min=0, ratio_max=3.0.
    ``weights`` is ρ inside the band and 0 at rejected tokens, and ``mask`` is False there, so either alone
    removes them. Extra metrics: ``mismatch/masked_frac_low`` (ρ < C_min), ``mismatch/masked_frac_high``.
    """
    return _token_band("token_mis", inputs, anchor, ratio_min, ratio_max)


def icepop(
    inputs: LossInputs, *, anchor: str = "old", ratio_min: float = 0.5, ratio_max: float = 5.0
) -> CorrectionResult:
    """IcePop (Ring-1T, arXiv 2510.18855): token-level two-sided masking of the train/inference ratio.

    The paper's calibration M(k) = k if k ∈ [α, β] else 0 with k = π_train(y_t; θ_old)/π_infer(y_t; θ_old)
    multiplies the per-token clipped surrogate; i.e. ``token_mis`` with IcePop's band. α = 0.5, β = 5.0 are
    verl's ``decoupled_token_icepop`` preset; the paper's own numbers were not re-read [MEM].
    The paper evaluates the ratio at θ_old, so ``anchor="old"`` is the faithful setting; ``"current"`` is
    offered for bypass mode. Same weights / mask / metric convention as ``token_mis``.
    """
    return _token_band("icepop", inputs, anchor, ratio_min, ratio_max)


def _token_band(
    method: str, inputs: LossInputs, anchor: str, ratio_min: float, ratio_max: float
) -> CorrectionResult:
    _check_band(ratio_min, ratio_max)
    log_rho, mask = _log_rho(inputs, anchor, method)
    low = log_rho < _log(ratio_min)
    high = log_rho > _log(ratio_max)
    keep = ~(low | high)
    weights = torch.where(keep, torch.exp(log_rho), torch.zeros_like(log_rho))
    metrics = _kl_metrics(log_rho, mask)
    metrics.update(is_weight_stats(weights, mask & keep, prefix=_IS))
    metrics["mismatch/masked_frac"] = masked_mean((~keep).to(log_rho.dtype), mask)
    metrics["mismatch/masked_frac_low"] = masked_mean(low.to(log_rho.dtype), mask)
    metrics["mismatch/masked_frac_high"] = masked_mean(high.to(log_rho.dtype), mask)
    return _result(weights, keep, mask, metrics)


def seq_mis(
    inputs: LossInputs, *, anchor: str = "old", ratio_min: float = 0.5, ratio_max: float = 2.0
) -> CorrectionResult:
    """Sequence-level masked IS: w_i = sg[Π_t ρ_{i,t} · 𝟙[C_min ≤ Π_t ρ_{i,t} ≤ C_max]], broadcast.

    Whole sequences outside the (inclusive) band are rejected (mask False, weight 0); the test is done in log
    space on Σ_t log ρ_{i,t}. Defaults (0.5, 2.0) are verl's ``decoupled_seq_is_rs`` band; TRL 1.16's default
    ``sequence_mask`` is ratio_min=0, ratio_max=3.0. The weight of a kept sequence is additionally capped at e^20 (overflow guard for an infinite
    C_max). Weight statistics are over valid kept sequences.
    """
    _check_band(ratio_min, ratio_max)
    log_rho, mask = _log_rho(inputs, anchor, "seq_mis")
    seq_log_rho = masked_sum(log_rho, mask, dim=1)
    seq_keep = (seq_log_rho >= _log(ratio_min)) & (seq_log_rho <= _log(ratio_max))
    seq_weight = torch.where(
        seq_keep, torch.exp(seq_log_rho.clamp(max=LOG_RATIO_CLAMP)), torch.zeros_like(seq_log_rho)
    )
    metrics = _kl_metrics(log_rho, mask)
    metrics.update(is_weight_stats(seq_weight, mask.any(dim=1) & seq_keep, prefix=_IS))
    keep = _seq_broadcast(seq_keep, mask)
    metrics.update(_rejection_metrics(keep, mask, log_rho.dtype))
    return _result(_seq_broadcast(seq_weight, mask), keep, mask, metrics)


def _rejection_metrics(keep: Tensor, mask: Tensor, dtype: torch.dtype) -> Metrics:
    rejected = mask & ~keep
    return {
        "mismatch/masked_frac": masked_mean(rejected.to(dtype), mask),
        "mismatch/masked_seq_frac": masked_mean(rejected.any(dim=1).to(dtype), mask.any(dim=1)),
    }


def _pure_rejection(keep: Tensor, mask: Tensor, metrics: Metrics, dtype: torch.dtype) -> CorrectionResult:
    weights = torch.ones(mask.shape, dtype=dtype, device=mask.device)
    metrics.update(is_weight_stats(weights, mask & keep, prefix=_IS))
    metrics.update(_rejection_metrics(keep, mask, dtype))
    return _result(weights, keep, mask, metrics)


def geo_rs(
    inputs: LossInputs, *, anchor: str = "old", ratio_min: float = 0.999, ratio_max: float = 1.001
) -> CorrectionResult:
    """Geometric-mean rejection sampling (Geo-RS): reject sequence i when

        ρ̄_i = exp((1/|y_i|) Σ_t log ρ_{i,t})  ∉  [ratio_min, ratio_max]     (inclusive band)

    The per-token mean makes the test length-independent, unlike the product in ``seq_mis``; the band is
    tight (verl preset 0.999–1.001). No weights (all 1). Extra metrics: ``mismatch/geo_ratio_min`` /
    ``_max`` over valid sequences, to see how far the band is from the data.
    """
    _check_band(ratio_min, ratio_max)
    log_rho, mask = _log_rho(inputs, anchor, "geo_rs")
    seq_valid = mask.any(dim=1)
    mean_log_rho = masked_mean(log_rho, mask, dim=1)  # (B,); 0 for an empty row
    seq_keep = (mean_log_rho >= _log(ratio_min)) & (mean_log_rho <= _log(ratio_max))
    metrics = _kl_metrics(log_rho, mask)
    metrics["mismatch/geo_ratio_min"] = torch.exp(masked_min(mean_log_rho, seq_valid))
    metrics["mismatch/geo_ratio_max"] = torch.exp(masked_max(mean_log_rho, seq_valid))
    return _pure_rejection(_seq_broadcast(seq_keep, mask), mask, metrics, log_rho.dtype)


def geo_rs_k3(inputs: LossInputs, *, anchor: str = "old", k3_max: float = 0.01) -> CorrectionResult:
    """K3 variant of Geo-RS: reject sequence i when  (1/|y_i|) Σ_t (ρ_{i,t} − log ρ_{i,t} − 1) > k3_max.

    The per-sequence k3 estimate of KL(μ‖π_anchor); ≥ 0 and 0 iff every ρ is 1, so one threshold suffices
    (verl ``seq_mean_k3`` preset: 0.01, typical 0.001–0.1). No weights (all 1). Extra metric:
    ``mismatch/seq_k3_max`` over valid sequences.
    """
    if k3_max < 0:
        raise ValueError(f"geo_rs_k3: k3_max must be >= 0, got {k3_max}.")
    log_rho, mask = _log_rho(inputs, anchor, "geo_rs_k3")
    seq_k3 = masked_mean(k3(log_rho), mask, dim=1)
    seq_keep = seq_k3 <= k3_max
    metrics = _kl_metrics(log_rho, mask)
    metrics["mismatch/seq_k3_max"] = masked_max(seq_k3, mask.any(dim=1))
    return _pure_rejection(_seq_broadcast(seq_keep, mask), mask, metrics, log_rho.dtype)


def opsm(inputs: LossInputs, *, anchor: str = "old", delta: float = 0.5) -> CorrectionResult:
    """Off-policy sequence masking (DeepSeek-V3.2, arXiv 2512.02556; formula as in TRL's paper index):

        M_{i,t} = 0  if  Â_{i,t} < 0  and  D_i = (1/|y_i|) Σ_t log(π_b(y_{i,t}) / π_θ(y_{i,t})) > δ
                  1  otherwise

    i.e. drop negative-advantage samples the current policy has already moved away from. δ = ``delta``:
    the paper gives none; TRL suggests 0.5 (1.0 = on average e ≈ 2.7× less likely under π_θ).

    ``anchor`` names the behaviour side π_b (the denominator is always π_θ = ``inputs.logprobs``, detached):

        "old"      π_b = π_old (TRL docs / methods.md §6.23 formula; measures staleness only; in bypass mode,
                   where old_logprobs = μ, this is the inference-engine reading)
        "rollout"  π_b = μ (DeepSeek's π_old is the sampler's probability; TRL and ms-swift use the sampler
                   log-probs when they exist: measures engine mismatch + staleness) [2nd]

    ("current" would compare π_θ with itself and is refused.) The condition uses the per-token advantage
    as TRL does; with sequence-level advantages it is one decision per sequence. No weights (all 1).
    ``mismatch/kl_k1`` / ``kl_k3`` here estimate KL(π_b‖π_θ), the pair the mask thresholds.
    Extra metrics: ``opsm/drift_mean`` (mean of D_i over valid sequences) and ``opsm/drift_max``.
    """
    if anchor == "old":
        behaviour = inputs.old_logprobs
    elif anchor == "rollout":
        if inputs.rollout_logprobs is None:
            raise ValueError(
                "opsm with anchor='rollout' needs inputs.rollout_logprobs (log μ from the rollout engine); "
                "return them from the rollout backend or use anchor='old'."
            )
        behaviour = inputs.rollout_logprobs
    else:
        raise ValueError(f"opsm: anchor must be 'old' (π_old / π_θ) or 'rollout' (μ / π_θ), got {anchor!r}.")
    mask = inputs.response_mask.bool()
    log_drift = token_log_ratio(
        at_least_fp32(behaviour), at_least_fp32(inputs.logprobs), mask
    )  # log π_b − log π_θ
    drift = masked_mean(log_drift, mask, dim=1)  # (B,)
    advantages = inputs.advantages.detach()
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    advantages = advantages.expand_as(mask)
    keep = ~((advantages < 0) & _seq_broadcast(drift > delta, mask))
    seq_valid = mask.any(dim=1)
    metrics = {
        "mismatch/kl_k1": masked_mean(log_drift, mask),
        "mismatch/kl_k3": masked_mean(torch.expm1(-log_drift) + log_drift, mask),
        "opsm/drift_mean": masked_mean(drift, seq_valid),
        "opsm/drift_max": masked_max(drift, seq_valid),
    }
    return _pure_rejection(keep, mask, metrics, log_drift.dtype)


@torch.no_grad()
def mismatch_metrics(
    logprobs_trainer: Tensor,  # (B, T) log π of the trainer (π_old, or π_θ in bypass mode)
    rollout_logprobs: Tensor,  # (B, T) log μ from the rollout engine
    mask: Tensor,  # (B, T) bool
) -> Metrics:
    """Training–inference mismatch, measured on the sampled tokens (y ∼ μ), correcting nothing.

    With log ρ_t = log π(y_t) − log μ(y_t) (clamped to ±20), over valid tokens unless said otherwise:

        mismatch/kl_k1                  mean(−log ρ)             k1 estimate of KL(μ‖π)
        mismatch/kl_k3                  mean(ρ − log ρ − 1)      k3 estimate of KL(μ‖π), ≥ 0
        mismatch/ratio_mean             mean(ρ)                  1 in expectation when π and μ are the same
                                                                 distribution; a drift names a biased ratio
        mismatch/chi2                   mean(ρ²) − 1             estimate of χ²(π‖μ) = E_μ[ρ²] − 1, the
                                                                 variance of token IS weights
        mismatch/abs_logprob_diff_mean  mean |log ρ|
        mismatch/abs_logprob_diff_max   max |log ρ|              (−inf when nothing is valid)
        mismatch/log_ppl_abs_diff_mean  mean over valid sequences of |mean_t log μ − mean_t log π|, the
                                        absolute log-perplexity gap (verl ``log_ppl_abs_diff``)
    """
    mask = mask.bool()
    log_rho = token_log_ratio(at_least_fp32(logprobs_trainer), at_least_fp32(rollout_logprobs), mask)
    seq_valid = mask.any(dim=1)
    return {
        "mismatch/kl_k1": masked_mean(-log_rho, mask),
        "mismatch/kl_k3": masked_mean(k3(log_rho), mask),
        "mismatch/ratio_mean": masked_mean(torch.exp(log_rho), mask),
        "mismatch/chi2": masked_mean(torch.expm1(2.0 * log_rho), mask),
        "mismatch/abs_logprob_diff_mean": masked_mean(log_rho.abs(), mask),
        "mismatch/abs_logprob_diff_max": masked_max(log_rho.abs(), mask),
        "mismatch/log_ppl_abs_diff_mean": masked_mean(masked_mean(log_rho, mask, dim=1).abs(), seq_valid),
    }
