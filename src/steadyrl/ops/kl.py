"""Per-token estimators of KL(π_θ ‖ π_ref) on the sampled tokens (Schulman, "Approximating KL divergence",
2020), for a KL penalty added to the loss as in GRPO (arXiv 2402.03300; methods.md §6.1).

Every estimator has the same signature (registry family ``kl``)::

    fn(logprobs: Tensor,      # (B, T) log π_θ(y_t), carries the gradient
       ref_logprobs: Tensor,  # (B, T) log π_ref(y_t)
       mask: Tensor,          # (B, T) bool
       *, <keyword hyper-parameters>) -> Tensor  # (B, T), exactly 0 at masked positions

With y ~ π_θ and log r = log π_ref(y) − log π_θ(y):

    k1 = −log r                 unbiased, high variance, can be negative
    k2 = ½ (log r)²             biased, low variance, ≥ 0; its gradient is the true KL gradient's
                                first-order term (log π_θ − log π_ref) ∇log π_θ
    k3 = (r − 1) − log r        unbiased, low variance, ≥ 0 (verl ``low_var_kl``)

The ``_st`` variants are verl's "+" suffix: the value of k1 / k3 with the gradient of k2
(value + k2 − sg[k2]), i.e. an unbiased value to log and a well-behaved gradient to follow.

Masked positions may hold NaN or inf: the log-ratio is selected with ``torch.where`` before any arithmetic,
so neither the value nor the gradient sees them.  Reduce the result with ``ops.aggregation``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from steadyrl.ops.masking import masked_fill_zero
from steadyrl.ops.ratios import token_log_ratio

NO_CLAMP = float("inf")


def kl_k1(
    logprobs: Tensor,  # (B, T)
    ref_logprobs: Tensor,  # (B, T)
    mask: Tensor,  # (B, T) bool
) -> Tensor:  # (B, T)
    """k1 = log π_θ(y_t) − log π_ref(y_t); 0 at masked positions."""
    return token_log_ratio(logprobs, ref_logprobs, mask, clamp=NO_CLAMP)


def kl_k2(
    logprobs: Tensor,  # (B, T)
    ref_logprobs: Tensor,  # (B, T)
    mask: Tensor,  # (B, T) bool
) -> Tensor:  # (B, T)
    """k2 = ½ (log π_θ(y_t) − log π_ref(y_t))²; 0 at masked positions."""
    return 0.5 * token_log_ratio(logprobs, ref_logprobs, mask, clamp=NO_CLAMP).square()


def k3(log_ratio: Tensor) -> Tensor:
    """The k3 formula on a log-ratio log r = log q − log p of a sample from p: r − 1 − log r ≥ 0, an unbiased
    estimate of KL(p‖q). Every k3 in steadyrl (the KL penalty, the mismatch and drift metrics, the corrections'
    rejection test) is this one function."""
    return torch.expm1(log_ratio) - log_ratio


def kl_k3(
    logprobs: Tensor,  # (B, T)
    ref_logprobs: Tensor,  # (B, T)
    mask: Tensor,  # (B, T) bool
    *,
    log_ratio_clamp: float = 20.0,
    kl_clamp: float = 10.0,
) -> Tensor:  # (B, T)
    """k3 = exp(log r) − log r − 1 with log r = clamp(log π_ref − log π_θ, ±``log_ratio_clamp``), then the
    result clamped to ±``kl_clamp``; 0 at masked positions.

    Both clamps are verl's (``kl_penalty_forward``, 20 and 10): the first keeps ``exp`` finite, the second
    bounds one runaway token's penalty; where either clamp is active the token's gradient is 0.
    Unclamped, ∂k3/∂log π_θ = 1 − π_ref/π_θ.  Pass ``float("inf")`` to switch a clamp off.
    """
    log_ratio = token_log_ratio(ref_logprobs, logprobs, mask, clamp=log_ratio_clamp)
    return masked_fill_zero(k3(log_ratio).clamp(-kl_clamp, kl_clamp), mask)


def _with_k2_gradient(value: Tensor, logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor) -> Tensor:
    k2 = kl_k2(logprobs, ref_logprobs, mask)
    return value.detach() + (k2 - k2.detach())  # k2 − sg[k2] is exactly 0 in value


def kl_k1_st(
    logprobs: Tensor,  # (B, T)
    ref_logprobs: Tensor,  # (B, T)
    mask: Tensor,  # (B, T) bool
) -> Tensor:  # (B, T)
    """Straight-through k1 (verl ``k1+``): value of k1, gradient of k2.

        sg[k1] + k2 − sg[k2]
    """
    return _with_k2_gradient(kl_k1(logprobs, ref_logprobs, mask), logprobs, ref_logprobs, mask)


def kl_k3_st(
    logprobs: Tensor,  # (B, T)
    ref_logprobs: Tensor,  # (B, T)
    mask: Tensor,  # (B, T) bool
    *,
    log_ratio_clamp: float = 20.0,
    kl_clamp: float = 10.0,
) -> Tensor:  # (B, T)
    """Straight-through k3 (verl ``low_var_kl+`` / ``k3+``): value of clamped k3, gradient of k2.

        sg[k3] + k2 − sg[k2]

    The k2 gradient is not clamped, so a token whose k3 value hit ``kl_clamp`` still gets pulled back.
    """
    value = kl_k3(logprobs, ref_logprobs, mask, log_ratio_clamp=log_ratio_clamp, kl_clamp=kl_clamp)
    return _with_k2_gradient(value, logprobs, ref_logprobs, mask)
