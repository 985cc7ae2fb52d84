"""Importance-weighted k3 estimator of KL(π_θ ‖ π_ref) for samples drawn from π_old (DeepSeek-V3.2).

Same signature as the estimators in ``kl.py`` plus π_old, which the KL family does not pass yet::

    kl_k3_is(logprobs, ref_logprobs, mask, *, old_logprobs=None, ...) -> (B, T)

Without ``old_logprobs`` the samples are taken to come from π_θ itself (one update per batch), as TRL does
when it skips the π_old forward: the weight is 1 in value and still carries its gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from steadyrl.ops.kl import k3
from steadyrl.ops.masking import masked_fill_zero
from steadyrl.ops.ratios import LOG_RATIO_CLAMP, token_log_ratio


def kl_k3_is(
    logprobs: Tensor,  # (B, T) log π_θ(y_t), carries the gradient
    ref_logprobs: Tensor,  # (B, T) log π_ref(y_t)
    mask: Tensor,  # (B, T) bool
    *,
    old_logprobs: Tensor | None = None,  # (B, T) log π_old(y_t), the policy that sampled y
    log_ratio_clamp: float = float("inf"),
    kl_clamp: float = float("inf"),
) -> Tensor:  # (B, T), 0 at masked positions
    """k3 weighted by the importance ratio (DeepSeek-V3.2, arXiv 2512.02556 §3.1; TRL
    ``use_bias_correction_kl=True``, its default):

        w_t = π_θ(y_t) / π_old(y_t)              (with gradient)
        k3_t = π_ref/π_θ − log(π_ref/π_θ) − 1
        KL_t = w_t · k3_t

    With y ∼ π_old, E[w·k3] = E_{π_θ}[k3] = KL(π_θ ‖ π_ref) and, because w carries the gradient,
    ∇E[w·k3] is the true KL gradient: ∂KL_t/∂log π_θ = w (k3 + 1 − π_ref/π_θ).  Plain k3 on π_old's samples
    is biased once π_θ has moved.  TRL clamps nothing; ``log_ratio_clamp`` / ``kl_clamp`` apply verl's k3
    clamps to the k3 factor if wanted (``kl.kl_k3``).  The weight's log is clamped to ±20 (overflow guard).
    TRL uses the sequence ratio as w when ``importance_sampling_level="sequence"``; this is the token level.
    """
    old = logprobs.detach() if old_logprobs is None else old_logprobs.detach()
    log_w = token_log_ratio(logprobs, old, mask, clamp=LOG_RATIO_CLAMP)
    log_r = token_log_ratio(ref_logprobs, logprobs, mask, clamp=log_ratio_clamp)
    k3_value = k3(log_r).clamp(-kl_clamp, kl_clamp)
    return masked_fill_zero(torch.exp(log_w) * k3_value, mask)
