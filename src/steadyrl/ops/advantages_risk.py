"""RiskPO's Mixed-VaR advantage over question bundles, and the SGD quantile tracker that feeds it
(Ren et al., arXiv 2510.00911; official RTkenny/RiskPO ``core_algos.compute_grpo_bundle_rvar_outcome_advantage_
quantile_tracking`` and the tracker in ``ray_trainer.fit``; script ``run_qwen2.5_1.5b_MVaR_math.sh``).

Pure math; the tracker's state lives in ``steadyrl.sampling.advantages.RiskPOAdvantage``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from steadyrl.ops.advantages import _advantage_metrics, _group
from steadyrl.types import AdvantageResult

TRACKED_LEVELS = tuple(round(0.05 * k, 2) for k in range(1, 20))
"""The code's tracked quantile levels α = 0.05, 0.10, …, 0.95."""

CREDITS = ("uniform", "std", "score", "sum_mean")
THRESHOLDS = ("track", "batch", "mix")
MIXES = ("lower_cvar", "upper_cvar", "none")
ZERO_STD = ("unscaled", "zero", "epsilon")


def bundle_paper_scores(rewards: Tensor, group_size: int, bundle_size: int) -> Tensor:
    """(num_bundles, G) paper scores S_{b,j} = Σ_{q ∈ bundle b} R_{q,j}.

    A bundle is ``bundle_size`` consecutive prompts (the last one may be smaller); paper j takes the j-th
    completion of each of its questions.  A missing (NaN) reward counts 0 [INF: the code has none]."""
    r = torch.nan_to_num(_group(rewards, group_size).rewards, nan=0.0)
    return torch.stack([chunk.sum(0) for chunk in r.split(bundle_size)])


def quantile_tracker_init(samples: Tensor, levels: Tensor) -> Tensor:
    """The tracker's first value: the empirical quantiles (``torch.quantile``, linear) of the paper scores."""
    return torch.quantile(samples.reshape(-1).to(levels.dtype), levels)


def quantile_tracker_step(q: Tensor, levels: Tensor, samples: Tensor, lr: float) -> Tensor:
    """One SGD step of the quantile (pinball) loss:  q_α ← q_α + lr·(α − F̂(q_α)),  F̂(x) = mean_j [S_j < x].

    The code sets ``q.grad = −(α − mean(S < q))`` and steps SGD with ``lr_q`` (0.1 in the script)."""
    below = (samples.reshape(1, -1).to(q.dtype) < q[:, None]).to(q.dtype).mean(dim=1)
    return q + lr * (levels - below)


def nearest_level(levels: Tensor, alpha: float) -> int:
    """Index of the tracked level closest to ``alpha`` (the code's argmin)."""
    return int((levels - alpha).abs().argmin())


def riskpo_advantages(
    rewards: Tensor,  # (B,)
    group_size: int,
    *,
    bundle_size: int = 5,
    quantile_down: float = 0.2,
    quantile_up: float = 0.9,
    tracked: tuple[float, float] | None = None,
    thresholds: str = "track",
    mix: str = "lower_cvar",
    w_mix: float = 1.5,
    upper_weight: float = 1.5,
    natural_baseline: bool = True,
    normalise: bool = True,
    credit: str = "std",
    baseline: tuple[float, float] = (0.0, 0.0),
    zero_std_bundle: str = "unscaled",
    eps: float = 1e-6,
) -> AdvantageResult:
    """RiskPO Mixed-VaR advantage.  Per bundle b with paper scores S_j (``bundle_paper_scores``):

        thresholds a ≤ b'   track: the tracked quantiles (``tracked``, levels ``quantile_down``/``_up``), the
                                   bundle's own quantiles until the tracker exists; batch: the bundle's
                                   ``torch.quantile(S, α)``; mix: the mean of the two
        RVaR_j = (S_j − a)⁺ − (S_j − b')⁺ + (a − b')  [the last term only with ``natural_baseline``]
                 − ḡ_RVaR [``baseline``, the code's use_mean_as_baseline], then / (α_up − α_down + ε)
        lower_cvar: CVaR_j = (−(a − S_j)⁺ − ḡ_CVaR) / (α_down + ε),   A_j = (w·CVaR_j + RVaR_j)/(w + 1)
        upper_cvar: U_j = (S_j − b')⁺ / (1 − α_up + ε),               A_j = (w_u·U_j + RVaR_j)/(w_u + 1)
        A_j ← A_j / (std_b(S) + ε)   with ``normalise`` (std n − 1; 1 for a one-paper bundle)

    Every completion of paper j gets A_j, split by ``credit``: uniform (A_j), std (A_j/(σ_q + ε), σ_q the
    question's reward std, 1 when ≤ 1e-3: the script's choice), score (×0.5 if R > 0 else ×1.5), sum_mean
    (A_j·(R − mean_q)/Σ_paper (R − mean_q), or A_j/|paper| when that sum is ≈ 0).  Defaults are the
    script's: α 0.2/0.9, bundles of 5, credit std, track, lower CVaR with w = 1.5, natural baseline.

    ``zero_std_bundle`` [INF]: a bundle whose papers all score the same has std 0.  The code divides by
    (0 + ε), i.e. by 1e-6 ("epsilon"), which with tracked thresholds turns a constant RVaR into ±10⁶; the
    default "unscaled" skips the std division for such a bundle, "zero" gives it advantage 0.  With
    ``thresholds="batch"`` the three agree (a = b' = S, so A = 0).  [INF] In the stored official code the
    tracked quantiles are written to a batch after its advantage was computed and that batch is discarded,
    so its advantages in fact use ``batch`` thresholds; ``track`` is what its configuration asks for.
    """
    for name, value, valid in (("thresholds", thresholds, THRESHOLDS), ("mix", mix, MIXES), ("credit", credit, CREDITS),
                               ("zero_std_bundle", zero_std_bundle, ZERO_STD)):
        if value not in valid:
            raise ValueError(f"{name} must be one of {', '.join(valid)}, got {value!r}.")
    if bundle_size < 1 or not 0 < quantile_down < quantile_up < 1:
        raise ValueError(f"need bundle_size >= 1 and 0 < quantile_down < quantile_up < 1, got {bundle_size}, "
                         f"{quantile_down}, {quantile_up}.")
    g = _group(rewards, group_size)
    r = torch.nan_to_num(g.rewards, nan=0.0)
    levels = torch.tensor([quantile_down, quantile_up], dtype=r.dtype, device=r.device)
    advantages = []
    for chunk, valid in zip(r.split(bundle_size), g.valid.split(bundle_size)):
        papers = chunk.sum(0)  # (G,)
        own = torch.quantile(papers, levels) if group_size > 1 else papers[:1].repeat(2)
        if thresholds == "batch" or tracked is None:
            low, high = own[0], own[1]
        elif thresholds == "track":
            low, high = (torch.tensor(v, dtype=r.dtype, device=r.device) for v in tracked)
        else:
            low, high = (own[0] + tracked[0]) / 2, (own[1] + tracked[1]) / 2
        rvar = (papers - low).clamp(min=0) - (papers - high).clamp(min=0)
        if natural_baseline:
            rvar = rvar + (low - high)
        adv = (rvar - baseline[0]) / (quantile_up - quantile_down + eps)
        if mix == "lower_cvar":
            cvar = (-(low - papers).clamp(min=0) - baseline[1]) / (quantile_down + eps)
            adv = (w_mix * cvar + adv) / (w_mix + 1)
        elif mix == "upper_cvar":
            upper = (papers - high).clamp(min=0) / (1 - quantile_up + eps)
            adv = (upper_weight * upper + adv) / (upper_weight + 1)
        if normalise:
            std = papers.std() if group_size > 1 else papers.new_ones(())
            scaled = adv / (std + eps)
            if zero_std_bundle != "epsilon":
                scaled = torch.where(std > 0, scaled, adv if zero_std_bundle == "unscaled" else torch.zeros_like(adv))
            adv = scaled
        advantages.append(_credit(adv, chunk, valid, credit, eps))
    out = torch.where(g.valid, torch.cat(advantages), 0.0).reshape(-1)
    sample_mask = g.valid.reshape(-1)
    return AdvantageResult(out, sample_mask, _advantage_metrics(out, sample_mask, g))


def _credit(paper_adv: Tensor, rewards: Tensor, valid: Tensor, credit: str, eps: float) -> Tensor:
    """(questions, G) advantages of the completions from the (G,) paper advantages."""
    adv = paper_adv[None, :].expand_as(rewards)
    if credit == "uniform":
        return adv
    if credit == "score":
        return adv * torch.where(rewards > 0, 0.5, 1.5)
    count = valid.sum(1, keepdim=True).clamp(min=1)
    mean = torch.where(valid, rewards, 0.0).sum(1, keepdim=True) / count
    if credit == "std":
        var = torch.where(valid, (rewards - mean) ** 2, 0.0).sum(1, keepdim=True) / (count - 1).clamp(min=1)
        std = torch.where(var.sqrt() > 1e-3, var.sqrt(), 1.0)
        return adv / (std + eps)
    share = rewards - mean  # sum_mean
    total = share.sum(0, keepdim=True)
    return torch.where(total.abs() > 1e-6, adv * share / torch.where(total.abs() > 1e-6, total, 1.0), adv / rewards.shape[0])
