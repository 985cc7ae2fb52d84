"""The sampler's support: top-k and top-p (nucleus) filters, exactly as transformers' warpers apply them.

The rollout backends sample from the filtered distribution; the trainer can score on the same support
(``rollout.trainer_truncation``), so that μ and π_old are one distribution when the weights are equal.
Filtered-out entries become −∞ (their probability is exactly 0 after the softmax); kept entries keep their
gradient.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


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


def truncate(scores: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:  # (..., V) -> (..., V)
    """top-k, then top-p (transformers' order); top_k = 0 and top_p = 1 leave the scores as they are."""
    if top_k:
        scores = top_k_filter(scores, top_k)
    if top_p < 1.0:
        scores = top_p_filter(scores, top_p)
    return scores
