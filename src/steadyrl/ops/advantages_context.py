"""Advantage estimators that read more than one step's rewards: per-prompt history (DCPO), a tracked batch
quantile (RiskPO), response lengths (ADORA) or the group's answers (COPO).

Pure math; the state (DCPO's per-prompt statistics, RiskPO's quantile tracker) lives in the sampling layer
(``steadyrl.sampling.advantages``), which passes it in and stores what comes back.  Same conventions as
``ops/advantages.py``: rewards (B,) with B = P·G and groups contiguous, NaN = missing (left out of every
statistic, advantage 0, ``sample_mask`` False), groups whose valid rewards are all equal flagged ``zero_std``.
Per-group inputs are (P,).
"""

from __future__ import annotations

import torch
from torch import Tensor

from steadyrl.ops.advantages import _advantage_metrics, _group, _group_std
from steadyrl.ops.masking import masked_fill_zero, masked_mean
from steadyrl.types import AdvantageResult


def group_mean_std(rewards: Tensor, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """(P,) mean and unbiased std (``torch.std``) over each group's valid rewards, and the valid count.

    A group with fewer than two valid members has std 0 (its mean is 0 when it has none)."""
    g = _group(rewards, group_size)
    std = torch.where(g.count > 1, _group_std(g, unbiased=True), torch.zeros_like(g.mean))
    return g.mean.squeeze(1), std.squeeze(1), g.count.squeeze(1)


def pooled_group_stats(
    old_mean: Tensor, old_std: Tensor, times: Tensor, new_mean: Tensor, new_std: Tensor, *, old_scale: float = 1.0
) -> tuple[Tensor, Tensor]:
    """DCPO's cumulative per-prompt statistics after one more step (official ``get_mean_std``), all (P,):

        n = times (steps the prompt was seen before),  i = n + 1,  m̃ = c·m_old,  s̃ = c·s_old
        n = 0:  μ_total = m_new,  σ_total = s_new
        n > 0:  μ_total = (n·m̃ + m_new) / i
                σ²_total = (n·s̃² + s_new² + (n/i)·(m_new − m̃)²) / i

    i.e. the per-step means weighted equally and the pooled variance of i equal-weight steps.  ``old_scale``
    is c, the official ``user_old_mean_ratio`` (1.0 there), which scales the stored mean and std.
    """
    n = times.to(new_mean.dtype)
    i = n + 1.0
    m_old, s_old = old_scale * old_mean, old_scale * old_std
    mean = (n * m_old + new_mean) / i
    var = (n * s_old**2 + new_std**2 + n / i * (new_mean - m_old) ** 2) / i
    first = n == 0
    return torch.where(first, new_mean, mean), torch.where(first, new_std, var.clamp(min=0.0).sqrt())


def dcpo_smooth_advantages(
    rewards: Tensor,  # (B,)
    group_size: int,
    *,
    old_mean: Tensor,  # (P,) cumulative mean of the prompt's earlier steps (any value where times = 0)
    old_std: Tensor,  # (P,)
    times: Tensor,  # (P,) earlier steps the prompt took part in
    old_scale: float = 1.0,
    normalise: bool = True,
) -> AdvantageResult:
    """DCPO smooth advantage standardisation (Yang et al., arXiv 2509.02333 §4.2; official lime-RL/DCPO
    ``compute_dcpo_outcome_advantage``; methods.md §6.20, addendum §3.2).

        A_new   = (R − μ_step) / σ_step             (0 when σ_step = 0)
        A_total = (R − μ_total) / σ_total           (μ_total, σ_total from ``pooled_group_stats``, this step
                                                     included; 0 when σ_total = 0)
        i = times + 1
        SA_new   = ((i−1)/i)·A_new + (1/i)·A_total
        SA_total = (1/i)·A_new + ((i−1)/i)·A_total
        Â = SA_new if |SA_new| < |SA_total| else SA_total

    σ is ``torch.std`` (n − 1); no ε, as in the code (division only where σ > 0).  On a prompt's first step
    i = 1 and Â = A_new; a later step whose rewards are all equal still gets (1/i)·A_total ≠ 0 when the prompt
    had different rewards before: that is the method.  ``normalise=False`` drops both divisions (the code's
    ``norm_adv_by_std_in_grpo=False``).  Metrics: the shared ones plus ``dcpo/revisit_frac`` (groups with
    times > 0) and ``dcpo/nonzero_adv_frac`` (valid completions with Â ≠ 0).
    """
    g = _group(rewards, group_size)
    step_mean, step_std, _ = group_mean_std(rewards, group_size)
    total_mean, total_std = pooled_group_stats(old_mean, old_std, times, step_mean, step_std, old_scale=old_scale)
    r = g.rewards

    def standardise(mean: Tensor, std: Tensor) -> Tensor:
        centred = r - mean[:, None]
        if not normalise:
            return centred
        return torch.where(std[:, None] > 0, centred / torch.where(std > 0, std, 1.0)[:, None], 0.0)

    a_new, a_total = standardise(step_mean, step_std), standardise(total_mean, total_std)
    i = (times.to(r.dtype) + 1.0)[:, None]
    sa_new = (i - 1) / i * a_new + a_total / i
    sa_total = a_new / i + (i - 1) / i * a_total
    advantages = masked_fill_zero(torch.where(sa_new.abs() < sa_total.abs(), sa_new, sa_total), g.valid)
    advantages, sample_mask = advantages.reshape(-1), g.valid.reshape(-1)
    metrics = _advantage_metrics(advantages, sample_mask, g)
    metrics["dcpo/revisit_frac"] = (times > 0).float().mean()
    metrics["dcpo/nonzero_adv_frac"] = ((advantages != 0) & sample_mask).float().sum() / sample_mask.sum().clamp(min=1)
    return AdvantageResult(advantages, sample_mask, metrics)


def adora_advantages(
    rewards: Tensor,  # (B,)
    group_size: int,
    *,
    lengths: Tensor,  # (B,) response lengths in tokens
    correct_score: float = 1.01,
    attenuation: float = 0.1,
    max_length: float = 4054.0,
    eps: float = 1e-6,
) -> AdvantageResult:
    """ADORA for LLMs (Ren/Gui et al., arXiv 2602.10019; official ShadeCloak/ADORA
    ``compute_grpo_outcome_advantage_ADORA``): GRPO advantages, attenuated in groups without a length advantage.

        pos = {i : R_i > correct_score},  neg = {i : R_i ≤ correct_score and |y_i| < max_length}
        length_advantage(g) = max_{pos} |y| > mean_{neg} |y|     (max over ∅ and mean over ∅ are −∞)
        Â_i = (R_i − mean_g) / (std_g + ε)  × (1 if length_advantage(g) else λ)

    A group is "temporarily advantageous" when its longest correct answer is longer than its average wrong
    one (longer reasoning pays); the other groups are damped by λ = ``attenuation`` (0.1 in the code and its
    script).  ``correct_score`` = 1.01 is the code's default for its Logic-RL reward scale (a correct answer
    scores > 1); for a 0/1 reward pass e.g. 0.5.  ``max_length`` excludes truncated wrong answers (the script
    uses 3900 of a 4096-token budget).  std is ``torch.std`` (n − 1).  Adds ``adora/advantaged_frac``.
    """
    g = _group(rewards, group_size)
    lengths = lengths.to(g.rewards.dtype).reshape(-1, group_size)
    pos = g.valid & (g.rewards > correct_score)
    neg = g.valid & (g.rewards <= correct_score) & (lengths < max_length)
    neg_inf = torch.full_like(lengths, float("-inf"))
    max_pos = torch.where(pos, lengths, neg_inf).amax(dim=1)
    mean_neg = torch.where(neg.any(1), torch.where(neg, lengths, 0.0).sum(1) / neg.sum(1).clamp(min=1), float("-inf"))
    advantaged = max_pos > mean_neg  # (P,)
    base = (g.rewards - g.mean) / (_group_std(g, unbiased=True) + eps)
    scaled = base * torch.where(advantaged, 1.0, attenuation)[:, None]
    advantages = torch.where(g.valid & ~g.zero_std, scaled, 0.0).reshape(-1)
    sample_mask = g.valid.reshape(-1)
    metrics = _advantage_metrics(advantages, sample_mask, g)
    metrics["adora/advantaged_frac"] = advantaged.float().mean()
    return AdvantageResult(advantages, sample_mask, metrics)


COPO_BLENDS = ("soft_with_zero", "only_soft", "soft_with_forced", "only_forced", "only_zero", "only_global", "no_global")


def copo_advantages(
    rewards: Tensor,  # (B,)
    group_size: int,
    *,
    answer_entropy: Tensor,  # (P,) entropy in bits of the group's answer distribution
    blend: str = "soft_with_zero",
    k: float = 5.0,
    b: float = 1.0,
    consistency_coef: bool = False,
    eps: float = 1e-6,
) -> AdvantageResult:
    """COPO, consistency-aware policy optimisation (Han et al., arXiv 2508.04138; official hijih/copo-code
    ``compute_grpo_outcome_advantage_with_global`` and ``compute_policy_loss_with_global``, script
    ``run_copo.sh``).

        local:   Â_loc,i = (R_i − mean_g) / (std_g + ε)                     (GRPO, std n − 1)
        global:  R_glob,g = mean_g R · (1 − λ·H_g if consistency_coef else 1),  λ = (1 − 1/G)/log₂ G
                 Â_glob,g = (R_glob,g − mean_P R_glob) / (std_P R_glob + ε)  (over the batch's prompts)
        weight:  w = σ(k·(H_g − b)),  H_g = entropy (bits) of the answers in group g
        Â_i = (1 − w_i)·Â_glob,g + w_i·Â_loc,i

    ``blend`` chooses w_i as the code's ``global_flg``: soft_with_zero (the script's: w·[R_i ≠ 0]), only_soft (w),
    soft_with_forced (w·[Â_loc,i ≠ 0]), only_forced ([Â_loc,i ≠ 0]), only_zero ([R_i ≠ 0]), only_global (0),
    no_global (1).  k = 5, b = 1, consistency_coef off are the script's.  A consistent group (H = 0, all
    answers equal) has Â_loc = 0 but still moves with the global advantage, which is the point.

    [INF] The code blends the two *clipped PPO losses* (same ratio, the two advantages); steadyrl blends the
    advantages and hands one to the loss.  The two agree whenever the ratio is inside the clip range (always
    for the first update on a fresh batch, r = 1); they differ only for tokens whose ratio is clipped and whose
    local and global advantages have opposite signs.  Adds ``copo/weight_mean``, ``copo/global_adv_abs_mean``.
    """
    if blend not in COPO_BLENDS:
        raise ValueError(f"blend must be one of {', '.join(COPO_BLENDS)}, got {blend!r}.")
    g = _group(rewards, group_size)
    local = torch.where(g.valid & ~g.zero_std, (g.rewards - g.mean) / (_group_std(g, unbiased=True) + eps), 0.0)
    entropy = answer_entropy.to(g.rewards.dtype)
    pass_rate = g.mean.squeeze(1)
    if consistency_coef and group_size > 1:
        lam = (1 - 1 / group_size) / torch.log2(torch.tensor(float(group_size), dtype=entropy.dtype))
        pass_rate = pass_rate * (1 - lam * entropy)
    has = g.count.squeeze(1) > 0
    n_prompts = has.sum().clamp(min=1)
    glob_mean = torch.where(has, pass_rate, 0.0).sum() / n_prompts
    glob_var = torch.where(has, (pass_rate - glob_mean) ** 2, 0.0).sum() / (n_prompts - 1).clamp(min=1)
    global_adv = ((pass_rate - glob_mean) / (glob_var.sqrt() + eps))[:, None].expand_as(local)
    soft = torch.sigmoid(k * (entropy - b))[:, None].expand_as(local)
    nonzero_reward, nonzero_local = (g.rewards != 0) & g.valid, local != 0
    weight = {
        "soft_with_zero": soft * nonzero_reward,
        "only_soft": soft,
        "soft_with_forced": soft * nonzero_local,
        "only_forced": nonzero_local.to(local.dtype),
        "only_zero": nonzero_reward.to(local.dtype),
        "only_global": torch.zeros_like(local),
        "no_global": torch.ones_like(local),
    }[blend]
    advantages = masked_fill_zero((1 - weight) * global_adv + weight * local, g.valid).reshape(-1)
    sample_mask = g.valid.reshape(-1)
    metrics = _advantage_metrics(advantages, sample_mask, g)
    metrics["copo/weight_mean"] = masked_mean(weight, g.valid)
    metrics["copo/global_adv_abs_mean"] = global_adv[:, 0].abs().mean()
    return AdvantageResult(advantages, sample_mask, metrics)
