"""Group advantage estimators: one scalar reward per completion -> one advantage per completion.

Every estimator has the same signature (registry family ``advantage``)::

    fn(rewards: Tensor,  # (B,) float, B = P*G, groups contiguous, NaN = no reward
       group_size: int, *, <keyword hyper-parameters>) -> AdvantageResult

and returns ``advantages (B,)``, ``sample_mask (B,) bool`` and metrics. Shared behaviour:

* **Missing rewards.** A NaN reward (the reward function returned nothing) is left out of its group's
  statistics, gets advantage exactly 0 and ``sample_mask`` False; the other members get the values they would
  have if that completion had never been sampled.  Only NaN means "missing": ±inf is a reward bug and is not
  hidden.
* **Groups without signal.** A group whose valid rewards are all equal (or that has fewer than two valid
  members) gets advantages exactly 0, chosen with ``torch.where`` so that ``(R − mean)/eps`` rounding noise
  never becomes a gradient.  Such groups are counted in ``adv/zero_std_frac`` and keep ``sample_mask`` True.
* **Metrics.** ``adv/zero_std_frac`` (fraction of groups), ``reward/nan_frac`` (fraction of completions),
  ``adv/mean``, ``adv/std`` (population std), ``adv/abs_max`` over completions with ``sample_mask`` True.
  Pure torch, no host sync: the trainer reads them in its one ``.item()`` sweep.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from steadyrl.ops.masking import masked_count, masked_fill_zero, masked_mean, masked_sum, masked_var
from steadyrl.types import AdvantageResult, Metrics


class _Groups(NamedTuple):
    rewards: Tensor  # (P, G) NaN where missing
    valid: Tensor  # (P, G) bool
    count: Tensor  # (P, 1) number of valid members
    mean: Tensor  # (P, 1) mean over valid members, 0 for an empty group
    zero_std: Tensor  # (P, 1) bool: fewer than 2 valid members, or all valid rewards equal


def _group(rewards: Tensor, group_size: int) -> _Groups:
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (B,), got shape {tuple(rewards.shape)}; flatten the batch first.")
    if group_size < 1 or rewards.numel() == 0 or rewards.numel() % group_size != 0:
        raise ValueError(
            f"{rewards.numel()} rewards cannot be split into groups of {group_size}: the batch must be "
            f"prompts × completions per prompt, so set the batch size to a positive multiple of the group size."
        )
    if rewards.dtype not in (torch.float32, torch.float64):
        rewards = rewards.float()  # half precision would round group statistics; ints/bools are fine as floats
    r = rewards.reshape(-1, group_size)
    valid = ~torch.isnan(r)
    count = masked_count(valid, dim=1).to(r.dtype).unsqueeze(1)
    mean = (masked_sum(r, valid, dim=1).unsqueeze(1) / count.clamp(min=1.0)).to(r.dtype)
    # Exact test for "all equal" (max == min), not std < tol: 0.1 + 0.1 + 0.1 ≠ 3 · 0.1 in floating point.
    high = torch.where(valid, r, float("-inf")).amax(dim=1, keepdim=True)
    low = torch.where(valid, r, float("inf")).amin(dim=1, keepdim=True)
    zero_std = (count <= 1) | (high == low)
    return _Groups(r, valid, count, mean, zero_std)


def _group_std(g: _Groups, unbiased: bool) -> Tensor:
    """(P, 1) std of the valid members; denominator n − 1 if ``unbiased`` else n."""
    sq = masked_sum((g.rewards - g.mean) ** 2, g.valid, dim=1).unsqueeze(1)
    denom = (g.count - 1.0) if unbiased else g.count
    return torch.sqrt(sq / denom.clamp(min=1.0))


def _advantage_metrics(advantages: Tensor, sample_mask: Tensor, g: _Groups) -> Metrics:
    kept = masked_fill_zero(advantages, sample_mask)
    return {
        "adv/zero_std_frac": g.zero_std.float().mean(),
        "reward/nan_frac": (~g.valid).float().mean(),
        "adv/mean": masked_mean(advantages, sample_mask),
        "adv/std": masked_var(advantages, sample_mask, unbiased=False).sqrt(),
        "adv/abs_max": kept.abs().max(),
    }


def _result(advantages: Tensor, g: _Groups, sample_mask: Tensor | None = None, **extra: Tensor) -> AdvantageResult:
    """Zero the no-signal groups and the missing rewards, flatten (P, G) -> (B,), attach metrics."""
    advantages = torch.where(g.valid & ~g.zero_std, advantages, torch.zeros_like(advantages)).reshape(-1)
    sample_mask = (g.valid if sample_mask is None else sample_mask).reshape(-1)
    metrics = _advantage_metrics(advantages, sample_mask, g)
    metrics.update(extra)
    return AdvantageResult(advantages, sample_mask, metrics)


def grpo_advantages(
    rewards: Tensor,  # (B,)
    group_size: int,
    *,
    eps: float = 1e-6,
    std_unbiased: bool = True,
) -> AdvantageResult:
    """GRPO outcome advantage (DeepSeekMath, arXiv 2402.03300; methods.md §6.1).

        Â_i = (R_i − mean_g R) / (std_g R + ε)

    ``std_unbiased=True`` divides the variance by (n − 1), the ``torch.std`` default that verl
    (``compute_grpo_outcome_advantage``, ε = 1e-6) and TRL (ε = 1e-4) both use; the paper does not say which.
    """
    g = _group(rewards, group_size)
    advantages = (g.rewards - g.mean) / (_group_std(g, std_unbiased) + eps)
    return _result(advantages, g)


def dr_grpo_advantages(
    rewards: Tensor,  # (B,)
    group_size: int,
) -> AdvantageResult:
    """Dr. GRPO advantage (arXiv 2503.20783; methods.md §6.2): Â_i = R_i − mean_g R, no std division.

    Dividing by the group std up-weights questions that are nearly always solved or nearly always failed
    (the "question-difficulty bias"); Dr. GRPO drops it.  Also MiniRL's advantage (methods.md §5).
    """
    g = _group(rewards, group_size)
    return _result(g.rewards - g.mean, g)


def raw_reward_advantages(
    rewards: Tensor,  # (B,)
    group_size: int,
) -> AdvantageResult:
    """No baseline: Â_i = R_i (REINFORCE; ReinCAPO's ``GRPONoBaselineTrainer``, arXiv 2510.00819, methods.md §4).

    A missing (NaN) reward gets Â = 0 and ``sample_mask`` False. Groups whose rewards are all equal keep
    their rewards (there is no baseline to cancel them); they are still counted in ``adv/zero_std_frac``.
    """
    g = _group(rewards, group_size)
    advantages = torch.where(g.valid, g.rewards, torch.zeros_like(g.rewards)).reshape(-1)
    sample_mask = g.valid.reshape(-1)
    return AdvantageResult(advantages, sample_mask, _advantage_metrics(advantages, sample_mask, g))


def rloo_advantages(
    rewards: Tensor,  # (B,)
    group_size: int,
) -> AdvantageResult:
    """REINFORCE leave-one-out (RLOO; Ahmadian et al., arXiv 2402.14740).

        Â_i = R_i − (1/(n−1)) Σ_{j≠i} R_j  =  n/(n−1) · (R_i − mean_g R)

    over the n valid members of the group: a NaN member is neither baseline nor target.  A group with a
    single valid member has no baseline and gets 0.
    """
    g = _group(rewards, group_size)
    group_sum = g.mean * g.count
    baseline = (group_sum - g.rewards) / (g.count - 1.0).clamp(min=1.0)
    return _result(g.rewards - baseline, g)


def batch_std_advantages(
    rewards: Tensor,  # (B,)
    group_size: int,
    *,
    eps: float = 1e-6,
    std_unbiased: bool = True,
    std_of: str = "rewards",
) -> AdvantageResult:
    """Group-mean baseline, batch-level scale: Â_i = (R_i − mean_g R) / (std_batch + ε).

    The "group mean, batch std" normalisation of TRL's ``scale_rewards="batch"`` and of Lite PPO
    ("Tricks or Traps", arXiv 2508.08221 [MEM]); REINFORCE++-baseline (arXiv 2501.03262) also subtracts the group
    mean and then scales by a batch statistic.  The batch std is one number for the whole batch, so easy and
    hard prompts keep their relative scale (no difficulty bias) while the step size stays normalised.

    ``std_of`` [INF] chooses what the std is taken over, across all valid completions of the batch:
    ``"rewards"`` = the raw rewards (TRL), ``"centered"`` = the group-centred rewards R − mean_g (closer to
    REINFORCE++-baseline, which whitens the centred values; there per token, here per completion).
    """
    if std_of not in ("rewards", "centered"):
        raise ValueError(f"std_of must be 'rewards' or 'centered', got {std_of!r}.")
    g = _group(rewards, group_size)
    centered = g.rewards - g.mean
    source = g.rewards if std_of == "rewards" else centered
    batch_std = masked_var(source, g.valid, unbiased=std_unbiased).sqrt()
    return _result(centered / (batch_std + eps), g)


def mc_grpo_advantages(
    rewards: Tensor,  # (B,) B = P·(G+1): pass group_size = G + 1
    group_size: int,
    *,
    mad_eps: float = 1e-3,
    zero_mad_scale: float | None = None,
    zero_atol: float = 1e-6,
    rescale_nonzero: bool = True,
) -> AdvantageResult:
    """MC-GRPO, median-centred GRPO (Kim, arXiv 2601.22582; methods.md §6.13), read from the official code
    (lotusroot-kim/MC-GRPO ``grpo_trainer_gsm.py``, ``mc`` branch).

    Each prompt gets G + 1 completions (``group_size`` is that G + 1). Over the n valid members:

        m   = median_g R                       (the lower median for an even count, like ``torch.median``)
        MAD = median_g |R − m|
        Â_i = (R_i − m) / (MAD + ε_MAD)        ε_MAD = ``mad_eps`` = 1e-3, added always, as in the code
        Â_i ← Â_i · n / #{j : |Â_j| > ``zero_atol``}   for the non-zero Â_i (``rescale_nonzero``)

    The *pivot*, the member whose reward is the median, has Â = 0 and gets ``sample_mask`` False, so G
    completions reach the loss.  When several members tie with the median, the first of them (lowest index)
    is the pivot [INF: the code takes whichever index ``torch.median`` returns]; the other tied members stay
    in the loss with Â = 0, as in the code.  The rescale counts n including the pivot, as the code does.

    MAD = 0 whenever at least half of a group shares the median reward, e.g. binary rewards with G + 1 = 3:
    the code's guard then divides by 1e-3, so |Â| = 1000 × |R − m| before the rescale.  ``zero_mad_scale``
    [INF] is our alternative: when set, a group with MAD = 0 divides by this value instead (1.0 keeps binary
    rewards at Â = ±1 before the rescale).  Adds ``adv/zero_mad_frac`` (fraction of groups with MAD = 0).
    """
    g = _group(rewards, group_size)
    median = torch.nanmedian(g.rewards, dim=1, keepdim=True).values
    deviation = g.rewards - median  # exactly 0 for members equal to the median (it is one of the rewards)
    mad = torch.nanmedian(deviation.abs(), dim=1, keepdim=True).values
    scale = mad + mad_eps
    if zero_mad_scale is not None:
        scale = torch.where(mad == 0, torch.full_like(scale, zero_mad_scale), scale)
    advantages = masked_fill_zero(deviation / scale, g.valid)

    if rescale_nonzero:
        nonzero = g.valid & (advantages.abs() > zero_atol)
        num_nonzero = nonzero.sum(dim=1, keepdim=True).to(advantages.dtype)
        advantages = torch.where(nonzero, advantages * g.count / num_nonzero.clamp(min=1.0), advantages)

    # The first member equal to the median (argmax returns the first maximal index; NaN ≠ 0). The median
    # is one of the valid rewards, so only an all-NaN group has none, and its column 0 is invalid anyway.
    pivot_index = (deviation == 0).to(torch.int32).argmax(dim=1, keepdim=True)
    pivot = torch.arange(group_size, device=pivot_index.device) == pivot_index
    return _result(advantages, g, sample_mask=g.valid & ~pivot, **{"adv/zero_mad_frac": (mad == 0).float().mean()})


def bnpo_advantages(
    rewards: Tensor,  # (B,)
    group_size: int,
    *,
    reward_min: float = 0.0,
    reward_max: float = 1.0,
    max_inverse_density: float = 1e6,
    var_floor: float | None = None,
) -> AdvantageResult:
    """BNPO, Beta-normalised policy optimisation (Xiao et al., arXiv 2506.02864; methods.md §6.14), read
    from the official ``compute_bnpo_outcome_advantage`` (changyi7231/BNPO).

    Rewards are mapped to [0, 1] by s = (R − ``reward_min``) / (``reward_max`` − ``reward_min``).  Per prompt
    the pass rate p_g = mean of its valid s; over the batch of prompts (those with ≥ 1 valid member, a
    single-member group included) a Beta distribution is fitted by moments, with the unbiased variance:

        a = (p̄(1 − p̄)/var − 1) · p̄,   b = (p̄(1 − p̄)/var − 1) · (1 − p̄)
        α = max(1, 1 + a/3),   β = max(1, 1 + b/3)
        Â_i = min(1 / f_Beta(p_g; α, β), ``max_inverse_density``) · (s_i − p_g)

    The density uses xlogy, so f at p ∈ {0, 1} is finite when the exponent is 0; where f(p) = 0 the clamp
    gives 1e6, multiplied by s − p = 0 in an all-equal group.

    Degenerate fit [INF]: with fewer than two prompts, or var = 0 (every prompt has the same pass rate),
    the moment fit does not exist; α = β = 1 is used (f ≡ 1, Â = s − p, REINFORCE with a group-mean
    baseline), which is also what the official code gives for a single prompt.  ``var_floor``, when set,
    replaces var by max(var, var_floor) instead.

    Rewards must lie in [reward_min, reward_max] (the official code asserts that p does); the fraction of
    valid rewards outside is reported as ``bnpo/reward_out_of_range_frac`` and a pass rate outside [0, 1]
    is clamped into it for the density (no host sync to raise on).  Also reports
    ``bnpo/alpha`` and ``bnpo/beta``.  The paper's "advantage decomposition" for multi-component rewards
    is not implemented here.
    """
    g = _group(rewards, group_size)
    span = reward_max - reward_min
    if span <= 0:
        raise ValueError(f"reward_max ({reward_max}) must be greater than reward_min ({reward_min}).")
    scores = (g.rewards - reward_min) / span
    pass_rate = masked_sum(scores, g.valid, dim=1).unsqueeze(1) / g.count.clamp(min=1.0)  # (P, 1)
    has_members = g.count > 0  # (P, 1)

    p_mean = masked_mean(pass_rate, has_members)
    p_var = masked_var(pass_rate, has_members, unbiased=True)  # 0 when fewer than two prompts
    if var_floor is not None:
        p_var = p_var.clamp(min=var_floor)
    degenerate = p_var <= 0
    spread = p_mean * (1 - p_mean) / torch.where(degenerate, torch.ones_like(p_var), p_var) - 1
    one = torch.ones_like(p_mean)
    alpha = torch.where(degenerate, one, (1 + spread * p_mean / 3).clamp(min=1.0))
    beta = torch.where(degenerate, one, (1 + spread * (1 - p_mean) / 3).clamp(min=1.0))

    out_of_range = (scores < 0) | (scores > 1)  # NaN compares False
    p = pass_rate.clamp(0.0, 1.0)
    log_density = (
        torch.xlogy(alpha - 1, p)
        + torch.xlogy(beta - 1, 1 - p)
        - (torch.lgamma(alpha) + torch.lgamma(beta) - torch.lgamma(alpha + beta))
    )
    inverse_density = torch.exp(-log_density).clamp(max=max_inverse_density)
    advantages = inverse_density * (scores - pass_rate)
    extra = {
        "bnpo/alpha": alpha,
        "bnpo/beta": beta,
        "bnpo/reward_out_of_range_frac": masked_mean(out_of_range.to(scores.dtype), g.valid),
    }
    return _result(advantages, g, **extra)
