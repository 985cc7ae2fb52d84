"""Masked reductions over (B, T) tensors.

Masked positions may hold anything, NaN and inf included: every op selects with ``torch.where`` before it
reduces, so ``x * mask`` (where ``NaN * 0 = NaN``) never happens.
"""

from __future__ import annotations

import torch
from torch import Tensor


def masked_fill_zero(x: Tensor, mask: Tensor) -> Tensor:
    """``x`` where ``mask`` else 0; the one safe way to drop masked garbage (NaN included)."""
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_sum(x: Tensor, mask: Tensor, dim: int | tuple[int, ...] | None = None) -> Tensor:
    """Σ x over positions where ``mask`` is True.  x, mask: same shape (or broadcastable)."""
    x = masked_fill_zero(x, mask)
    return x.sum() if dim is None else x.sum(dim=dim)


def masked_count(mask: Tensor, dim: int | tuple[int, ...] | None = None) -> Tensor:
    """Number of True positions, as float."""
    m = mask.to(torch.float32)
    return m.sum() if dim is None else m.sum(dim=dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | tuple[int, ...] | None = None) -> Tensor:
    """Σ_mask x / max(Σ mask, 1). An all-masked row gives 0, not NaN."""
    return masked_sum(x, mask, dim) / masked_count(mask.expand_as(x), dim).clamp(min=1.0)


def masked_max(x: Tensor, mask: Tensor) -> Tensor:
    """max of x over mask, 0-d; −inf (the identity of max) when nothing is selected, so that a ``*_max``
    metric reduces exactly over micro-batches and ranks."""
    if not x.numel():
        return torch.full((), float("-inf"), dtype=x.dtype, device=x.device)
    return torch.where(mask, x.detach(), torch.full_like(x, float("-inf"))).amax()


def masked_min(x: Tensor, mask: Tensor) -> Tensor:
    """min of x over mask, 0-d; +inf (the identity of min) when nothing is selected."""
    if not x.numel():
        return torch.full((), float("inf"), dtype=x.dtype, device=x.device)
    return torch.where(mask, x.detach(), torch.full_like(x, float("inf"))).amin()


def masked_var(x: Tensor, mask: Tensor, dim: int | tuple[int, ...] | None = None, unbiased: bool = True) -> Tensor:
    """Variance over masked positions; with ``unbiased`` divides by (n - 1), and gives 0 where n <= 1."""
    dims = tuple(range(x.dim())) if dim is None else dim
    n = masked_count(mask.expand_as(x), dims)
    mean = masked_sum(x, mask, dims) / n.clamp(min=1.0)
    mean = mean.reshape([1 if d in _norm_dims(dims, x.dim()) else s for d, s in enumerate(x.shape)])
    sq = masked_sum((x - mean) ** 2, mask, dims)
    denom = (n - 1.0) if unbiased else n
    return torch.where(denom > 0, sq / denom.clamp(min=1.0), torch.zeros_like(sq))


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x - mean) / sqrt(var + eps) over the masked positions of the whole tensor; masked positions -> 0."""
    mean = masked_mean(x, mask)
    var = masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps) if shift_mean else x * torch.rsqrt(var + eps)
    return masked_fill_zero(out, mask)


def response_mask_from_eos(completion_ids: Tensor, eos_token_id: int | list[int]) -> tuple[Tensor, Tensor]:
    """Mask True up to and including the first EOS; also returns ``truncated`` (B,) = no EOS found.

    completion_ids: (B, T) long.  Returns (response_mask (B, T) bool, truncated (B,) bool).
    """
    eos_ids = torch.as_tensor(eos_token_id, device=completion_ids.device).reshape(-1)
    is_eos = torch.isin(completion_ids, eos_ids)
    # Tokens strictly after the first EOS are padding: count EOS seen before each position.
    eos_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    mask = eos_before == 0
    truncated = ~is_eos.any(dim=1)
    return mask, truncated


def _norm_dims(dim: int | tuple[int, ...], ndim: int) -> set[int]:
    dims = (dim,) if isinstance(dim, int) else dim
    return {d % ndim for d in dims}
