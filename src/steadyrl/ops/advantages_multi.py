"""Advantage estimators the frameworks adopted in 2025-2026: GDPO (several reward components), MaxRL, GPG,
and the optimal token baseline.

GDPO, MaxRL and GPG keep the family signature of ``advantages.py`` (read its module docstring for the
shared NaN / no-signal behaviour)::

    fn(rewards, group_size, *, <hyper-parameters>) -> AdvantageResult

GDPO also accepts ``rewards`` of shape (B, K): column k is the k-th named reward component, in the order
the task declares them (e.g. ``accuracy``, ``format``); a (B,) tensor is K = 1.  The optimal token baseline
needs per-token statistics of π_old (log-probs and Σ_v π_v², see ``logprobs_from_hidden``) and returns
(B, T) advantages, so it takes them as keyword data and is not in the registry until the advantage
protocol carries them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from steadyrl.ops.advantages import _advantage_metrics, _group, _group_std, _result
from steadyrl.ops.masking import masked_count, masked_fill_zero, masked_mean, masked_sum, masked_var
from steadyrl.types import AdvantageResult

_BATCH_NORMS = ("std", "whiten", "none")


def gdpo_advantages(
    rewards: Tensor,  # (B,) or (B, K), B = P*G, groups contiguous, NaN = missing
    group_size: int,
    *,
    weights: Sequence[float] | None = None,
    eps: float = 1e-4,
    std_unbiased: bool = True,
    batch_norm: str = "std",
    batch_eps: float = 1e-4,
) -> AdvantageResult:
    """GDPO, group reward-decoupled normalisation (arXiv 2601.05242; TRL
    ``multi_objective_aggregation="normalize_then_sum"``, verl ``gdpo``).

        A_{k,i} = (R_{k,i} − mean_g R_k) / (std_g R_k + ε)        per component k, within each group
        S_i     = Σ_k w_k A_{k,i}
        "std":    Â_i = (S_i − mean_B S) / (std_B S + ε_B)        TRL (ε = ε_B = 1e-4, the defaults)
        "whiten": Â_i = (S_i − mean_B S) / √(var_B S + ε_B)       verl's masked_whiten (ε = 1e-6, ε_B = 1e-8)
        "none":   Â_i = S_i                                       (K = 1: exactly GRPO)

    Normalising each component before summing keeps a dominant reward (say accuracy) from drowning a
    weaker one (format).  Stds are unbiased by default (both frameworks); the batch statistics run over the
    valid completions.  verl whitens over *tokens* (each completion weighted by its length); here every
    completion counts once, which equals verl when the responses have equal length.  A missing component
    (NaN) is left out of its group's statistics and adds 0 to S (TRL's nansum); a completion with every
    component missing gets Â = 0 and ``sample_mask`` False.  A group with no signal in any component keeps
    Â = 0 after the batch step.  Adds ``gdpo/component_zero_std_frac`` (mean over components).
    """
    if batch_norm not in _BATCH_NORMS:
        raise ValueError(f"gdpo batch_norm must be one of {_BATCH_NORMS}, got {batch_norm!r}.")
    columns = rewards.unsqueeze(1) if rewards.dim() == 1 else rewards
    if columns.dim() != 2 or columns.shape[1] == 0:
        raise ValueError(f"gdpo rewards must be (B,) or (B, K) with K ≥ 1, got shape {tuple(rewards.shape)}.")
    k = columns.shape[1]
    w = [1.0] * k if weights is None else [float(x) for x in weights]
    if len(w) != k:
        raise ValueError(f"gdpo got {len(w)} weights for {k} reward components; give one weight per component.")
    total, any_valid, any_signal, zero_std = None, None, None, []
    for j in range(k):
        g = _group(columns[:, j].contiguous(), group_size)
        a = (g.rewards - g.mean) / (_group_std(g, std_unbiased) + eps)
        a = torch.where(g.valid & ~g.zero_std, a, torch.zeros_like(a))
        total = w[j] * a if total is None else total + w[j] * a
        any_valid = g.valid if any_valid is None else any_valid | g.valid
        signal = g.valid & ~g.zero_std
        any_signal = signal if any_signal is None else any_signal | signal
        zero_std.append(g.zero_std.float().mean())
    sample_mask = any_valid.reshape(-1)
    scores = total.reshape(-1)
    if batch_norm != "none":
        centered = scores - masked_mean(scores, sample_mask)
        var = masked_var(scores, sample_mask, unbiased=std_unbiased)
        scale = var.sqrt() + batch_eps if batch_norm == "std" else torch.sqrt(var + batch_eps)
        scores = centered / scale
    has_signal = any_signal.any(dim=1, keepdim=True).expand_as(any_signal).reshape(-1)
    advantages = torch.where(sample_mask & has_signal, scores, torch.zeros_like(scores))
    g_all = _group(torch.where(sample_mask, scores, torch.full_like(scores, float("nan"))), group_size)
    metrics = _advantage_metrics(advantages, sample_mask, g_all)
    metrics["adv/zero_std_frac"] = (~any_signal.any(dim=1)).float().mean()
    metrics["gdpo/component_zero_std_frac"] = torch.stack(zero_std).mean()
    return AdvantageResult(advantages, sample_mask, metrics)


def maxrl_advantages(
    rewards: Tensor,  # (B,)
    group_size: int,
    *,
    eps: float = 1e-6,
    divide_by_group_size: bool = False,
) -> AdvantageResult:
    """MaxRL, maximum-likelihood RL (Tajwar et al., arXiv 2602.02710; prime-rl ``max_rl``, SkyRL ``maxrl``).

        Â_i = (R_i − μ_g) / (μ_g + ε)   if μ_g ≠ 0,   0 if μ_g = 0       μ_g = mean of the group's rewards

    For binary rewards with K successes in n samples a success gets (n − K)/K and a failure −1: the
    gradient is that of log p (pass rate) rather than p, up-weighting hard prompts by 1/p.  The μ = 0 guard
    is the official code's (Zanette-Labs/MaxRL ``compute_p_normalization_outcome_advantage``), which also
    divides by n: ``divide_by_group_size=True`` [a constant scale; the paper's formula and the first
    author's ``maxrl`` estimator omit it].  Rewards should be ≥ 0 (pass rates); a group with a negative mean
    flips signs and is counted in ``maxrl/negative_mean_frac``.
    """
    g = _group(rewards, group_size)
    safe_mean = torch.where(g.mean == 0, torch.ones_like(g.mean), g.mean)
    advantages = torch.where(g.mean == 0, torch.zeros_like(g.rewards), (g.rewards - g.mean) / (safe_mean + eps))
    if divide_by_group_size:
        advantages = advantages / g.count.clamp(min=1.0)
    has_members = g.count > 0
    negative = masked_mean((g.mean < 0).float(), has_members)
    return _result(advantages, g, **{"maxrl/negative_mean_frac": negative})


def gpg_advantages(
    rewards: Tensor,  # (B,)
    group_size: int,
    *,
    f_norm: float = 1.0,
    alpha_count: str = "nonzero_rewards",
) -> AdvantageResult:
    """GPG, group policy gradient (Chu et al., arXiv 2504.02546; verl ``gpg``), with loss ``reinforce``.

        Â_i = α · (R_i − mean_g R) / F_norm,     α = N / M

    N = valid completions in the batch.  M, the count that corrects for groups without signal [paper:
    α = B/(B − M_invalid)]: ``"nonzero_rewards"`` counts completions whose reward is non-zero, as verl's
    ``compute_gpg_outcome_advantage`` does (``torch.count_nonzero(scores)``); ``"nonzero_advantages"``
    counts completions with a non-zero centred reward, the paper's reading.  M is floored at 1.
    F_norm = 1 is the paper's best setting.  Adds ``gpg/alpha``.
    """
    if alpha_count not in ("nonzero_rewards", "nonzero_advantages"):
        raise ValueError(f"gpg alpha_count must be 'nonzero_rewards' or 'nonzero_advantages', got {alpha_count!r}.")
    if f_norm <= 0:
        raise ValueError(f"gpg f_norm must be positive, got {f_norm}.")
    g = _group(rewards, group_size)
    centered = torch.where(g.valid & ~g.zero_std, g.rewards - g.mean, torch.zeros_like(g.rewards))
    counted = g.rewards if alpha_count == "nonzero_rewards" else centered
    m = masked_count(g.valid & (counted != 0)).to(g.rewards.dtype)  # counts are float32; exact either way
    alpha = masked_count(g.valid).to(g.rewards.dtype) / m.clamp(min=1.0)
    return _result(alpha * centered / f_norm, g, **{"gpg/alpha": alpha})


def optimal_token_baseline_advantages(
    rewards: Tensor,  # (B,)
    group_size: int,
    *,
    old_logprobs: Tensor,  # (B, T) log π_old(y_t)
    sum_pi_squared: Tensor,  # (B, T) Σ_v π_old(v | prefix)², from logprobs_from_hidden
    response_mask: Tensor,  # (B, T) bool
    rollout_is_weights: Tensor | None = None,  # (B, T) truncated IS weights ρ̄
    handle_zero_tail: bool = True,
    eps: float = 1e-8,
) -> AdvantageResult:
    """Optimal token baseline (arXiv 2602.07078; verl ``optimal_token_baseline``): (B, T) advantages.

        w_t = 1 − 2 π_old(y_t) + Σ_v π_old(v)²    (= ‖∇_z log π(y_t)‖², the logit-gradient energy of token t)
        W_{i,t} = Σ_{s ≤ t} ρ̄²_s w_s               (cumulative; ρ̄ = 1 without IS weights)
        b_t = Σ_i G_{i,t} W_{i,t} / (Σ_i W_{i,t} + ε)   over the valid members of the group at step t
        Â_{i,t} = G_{i,t} − b_t,     G_{i,t} = R_i (outcome reward, every valid token)

    A baseline per step that weighs each trajectory by the gradient variance it has accumulated, which
    minimises the variance of the token-level gradient estimate.  ``handle_zero_tail`` (verl's default):
    where the single longest member of a group runs past the second longest, its baseline there is 0
    (it would otherwise be its own return).  A group of one gets b = 0.  Lengths are mask counts, so masks
    must be right-padded (verl's reading).  A NaN reward: Â = 0, ``sample_mask`` False, left out of b.
    """
    g = _group(rewards, group_size)
    mask = response_mask.bool()
    if mask.dim() != 2 or mask.shape[0] != rewards.shape[0]:
        raise ValueError(f"response_mask must be (B={rewards.shape[0]}, T), got {tuple(mask.shape)}.")
    for name, t in (("old_logprobs", old_logprobs), ("sum_pi_squared", sum_pi_squared)):
        if t.shape != mask.shape:
            raise ValueError(f"{name} must have the response_mask's shape {tuple(mask.shape)}, got {tuple(t.shape)}.")
    p, n, length = g.rewards.shape[0], group_size, mask.shape[1]
    valid = mask & g.valid.reshape(-1, 1)
    w = 1.0 - 2.0 * torch.exp(old_logprobs.detach()) + sum_pi_squared.detach()
    if rollout_is_weights is not None:
        w = w * rollout_is_weights.detach().square()
    cum_w = masked_fill_zero(w, valid).cumsum(dim=1).reshape(p, n, length)
    returns = masked_fill_zero(g.rewards.reshape(-1, 1).expand_as(w), valid).reshape(p, n, length)
    vmask = valid.reshape(p, n, length)
    num = masked_sum(returns * cum_w, vmask, dim=1)  # (P, T)
    den = masked_sum(cum_w, vmask, dim=1) + eps
    baseline = (num / den).unsqueeze(1).expand(p, n, length)
    baseline = torch.where(g.count.unsqueeze(-1) > 1, baseline, torch.zeros_like(baseline))
    if handle_zero_tail and n > 1:
        lengths = masked_count(vmask, dim=2)  # (P, G)
        top2 = torch.topk(lengths, 2, dim=1).values  # (P, 2)
        longest = lengths == top2[:, :1]
        unique_longest = longest & (longest.sum(dim=1, keepdim=True) == 1) & (top2[:, :1] > top2[:, 1:])
        beyond = torch.arange(length, device=mask.device).view(1, 1, -1) >= top2[:, 1:].unsqueeze(-1)
        baseline = torch.where(unique_longest.unsqueeze(-1) & beyond, torch.zeros_like(baseline), baseline)
    advantages = masked_fill_zero((returns - baseline).reshape(-1, length), valid)
    sample_mask = g.valid.reshape(-1)
    metrics = {
        "reward/nan_frac": (~g.valid).float().mean(),
        "adv/mean": masked_mean(advantages, valid),
        "adv/std": masked_var(advantages, valid, unbiased=False).sqrt(),
        "adv/abs_max": advantages.abs().max() if advantages.numel() else advantages.new_zeros(()),
        "otb/baseline_mean": masked_mean(baseline.reshape(-1, length), valid),
    }
    return AdvantageResult(advantages, sample_mask, metrics)
