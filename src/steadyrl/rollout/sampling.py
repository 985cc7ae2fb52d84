"""Sampling from logits exactly as transformers' warpers do: top-k, top-p, the log μ the sampler used."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from steadyrl.rollout.base import SamplingParams


def top_k_filter(scores: Tensor, top_k: int) -> Tensor:  # scores: (B, V) -> (B, V)
    """−∞ outside the ``top_k`` largest scores; every score equal to the k-th largest is kept.

    Same as ``transformers.TopKLogitsWarper(top_k)``: keep z_v iff z_v ≥ (k-th largest z).
    """
    k = min(max(top_k, 1), scores.shape[-1])
    kth_largest = torch.topk(scores, k, dim=-1).values[..., -1:]
    return scores.masked_fill(scores < kth_largest, -math.inf)


def top_p_filter(scores: Tensor, top_p: float) -> Tensor:  # scores: (B, V) -> (B, V)
    """Nucleus filter, as ``transformers.TopPLogitsWarper(top_p)``.

    Sort ascending, c_i = Σ_{j ≤ i} softmax(z)_(j); drop tokens with c_i ≤ 1 − p, always keep the largest one.
    """
    sorted_scores, sorted_index = torch.sort(scores, descending=False, dim=-1)
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    sorted_drop = cumulative <= (1 - top_p)
    sorted_drop[..., -1:] = False
    drop = sorted_drop.scatter(-1, sorted_index, sorted_drop)
    return scores.masked_fill(drop, -math.inf)


def sampling_logprobs(logits: Tensor, params: SamplingParams) -> Tensor:  # logits: (B, V) -> (B, V) fp32
    """log μ over the vocabulary: log softmax of the processed scores (temperature, then top-k, then top-p).

    Greedy decoding (temperature 0) returns the temperature-1 log-probs, as the protocol asks.
    """
    scores = logits.float()
    if not params.greedy:
        if params.temperature != 1.0:
            scores = scores / params.temperature
        if params.top_k:
            scores = top_k_filter(scores, params.top_k)
        if params.top_p < 1.0:
            scores = top_p_filter(scores, params.top_p)
    return torch.log_softmax(scores, dim=-1)


def sample_categorical(
    probs: Tensor,  # (B, V) non-negative, rows need not sum to 1
    generator: torch.Generator | None = None,
) -> Tensor:  # (B,) long
    """One draw per row from P(v) = probs_v / Σ probs, by inverting the CDF: the first v with F_v > u · F_V.

    F is accumulated in fp64, so each token's effective probability is off by at most one fp64 rounding
    (≈ 1e-16; in fp32 every token below ≈ 3e-8 would be rounded away, up to ~1e-4 of the mass of a 150k
    vocabulary); zero-probability tokens are never drawn. B random numbers per step instead of
    ``torch.multinomial``'s per-row pass over the vocabulary: 2x faster on CPU at V = 1024, no host sync on
    CUDA. Reproducible from ``generator``.
    """
    cdf = probs.double().cumsum(dim=-1)
    total = cdf[:, -1:]
    uniform = torch.rand(total.shape, generator=generator, device=probs.device, dtype=cdf.dtype)
    # u · F_V can round up to F_V itself; the largest float below it keeps the draw on a positive-mass token
    threshold = torch.minimum(uniform * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, threshold, right=True).squeeze(1)
