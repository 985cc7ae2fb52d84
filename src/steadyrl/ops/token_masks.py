"""Token masks that need only per-token tensors: the 80/20 high-entropy mask and M2PO's second-moment mask.

Each has the correction signature (``ops/correction.py``), so it composes with any loss the way a
rejection does::

    fn(inputs: LossInputs, *, <hyper-parameters>) -> CorrectionResult(weights, mask, metrics)

``weights`` is 1 everywhere (these only select), ``mask`` is False at a valid token the method drops and
True at padding.  The selection is made over this call's valid tokens (one micro-batch on one rank): a
quantile or a sorted-suffix rule cannot be formed from ``reduce_sum``.  TRL computes its entropy quantile
per micro-batch too (gathered over ranks); AReaL its M2PO mask per micro-batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from steadyrl.ops.diagnostics import at_least_fp32
from steadyrl.ops.masking import masked_count, masked_fill_zero, masked_mean
from steadyrl.ops.ratios import token_log_ratio
from steadyrl.types import CorrectionResult, LossInputs


def _result(keep: Tensor, mask: Tensor, metrics: dict[str, Tensor], dtype: torch.dtype) -> CorrectionResult:
    """All-ones weights; the mask rejects nothing at padding (True there), so it composes with ``&``."""
    return CorrectionResult(torch.ones(mask.shape, dtype=dtype, device=mask.device), keep | ~mask, metrics)


def high_entropy_mask(inputs: LossInputs, *, top_entropy_quantile: float = 0.2) -> CorrectionResult:
    """Train only on the high-entropy "forking" tokens (Wang et al., arXiv 2506.01939; TRL
    ``top_entropy_quantile``).

        h* = quantile_{valid t}(H_t, 1 − ρ)          (linear interpolation, as ``torch.quantile``)
        keep_t = H_t ≥ h*

    H_t is ``inputs.entropy`` (the full-vocabulary entropy of π_θ, detached).  ρ = 0.2 is the paper's
    80/20 split (TRL's default is 1.0 = off); ρ = 1 keeps every token.  TRL multiplies the per-token loss by
    this mask and keeps the loss normaliser unchanged: the masked tokens still count in the denominators.
    No valid token: nothing is kept (TRL returns an all-False mask).  Metrics:
    ``entropy_mask/kept_frac``, ``entropy_mask/threshold``.
    """
    if not 0.0 < top_entropy_quantile <= 1.0:
        raise ValueError(f"top_entropy_quantile must be in (0, 1], got {top_entropy_quantile}.")
    if inputs.entropy is None:
        raise ValueError(
            "high_entropy_mask needs inputs.entropy (the per-token entropy of π_θ): compute it in the policy "
            "forward (logprobs_from_hidden(compute_entropy=True)) and put it in LossInputs."
        )
    mask = inputs.response_mask.bool()
    entropy = at_least_fp32(inputs.entropy)
    threshold = _masked_quantile(entropy, mask, 1.0 - top_entropy_quantile)
    keep = mask & (masked_fill_zero(entropy, mask) >= threshold)
    metrics = {
        "entropy_mask/kept_frac": masked_mean(keep.to(entropy.dtype), mask),
        "entropy_mask/threshold": torch.nan_to_num(threshold, nan=0.0, posinf=0.0),
    }
    return _result(keep, mask, metrics, entropy.dtype)


def _masked_quantile(x: Tensor, mask: Tensor, q: float) -> Tensor:
    """``torch.quantile(x[mask], q)`` (linear interpolation) without a host sync; NaN when nothing is valid."""
    ranked = torch.sort(torch.where(mask, x, torch.full_like(x, float("inf"))).reshape(-1)).values
    n = masked_count(mask).to(x.dtype)
    position = (q * (n - 1.0)).clamp(min=0.0)
    low = position.floor()
    high = position.ceil()
    value = torch.lerp(ranked[low.to(torch.int64)], ranked[high.to(torch.int64)], position - low)
    return torch.where(n > 0, value, torch.full_like(value, float("nan")))


def m2po_mask(inputs: LossInputs, *, m2_threshold: float = 0.04, anchor: str = "old") -> CorrectionResult:
    """M2PO second-moment trust region (Zheng et al., arXiv 2510.01161; AReaL ``m2_threshold``).

        M₂,t = (log π_anchor(y_t) − log μ(y_t))²            μ = ``rollout_logprobs`` (the behaviour policy)
        drop the k valid tokens with the largest M₂, k the smallest count for which the mean M₂ of the
        remaining tokens is < τ;  if no k < N achieves it, keep only the single smallest (AReaL)

    Only extreme outliers go: the mean second moment of what is kept stays under τ = 0.04 (AReaL's
    ``gsm8k_m2po.yaml`` and the paper).  ``anchor="old"`` uses π_old, as AReaL's proximal policy (known
    before the update, so the mask can also shape the loss normalisers); ``"current"`` uses π_θ.  Ties in
    M₂ are broken by position (AReaL's unstable sort leaves them arbitrary).  The paper's objective pairs
    the mask with an unclipped ratio surrogate.  Metrics: ``m2po/masked_frac``, ``m2po/m2_mean`` (all valid
    tokens), ``m2po/m2_kept_mean``.
    """
    if m2_threshold <= 0:
        raise ValueError(f"m2_threshold must be positive (a bound on the mean squared log-ratio), got {m2_threshold}.")
    if inputs.rollout_logprobs is None:
        raise ValueError(
            "m2po_mask needs inputs.rollout_logprobs (log μ of the sampled tokens from the rollout engine): "
            "have the rollout backend return them and pass them into LossInputs."
        )
    if anchor not in ("old", "current"):
        raise ValueError(f"m2po_mask: anchor must be 'old' (π_old) or 'current' (π_θ), got {anchor!r}.")
    mask = inputs.response_mask.bool()
    target = inputs.old_logprobs if anchor == "old" else inputs.logprobs
    log_ratio = token_log_ratio(at_least_fp32(target), at_least_fp32(inputs.rollout_logprobs), mask)
    m2 = log_ratio.square()
    drop = _m2po_drop(m2, mask, m2_threshold)
    keep = mask & ~drop
    metrics = {
        "m2po/masked_frac": masked_mean(drop.to(m2.dtype), mask),
        "m2po/m2_mean": masked_mean(m2, mask),
        "m2po/m2_kept_mean": masked_mean(m2, keep),
    }
    return _result(keep, mask, metrics, m2.dtype)


def _m2po_drop(m2: Tensor, mask: Tensor, threshold: float) -> Tensor:
    """(B, T) bool: the valid tokens M2PO drops.  Vectorised, no host sync."""
    flat = torch.where(mask, m2, torch.full_like(m2, -1.0)).reshape(-1)  # M₂ ≥ 0, so −1 sorts after every valid
    order = torch.sort(flat, descending=True, stable=True).indices
    ranked = flat[order].clamp(min=0.0)  # padding contributes 0 to the suffix sums
    n = masked_count(mask).to(m2.dtype)
    position = torch.arange(flat.numel(), device=m2.device, dtype=m2.dtype)
    suffix_sum = ranked.flip(0).cumsum(0).flip(0)  # Σ of ranked[i:]
    remaining = (n - position).clamp(min=1.0)
    below = (position < n) & (suffix_sum / remaining < threshold)
    first_below = below.to(torch.int64).argmax()  # first True, 0 if none
    k = torch.where(below.any(), first_below.to(m2.dtype), (n - 1.0).clamp(min=0.0))
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device)
    return mask & (rank.reshape(mask.shape).to(m2.dtype) < k)
