"""Layer advantages (registry family ``layer_advantage``, config ``sampling.advantage``): estimators that need
more than ``fn(rewards, group_size)``: per-prompt history (DCPO), a quantile tracker (RiskPO), completion
lengths (ADORA), the group's answers (COPO).  The math is in ``ops.advantages_context`` and
``ops.advantages_risk``; the state is here.  When ``sampling.advantage`` is set it replaces ``advantage``.
"""

from __future__ import annotations

from typing import Any

import torch

from steadyrl.ops.advantages_context import adora_advantages, copo_advantages, dcpo_smooth_advantages
from steadyrl.ops.advantages_risk import (
    TRACKED_LEVELS,
    bundle_paper_scores,
    nearest_level,
    quantile_tracker_init,
    quantile_tracker_step,
    riskpo_advantages,
)
from steadyrl.sampling.base import AdvantageContext, answer_entropy
from steadyrl.types import AdvantageResult


class _Stateless:
    needs_answers = False
    needs_store = False

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class DCPOAdvantage(_Stateless):
    """DCPO smooth advantage standardisation (``ops.advantages_context.dcpo_smooth_advantages``).  Reads each
    prompt's cumulative mean / std / count from the layer's ``PromptStore``, which the layer then updates with
    the same formula (``old_scale`` is the code's ``user_old_mean_ratio``).  Prompts must recur for the history
    to matter: use a selector with a pool (``uniform`` with ``pool_size``, or ``vade``)."""

    needs_store = True

    def __init__(self, old_scale: float = 1.0, normalise: bool = True) -> None:
        self.old_scale, self.normalise = old_scale, normalise

    def __call__(self, ctx: AdvantageContext) -> AdvantageResult:
        mean, std, times = ctx.store.stats(ctx.prompts, ctx.rewards.device)
        return dcpo_smooth_advantages(ctx.rewards, ctx.group_size, old_mean=mean, old_std=std, times=times,
                                      old_scale=self.old_scale, normalise=self.normalise)


class RiskPOAdvantage(_Stateless):
    """RiskPO Mixed-VaR advantage over bundles (``ops.advantages_risk.riskpo_advantages``) with the code's SGD
    quantile tracker: levels 0.05…0.95 initialised at the first step's paper-score quantiles, then one step of
    rate ``lr_q`` (0.1 in the script) per RL step on the step's paper scores, after the advantage (as in the
    code).  The tracked values used are those of the levels nearest ``quantile_down`` / ``quantile_up``.
    Every other argument is ``riskpo_advantages``'s."""

    def __init__(
        self,
        bundle_size: int = 5,
        quantile_down: float = 0.2,
        quantile_up: float = 0.9,
        lr_q: float = 0.1,
        thresholds: str = "track",
        mix: str = "lower_cvar",
        w_mix: float = 1.5,
        upper_weight: float = 1.5,
        natural_baseline: bool = True,
        normalise: bool = True,
        credit: str = "std",
        zero_std_bundle: str = "unscaled",
    ) -> None:
        self.lr_q = lr_q
        self.kwargs = dict(bundle_size=bundle_size, quantile_down=quantile_down, quantile_up=quantile_up,
                           thresholds=thresholds, mix=mix, w_mix=w_mix, upper_weight=upper_weight,
                           natural_baseline=natural_baseline, normalise=normalise, credit=credit,
                           zero_std_bundle=zero_std_bundle)
        riskpo_advantages(torch.zeros(2), 2, **self.kwargs)  # validate the settings before the first step
        self.levels = torch.tensor(TRACKED_LEVELS, dtype=torch.float32)
        self.index = (nearest_level(self.levels, quantile_down), nearest_level(self.levels, quantile_up))
        self.q: torch.Tensor | None = None

    def __call__(self, ctx: AdvantageContext) -> AdvantageResult:
        tracked = None if self.q is None else (float(self.q[self.index[0]]), float(self.q[self.index[1]]))
        result = riskpo_advantages(ctx.rewards, ctx.group_size, tracked=tracked, **self.kwargs)
        papers = bundle_paper_scores(ctx.rewards, ctx.group_size, self.kwargs["bundle_size"]).cpu()
        levels = self.levels.to(papers.dtype)
        self.q = quantile_tracker_init(papers, levels) if self.q is None else quantile_tracker_step(self.q, levels, papers, self.lr_q)
        result.metrics["riskpo/q_down"] = self.q[self.index[0]].clone()
        result.metrics["riskpo/q_up"] = self.q[self.index[1]].clone()
        return result

    def state_dict(self) -> dict[str, Any]:
        return {"q": None if self.q is None else self.q.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        q = state.get("q")
        self.q = None if q is None else q.clone()


class ADORAAdvantage(_Stateless):
    """ADORA length-advantage re-weighting (``ops.advantages_context.adora_advantages``); the layer supplies the
    completion lengths.  Stateless: the official code classifies each group anew every step."""

    def __init__(self, correct_score: float = 1.01, attenuation: float = 0.1, max_length: float = 4054.0,
                 eps: float = 1e-6) -> None:
        self.kwargs = dict(correct_score=correct_score, attenuation=attenuation, max_length=max_length, eps=eps)

    def __call__(self, ctx: AdvantageContext) -> AdvantageResult:
        return adora_advantages(ctx.rewards, ctx.group_size, lengths=ctx.lengths, **self.kwargs)


class COPOAdvantage(_Stateless):
    """COPO consistency reward and entropy blend (``ops.advantages_context.copo_advantages``); the layer
    supplies the answers, from which the group's answer entropy in bits is counted."""

    needs_answers = True

    def __init__(self, blend: str = "soft_with_zero", k: float = 5.0, b: float = 1.0, consistency_coef: bool = False,
                 eps: float = 1e-6) -> None:
        self.kwargs = dict(blend=blend, k=k, b=b, consistency_coef=consistency_coef, eps=eps)
        copo_advantages(torch.zeros(2), 2, answer_entropy=torch.zeros(1), **self.kwargs)  # validate now

    def __call__(self, ctx: AdvantageContext) -> AdvantageResult:
        entropy = answer_entropy(ctx.answers or [], ctx.group_size, ctx.rewards.device)
        return copo_advantages(ctx.rewards, ctx.group_size, answer_entropy=entropy, **self.kwargs)
