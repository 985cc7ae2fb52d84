"""Importance ratios between two policies on the sampled tokens: token, sequence (GSPO) and prefix (MinPRO).

Log-ratios are clamped before ``exp`` so one wild token cannot produce inf; the clamp bound is generous
(e^20 ≈ 5e8) and only guards against overflow, it is not a trust region.
"""

from __future__ import annotations

import torch
from torch import Tensor

from steadyrl.ops.masking import masked_count, masked_fill_zero, masked_sum

LOG_RATIO_CLAMP = 20.0


def token_log_ratio(logprobs: Tensor, base_logprobs: Tensor, mask: Tensor, clamp: float = LOG_RATIO_CLAMP) -> Tensor:
    """log r_t = clamp(log π(y_t) − log π_base(y_t), −c, c); 0 at masked positions.  All (B, T)."""
    diff = masked_fill_zero(logprobs - base_logprobs, mask)
    return diff.clamp(-clamp, clamp)


def token_ratio(logprobs: Tensor, base_logprobs: Tensor, mask: Tensor, clamp: float = LOG_RATIO_CLAMP) -> Tensor:
    """r_t = exp(log r_t), 1 at masked positions.  All (B, T)."""
    return torch.exp(token_log_ratio(logprobs, base_logprobs, mask, clamp))


def sequence_log_ratio(logprobs: Tensor, base_logprobs: Tensor, mask: Tensor, clamp: float = LOG_RATIO_CLAMP) -> Tensor:
    """GSPO (arXiv 2507.18071): log s_i = (1/|y_i|) Σ_t log r_{i,t}, the length-normalised sequence log-ratio.

    logprobs, base_logprobs, mask: (B, T).  Returns (B,); 0 for an empty sequence.
    """
    log_r = token_log_ratio(logprobs, base_logprobs, mask, clamp=float("inf"))
    mean = masked_sum(log_r, mask, dim=1) / masked_count(mask, dim=1).clamp(min=1.0)
    return mean.clamp(-clamp, clamp)


def gspo_token_log_ratio(logprobs: Tensor, base_logprobs: Tensor, mask: Tensor, clamp: float = LOG_RATIO_CLAMP) -> Tensor:
    """GSPO-token: log s_{i,t} = sg[log s_i] + log π_θ(y_t) − sg[log π_θ(y_t)].

    Same value as the sequence ratio at every token, but its gradient flows through each token's own
    log-prob, which is what allows per-token advantages.  (B, T) -> (B, T).
    """
    seq = sequence_log_ratio(logprobs, base_logprobs, mask, clamp).detach()
    own = masked_fill_zero(logprobs, mask)
    return seq.unsqueeze(1) + own - own.detach()


def prefix_min_log_ratio(log_ratio: Tensor, mask: Tensor, include_current: bool = False) -> Tensor:
    """MinPRO (arXiv 2601.22718), inferred reading: m_t = min(min_{i<t} log ρ_i, 0).

    The paper replaces the cumulative prefix ratio Π_{i≤t} ρ_i by a non-cumulative surrogate built from the
    smallest token ratio seen in the prefix; the exact formula was not recoverable, so this implements
    ``weight_t = min(min_{i<t} ρ_i, 1)`` (strictly earlier tokens, capped at 1) and, with
    ``include_current=True``, the variant that also includes token t.  Masked positions do not enter the min.

    log_ratio, mask: (B, T).  Returns the log of the weight, (B, T), 0 at the first token of each sequence.
    """
    big = torch.full_like(log_ratio, float("inf"))
    vals = torch.where(mask, log_ratio, big)
    running = torch.cummin(vals, dim=1).values  # min over i ≤ t
    if not include_current:
        running = torch.cat([torch.full_like(running[:, :1], float("inf")), running[:, :-1]], dim=1)
    return masked_fill_zero(running.clamp(max=0.0), mask)
