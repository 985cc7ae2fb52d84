"""Stability diagnostics: entropy, clip fractions, approximate KL, importance-weight statistics (ESS),
zero-variance groups and gradient geometry (global norm, cosine between two gradients).

Everything here is a measurement, never part of a loss: results are detached, computed in fp32, and
returned as tensors (no ``.item()``, so the trainer can do one host sync per optimizer step).

Reductions over empty sets follow one rule so that micro-batch / rank reduction stays exact: a mean or a
fraction of nothing is 0 (as ``masked_mean``); a ``*_min`` of nothing is +inf and a ``*_max`` of nothing is
−inf, the identities of the min / max reductions that ``Metrics`` names ending in ``_min`` / ``_max`` get.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from steadyrl.ops.masking import masked_count, masked_mean, masked_sum
from steadyrl.ops.ratios import token_log_ratio
from steadyrl.types import Metrics

__all__ = [
    "approx_kl_k3",
    "at_least_fp32",
    "clip_fractions",
    "effective_sample_size",
    "entropy_from_logits",
    "grad_cosine",
    "grad_cosine_per_module",
    "grad_global_norm",
    "is_weight_stats",
    "masked_max",
    "masked_min",
    "zero_variance_group_frac",
]


@torch.no_grad()
def entropy_from_logits(
    logits: Tensor,  # (..., V) any float dtype
    chunk_size: int = 1024,
) -> Tensor:  # (...) fp32, detached
    """Full-vocabulary entropy H = −Σ_v p_v log p_v with p = softmax(z), in fp32.

    The leading dimensions are flattened to rows and processed ``chunk_size`` rows at a time, so the extra
    memory is one chunk of fp32 (chunk_size, V) tensors, never a full fp32 copy of ``logits``.
    Uses H = logsumexp(z) − Σ_v p_v z_v; vocabulary entries at −inf (p = 0) contribute 0, not NaN.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
    lead_shape = logits.shape[:-1]
    rows = logits.reshape(-1, logits.shape[-1])
    out = torch.empty(rows.shape[0], dtype=torch.float32, device=logits.device)
    for start in range(0, rows.shape[0], chunk_size):
        out[start : start + chunk_size] = _entropy_fp32(rows[start : start + chunk_size].float())
    return out.reshape(lead_shape)


def _entropy_fp32(logits: Tensor) -> Tensor:
    """(N, V) fp32 logits -> (N,) entropy; shared with the chunked log-prob kernel."""
    log_norm = torch.logsumexp(logits, dim=-1, keepdim=True)
    log_p = logits - log_norm
    p = torch.exp(log_p)
    plogp = torch.where(p > 0, p * log_p, torch.zeros((), dtype=p.dtype, device=p.device))
    return -plogp.sum(dim=-1)


def at_least_fp32(x: Tensor) -> Tensor:
    """x detached, upcast to fp32 if it is a lower-precision float (fp64 stays fp64)."""
    x = x.detach()
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def masked_min(x: Tensor, mask: Tensor) -> Tensor:
    """min of x over mask; +inf (the identity of min) when nothing is selected.  0-d."""
    return torch.where(mask, x, torch.full_like(x, float("inf"))).amin() if x.numel() else _inf(x, 1.0)


def masked_max(x: Tensor, mask: Tensor) -> Tensor:
    """max of x over mask; −inf (the identity of max) when nothing is selected.  0-d."""
    return torch.where(mask, x, torch.full_like(x, float("-inf"))).amax() if x.numel() else _inf(x, -1.0)


def _inf(x: Tensor, sign: float) -> Tensor:
    return torch.tensor(sign * float("inf"), dtype=x.dtype, device=x.device)


def clip_fractions(
    ratio: Tensor,  # (B, T) π_θ/π_old (any ratio the surrogate clips)
    advantages: Tensor,  # (B, T), or (B, 1) / (B,) broadcast over tokens
    mask: Tensor,  # (B, T) bool
    eps_low: float,
    eps_high: float,
) -> Metrics:
    """Fractions of valid tokens whose PPO clip is *active* (the gradient is cut), by side.

        ratio/clip_frac_low  = mean_t 𝟙[r_t < 1 − ε_low  ∧ Â_t < 0]
        ratio/clip_frac_high = mean_t 𝟙[r_t > 1 + ε_high ∧ Â_t > 0]
        ratio/clip_frac      = their sum

    Counting only the side where the clipped branch wins (as TRL and DAPO report it) rather than
    |r − 1| > ε, which would also count tokens whose gradient still flows.
    """
    advantages = _broadcast_tokens(advantages, ratio)
    low = (ratio < 1.0 - eps_low) & (advantages < 0)
    high = (ratio > 1.0 + eps_high) & (advantages > 0)
    frac_low = masked_mean(low.float(), mask)
    frac_high = masked_mean(high.float(), mask)
    return {
        "ratio/clip_frac_low": frac_low,
        "ratio/clip_frac_high": frac_high,
        "ratio/clip_frac": frac_low + frac_high,
    }


def _broadcast_tokens(x: Tensor, like: Tensor) -> Tensor:
    if x.dim() == 1:
        x = x.unsqueeze(-1)
    return x.expand_as(like)


@torch.no_grad()
def approx_kl_k3(
    logprobs: Tensor,  # (B, T) log π_θ
    old_logprobs: Tensor,  # (B, T) log π_old (the sampling side)
    mask: Tensor,  # (B, T) bool
) -> Tensor:  # 0-d
    """k3 estimate of KL(π_old ‖ π_θ) on tokens sampled from π_old (Schulman, "Approximating KL"):

        r = π_θ/π_old,  k3 = mean_t (r − 1 − log r)  ≥ 0, and 0 iff r ≡ 1.

    The log-ratio is clamped to ±20 (``ratios.token_log_ratio``) so one wild token cannot give inf.
    """
    log_r = token_log_ratio(at_least_fp32(logprobs), at_least_fp32(old_logprobs), mask)
    return masked_mean(torch.expm1(log_r) - log_r, mask)


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


@torch.no_grad()
def zero_variance_group_frac(
    rewards: Tensor,  # (B,) float, NaN = reward missing (left out)
    group_size: int,
) -> Tensor:  # 0-d
    """Fraction of groups (G = ``group_size`` contiguous completions) whose non-NaN rewards are all equal.

    Such a group gives every member advantage 0 under any group-centred estimator. A group with at most one
    non-NaN reward counts as zero-variance (there is nothing to compare it with).
    """
    if group_size < 1 or rewards.shape[0] % group_size != 0:
        raise ValueError(
            f"group_size={group_size} does not divide the batch of {rewards.shape[0]} rewards; "
            "pass the number of completions per prompt and keep groups whole."
        )
    grouped = rewards.detach().float().reshape(-1, group_size)
    valid = ~torch.isnan(grouped)
    hi = torch.where(valid, grouped, torch.full_like(grouped, float("-inf"))).amax(dim=1)
    lo = torch.where(valid, grouped, torch.full_like(grouped, float("inf"))).amin(dim=1)
    few = valid.sum(dim=1) <= 1
    flat = few | (hi == lo)
    return flat.float().mean() if flat.numel() else torch.zeros((), device=rewards.device)


def _pairs(grads_a: Sequence[Tensor | None], grads_b: Sequence[Tensor | None]):
    if len(grads_a) != len(grads_b):
        raise ValueError(
            f"grad lists differ in length ({len(grads_a)} vs {len(grads_b)}); pass one entry per parameter, "
            "in the same order, with None for a parameter without gradient."
        )
    return zip(grads_a, grads_b)


def _device_of(grads: Sequence[Tensor | None]) -> torch.device:
    return next((g.device for g in grads if g is not None), torch.device("cpu"))


@torch.no_grad()
def grad_global_norm(grads: Sequence[Tensor | None]) -> Tensor:  # 0-d fp32
    """‖g‖₂ over all parameters (None = no gradient = zeros), accumulated in fp32."""
    total = torch.zeros((), dtype=torch.float32, device=_device_of(grads))
    for g in grads:
        if g is not None:
            total = total + g.detach().float().pow(2).sum()
    return total.sqrt()


def _cosine(dot: Tensor, sq_a: Tensor, sq_b: Tensor) -> Tensor:
    denom = (sq_a * sq_b).sqrt()
    return torch.where(denom > 0, dot / denom.clamp(min=torch.finfo(denom.dtype).tiny), torch.zeros_like(dot))


@torch.no_grad()
def grad_cosine(
    grads_a: Sequence[Tensor | None],  # one entry per parameter
    grads_b: Sequence[Tensor | None],  # same parameters, same order
) -> Tensor:  # 0-d fp32 in [−1, 1]
    """Global cosine ⟨a, b⟩ / (‖a‖ ‖b‖) with all parameters concatenated (PCR arXiv 2602.06453's
    cos(g_pla, g_sta) diagnostic). None is a zero gradient; the cosine is 0 when either norm is 0."""
    device = _device_of(list(grads_a) + list(grads_b))
    dot = torch.zeros((), dtype=torch.float32, device=device)
    sq_a = torch.zeros((), dtype=torch.float32, device=device)
    sq_b = torch.zeros((), dtype=torch.float32, device=device)
    for a, b in _pairs(grads_a, grads_b):
        if a is not None:
            sq_a = sq_a + a.detach().float().pow(2).sum()
        if b is not None:
            sq_b = sq_b + b.detach().float().pow(2).sum()
        if a is not None and b is not None:
            dot = dot + (a.detach().float() * b.detach().float()).sum()
    return _cosine(dot, sq_a, sq_b)


@torch.no_grad()
def grad_cosine_per_module(
    module_names: Sequence[str],  # one module label per parameter, e.g. "model.layers.3.mlp"
    grads_a: Sequence[Tensor | None],
    grads_b: Sequence[Tensor | None],
    *,
    prefix: str = "grad/cos/",
) -> Metrics:
    """Cosine between two gradients restricted to each module: ``{prefix}{module}`` -> 0-d tensor.

    Parameters sharing a label are concatenated (so a module's weight and bias count together); the same
    None / zero-norm rules as ``grad_cosine``. Labels come from the caller (e.g. the parameter name with its
    last component dropped), which keeps this function free of any model object.
    """
    if len(module_names) != len(grads_a):
        raise ValueError(
            f"{len(module_names)} module names for {len(grads_a)} gradients; pass one name per parameter."
        )
    device = _device_of(list(grads_a) + list(grads_b))
    sums: dict[str, list[Tensor]] = {}
    for name, (a, b) in zip(module_names, _pairs(grads_a, grads_b)):
        acc = sums.setdefault(name, [torch.zeros((), dtype=torch.float32, device=device) for _ in range(3)])
        if a is not None:
            acc[1] = acc[1] + a.detach().float().pow(2).sum()
        if b is not None:
            acc[2] = acc[2] + b.detach().float().pow(2).sum()
        if a is not None and b is not None:
            acc[0] = acc[0] + (a.detach().float() * b.detach().float()).sum()
    return {f"{prefix}{name}": _cosine(*acc) for name, acc in sums.items()}
