"""Measurements shared by several ops: full-vocabulary entropy (the chunked log-prob pass computes it) and
importance-weight statistics with the effective sample size (the corrections report them).

Everything here is a measurement, never part of a loss: results are detached, computed in fp32, and
returned as tensors (no ``.item()``, so the trainer can do one host sync per optimizer step). The other
step diagnostics are computed where the quantity is: clip fractions and the k3 estimate of KL(π_old‖π_θ) by
each loss (ops/losses.py), the zero-variance group fraction by the advantage estimators, gradient geometry by
the combiners. Empty sets follow ``ops.masking``: a mean of nothing is 0, a min +inf, a max −inf.
"""

from __future__ import annotations

import torch
from torch import Tensor

from steadyrl.ops.masking import masked_count, masked_max, masked_mean, masked_min, masked_sum
from steadyrl.types import Metrics

__all__ = ["at_least_fp32", "effective_sample_size", "entropy_fp32", "is_weight_stats"]


def entropy_fp32(logits: Tensor) -> Tensor:
    """(N, V) fp32 logits → (N,) entropy H = logsumexp(z) − Σ_v p_v z_v = −Σ_v p_v log p_v; an entry at −inf
    (p = 0) contributes 0, not NaN, in value and in gradient (log p is zeroed there before the product, so an
    entropy bonus over a truncated support back-propagates no 0·∞). The chunked log-prob pass (ops/logprobs.py)
    calls it per chunk."""
    log_norm = torch.logsumexp(logits, dim=-1, keepdim=True)
    log_p = logits - log_norm
    p = torch.exp(log_p)
    zero = torch.zeros((), dtype=p.dtype, device=p.device)
    plogp = p * torch.where(p > 0, log_p, zero)
    return -plogp.sum(dim=-1)


def at_least_fp32(x: Tensor) -> Tensor:
    """x detached, upcast to fp32 if it is a lower-precision float (fp64 stays fp64)."""
    x = x.detach()
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def effective_sample_size(
    weights: Tensor,  # any shape (tokens (B, T) or sequences (B,))
    mask: Tensor,  # same shape, bool
) -> Tensor:  # 0-d in [0, 1]
    """Normalised ESS = (Σ w)² / (N Σ w²) over the N selected weights (Kong 1992; VCPO arXiv 2602.17616).

    1 when all weights are equal, 1/N when one weight carries everything; 0 when nothing is selected or
    every selected weight is 0 (no effective sample at all).
    """
    w = at_least_fp32(weights)
    n = masked_count(mask).to(w.dtype)
    sum_w = masked_sum(w, mask)
    sum_w2 = masked_sum(w * w, mask)
    ok = sum_w2 > 0
    return torch.where(
        ok, sum_w * sum_w / (n * sum_w2).clamp(min=torch.finfo(w.dtype).tiny), torch.zeros_like(n)
    )


def is_weight_stats(
    weights: Tensor,  # any shape (tokens (B, T) or sequences (B,))
    mask: Tensor,  # same shape, bool
    *,
    prefix: str = "is/",
) -> Metrics:
    """Mean, min, max and normalised ESS of importance weights over the selected entries.

    Keys: ``{prefix}weight_mean``, ``{prefix}weight_min``, ``{prefix}weight_max``, ``{prefix}ess``
    (e.g. ``prefix="mismatch/is_"`` gives ``mismatch/is_weight_mean`` ... ``mismatch/is_ess``).
    """
    w = at_least_fp32(weights)
    return {
        f"{prefix}weight_mean": masked_mean(w, mask),
        f"{prefix}weight_min": masked_min(w, mask),
        f"{prefix}weight_max": masked_max(w, mask),
        f"{prefix}ess": effective_sample_size(w, mask),
    }


