"""Gradient-combination math: PCGrad, one-sided conflict projection, PCR's soft projection and its α.

Pure functions. Gradients are flat vectors ``(..., D)`` (one block's parameters concatenated; leading dims
broadcast, so a stack of blocks works too), or the per-block statistics a streaming combiner keeps instead
of the vectors themselves (inner products ⟨a, b⟩, squared norms, sums S = Σ_j g_j and Q = Σ_j ‖g_j‖²).
The combiners that drive these functions live in ``steadyrl.stabilisers.pcr``.

Every projection here uses one coefficient,

    κ(g, o) = s · min(⟨g, o⟩, 0) / ‖o‖²          (0 where ‖o‖ = 0),

and removes κ·o from g: a share s of g's component along o, and only when g and o conflict (⟨g, o⟩ < 0).
κ is invariant to scaling g and o by the same positive factor, so it can be computed from sums S = J·μ as
well as from means μ.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def _nonzero(x: Tensor) -> Tensor:
    """``x`` where it is positive, else 1: a safe denominator for the branch that ``torch.where`` discards."""
    return torch.where(x > 0, x, torch.ones_like(x))


def inner_product(a: Tensor, b: Tensor) -> Tensor:  # (..., D), (..., D) -> (...)
    """⟨a, b⟩ over the last dimension."""
    return (a * b).sum(dim=-1)


def conflict_coefficient(
    dot: Tensor,  # (...) ⟨g, o⟩
    onto_sq_norm: Tensor,  # (...) ‖o‖²
    strength: Tensor | float = 1.0,  # (...) or scalar: s, the share of the conflicting component removed
) -> Tensor:  # (...) κ ≤ 0 for s ≥ 0
    """κ = s · min(⟨g, o⟩, 0) / ‖o‖², and 0 where ‖o‖ = 0 (then ⟨g, o⟩ = 0 too: nothing conflicts).

    ``g − κ·o`` is the projected gradient: s = 1 removes the whole conflicting component (PCGrad,
    Yu et al. 2020, arXiv 2001.06782), s = α is PCR's soft projection (arXiv 2602.06453, Eq. 15).
    """
    conflicting = (dot < 0) & (onto_sq_norm > 0)
    ratio = dot / _nonzero(onto_sq_norm)
    return torch.where(conflicting, strength * ratio, torch.zeros_like(ratio))


def project_conflicting(
    gradient: Tensor,  # (..., D) g
    onto: Tensor,  # (..., D) o
    strength: Tensor | float = 1.0,  # (...) or scalar, s in [0, 1]
) -> Tensor:  # (..., D)
    """One-sided projection: g − s · min(⟨g, o⟩, 0) / ‖o‖² · o.

    With s = 1 the result never conflicts with o (⟨result, o⟩ = max(⟨g, o⟩, 0)); the component of g
    orthogonal to o is never changed. Where o = 0, g is returned unchanged.
    """
    # o / max|o| has the same direction and a norm ≥ 1, so ‖o‖² cannot underflow for a tiny o (the projection is
    # invariant to scaling o): P(c·g, c·o) = c·P(g, o) holds in floating point down to subnormal o too
    scale = onto.abs().amax(dim=-1, keepdim=True)
    unit = onto / _nonzero(scale)
    kappa = conflict_coefficient(inner_product(gradient, unit), inner_product(unit, unit), strength)
    return gradient - kappa.unsqueeze(-1) * unit


def pcgrad_project(
    g1: Tensor,  # (..., D)
    g2: Tensor,  # (..., D)
) -> tuple[Tensor, Tensor]:  # ((..., D), (..., D))
    """Two-objective PCGrad (Yu et al. 2020, arXiv 2001.06782; methods.md §2 baselines), symmetric.

    If ⟨g₁, g₂⟩ < 0:  g₁' = g₁ − ⟨g₁, g₂⟩/‖g₂‖² · g₂  and  g₂' = g₂ − ⟨g₂, g₁⟩/‖g₁‖² · g₁, each projected
    against the *original* other gradient (with two objectives the paper's random order does not matter);
    otherwise both are unchanged. The combined update is g₁' + g₂'. Invariant: ⟨g₁' + g₂', gᵢ⟩ ≥ 0 for
    i = 1, 2 (Cauchy–Schwarz), and ⟨g₁', g₂⟩ ≥ 0, ⟨g₂', g₁⟩ ≥ 0.
    """
    dot = inner_product(g1, g2)
    kappa_12 = conflict_coefficient(dot, inner_product(g2, g2))
    kappa_21 = conflict_coefficient(dot, inner_product(g1, g1))
    return g1 - kappa_12.unsqueeze(-1) * g2, g2 - kappa_21.unsqueeze(-1) * g1


def pcr_soft_projection(
    mu_pla: Tensor,  # (..., D) mean plasticity gradient μ_pla
    mu_sta: Tensor,  # (..., D) mean stability gradient μ_sta
    alpha: Tensor | float,  # (...) or scalar, α in [0, 1]
) -> Tensor:  # (..., D) the arbitrated plasticity direction
    """PCR soft projection (arXiv 2602.06453 Eq. 15; methods.md §2):

        g = μ_pla − α · ⟨μ_pla, μ_sta⟩ / ‖μ_sta‖² · μ_sta    if ⟨μ_pla, μ_sta⟩ < 0,   else  g = μ_pla.

    α = 1 is one-sided PCGrad, α = 0 the plain plasticity direction. [INF] Applying it only on a negative
    inner product is the PCGrad convention and the best reading of "the conflicting component" (methods.md
    §2 gaps). ‖μ_sta‖ = 0 returns μ_pla. Whether μ_sta is added afterwards is the caller's choice
    (``steadyrl.stabilisers.pcr``, ``add_stability``).
    """
    return project_conflicting(mu_pla, mu_sta, alpha)


def trace_variance_from_norms(
    sum_sq_norm: Tensor,  # (...) ‖S‖², S = Σ_j g_j
    sq_norm_sum: Tensor,  # (...) Q = Σ_j ‖g_j‖²
    num_samples: Tensor | float,  # () or (...) J
) -> Tensor:  # (...) σ² ≥ 0
    """Trace of the sample covariance of J gradient samples from streaming sums (methods.md §2, [INF]):

        σ² = tr Σ̂ = Σ_j ‖g_j − μ‖² / (J − 1) = (Q − ‖S‖²/J) / (J − 1),    μ = S / J.

    Guards: J < 2 gives σ² = 0 (one sample has no spread; PCR then computes α = 0, the plain direction);
    round-off that makes Q − ‖S‖²/J slightly negative is clamped to 0.
    """
    count = torch.as_tensor(num_samples, dtype=sq_norm_sum.dtype, device=sq_norm_sum.device)
    spread = sq_norm_sum - sum_sq_norm / count.clamp(min=1.0)
    variance = (spread / (count - 1.0).clamp(min=1.0)).clamp(min=0.0)
    return torch.where(count >= 2, variance, torch.zeros_like(variance))


def trace_variance(
    grad_sum: Tensor,  # (..., D) S = Σ_j g_j
    sq_norm_sum: Tensor,  # (...) Q = Σ_j ‖g_j‖²
    num_samples: Tensor | float,  # () or (...) J
) -> Tensor:  # (...) σ² ≥ 0
    """``trace_variance_from_norms`` with ‖S‖² computed from S: (Q − ‖S‖²/J) / (J − 1)."""
    return trace_variance_from_norms(inner_product(grad_sum, grad_sum), sq_norm_sum, num_samples)


def pcr_alpha(
    var_pla: Tensor,  # (...) σ²_pla
    var_sta: Tensor,  # (...) σ²_sta
    eps: float = 0.0,
) -> Tensor:  # (...) α in [0, 1]
    """PCR's projection strength (arXiv 2602.06453 Prop. 4.1 / Eq. 15; methods.md §2):

        α = σ²_pla / (σ²_pla + σ²_sta + ε)  =  λ_sta / (λ_pla + λ_sta),   λ = 1/σ² the precisions.

    A noisy plasticity gradient (σ²_pla ≫ σ²_sta) gives α → 1, full projection; a noisy stability gradient
    gives α → 0, the plain plasticity direction. Where both variances are 0 (e.g. J < 2) α = 0 exactly,
    whatever ε; ε (0 by default) only smooths, pulling α towards 0.
    """
    denominator = var_pla + var_sta + eps
    alpha = var_pla / _nonzero(denominator)
    return torch.where(denominator > 0, alpha, torch.zeros_like(alpha))


def blockwise_inner(
    a: Sequence[Tensor],  # N tensors, any shapes
    b: Sequence[Tensor],  # N tensors, the same shapes as a
    block_index: Tensor,  # (N,) long, block of each tensor, in [0, M)
    num_blocks: int,  # M
) -> Tensor:  # (M,) float32 or wider
    """⟨a, b⟩ restricted to each block: Σ over tensors i with block_index[i] = m of ⟨a_i, b_i⟩.

    This is how a per-module inner product (or squared norm, with b = a) is taken when a module's gradient
    lives in several parameter tensors. Accumulated in at least float32.
    """
    if len(a) != len(b) or len(a) != block_index.numel():
        raise ValueError(f"got {len(a)} and {len(b)} tensors for {block_index.numel()} block indices; pass one each.")
    dtype = torch.promote_types(a[0].dtype, torch.float32) if len(a) else torch.float32
    out = torch.zeros(num_blocks, dtype=dtype, device=block_index.device)
    if len(a):
        dots = torch.stack([torch.dot(x.reshape(-1).to(dtype), y.reshape(-1).to(dtype)) for x, y in zip(a, b)])
        out.index_add_(0, block_index, dots)
    return out
