"""Per-group and per-prompt math of the sampling layer (``steadyrl.sampling``): which groups carry no signal,
DAPO's soft overlong punishment, M-GRPO's IQR entropy fence, VADE's Beta posterior.

Pure functions of tensors; rewards are (B,) with groups of ``group_size`` contiguous rows, NaN = missing.
"""

from __future__ import annotations

import torch
from torch import Tensor

from steadyrl.ops.advantages import _group


def zero_variance_groups(rewards: Tensor, group_size: int) -> Tensor:
    """(P,) bool: the group's valid rewards are all equal (or it has fewer than two), so a group-relative
    advantage is 0 for every member: GRPO's dead groups, which DAPO's dynamic sampling drops."""
    return _group(rewards, group_size).zero_std.squeeze(1)


def overlong_penalty(lengths: Tensor, *, max_len: int, buffer_len: int, factor: float = 1.0) -> Tensor:
    """DAPO soft overlong punishment (Yu et al., arXiv 2503.14476 eq. 13; verl ``DAPORewardManager``), (B,):

        R_len(y) = min(−(|y| − (L_max − L_cache)) / L_cache · factor, 0)

    0 up to L_max − L_cache tokens, then falling linearly to −factor at L_max (the paper's −1 beyond L_max
    cannot occur: a completion is cut at L_max = ``max_len``).  Added to the task reward."""
    if not 0 < buffer_len <= max_len:
        raise ValueError(f"need 0 < buffer_len <= max_len, got buffer_len={buffer_len}, max_len={max_len}.")
    exceed = lengths.float() - (max_len - buffer_len)
    return (-exceed / buffer_len * factor).clamp(max=0.0)


def sequence_nll(rollout_logprobs: Tensor, response_mask: Tensor) -> Tensor:
    """(B,) mean −log μ(y_t) over each completion's tokens: the sampled-token estimate of its mean entropy
    (E_{y∼μ}[−log μ(y)] = H(μ)); 0 for an empty completion."""
    count = response_mask.sum(1).clamp(min=1)
    return -torch.where(response_mask, rollout_logprobs, 0.0).sum(1) / count


def iqr_keep(values: Tensor, group_size: int, *, k: float = 1.5, scope: str = "group") -> Tensor:
    """(B,) bool: ``values`` at or above the lower Tukey fence Q1 − k·IQR (quartiles by ``torch.quantile``,
    linear), per group (``scope="group"``) or over the whole batch (``"batch"``).

    M-GRPO drops trajectories whose entropy falls below the fence (low-entropy outliers, the start of an
    entropy collapse); k = 1.5 is Tukey's convention [INF: the paper's k was not recovered].  NaN values are
    kept and do not enter the quartiles."""
    if scope not in ("group", "batch"):
        raise ValueError(f"scope must be 'group' or 'batch', got {scope!r}.")
    grid = values.reshape(-1, group_size) if scope == "group" else values.reshape(1, -1)
    q = torch.nanquantile(grid.float(), torch.tensor([0.25, 0.75], device=values.device), dim=1)  # (2, rows)
    fence = q[0] - k * (q[1] - q[0])
    return (~(grid < fence[:, None])).reshape(-1)


def beta_decay(alpha: Tensor, beta: Tensor, factor: float, prior: tuple[float, float]) -> tuple[Tensor, Tensor]:
    """Pull a Beta posterior toward its prior: α ← α₀ + λ(α − α₀), β ← β₀ + λ(β − β₀).

    Forgetting for a non-stationary bandit (discounted Thompson sampling): the mean moves toward the prior's
    and the pseudo-count α + β shrinks, so the posterior widens again as the policy changes."""
    a0, b0 = prior
    return a0 + factor * (alpha - a0), b0 + factor * (beta - b0)


def beta_update(alpha: Tensor, beta: Tensor, successes: Tensor, failures: Tensor) -> tuple[Tensor, Tensor]:
    """Conjugate Bernoulli update Beta(α, β) → Beta(α + s, β + f); fractional s, f for rewards in [0, 1]."""
    return alpha + successes, beta + failures


def bernoulli_information(p: Tensor) -> Tensor:
    """p(1 − p): the variance of a 0/1 reward with success probability p, which is the expected squared
    group-relative advantage signal VADE maximises (0 at p ∈ {0, 1}, the dead groups; largest at ½)."""
    return p * (1 - p)
