"""steadyrl's advantage estimators as verl estimators: ``algorithm.adv_estimator=steadyrl/<name>``.

verl calls a registered estimator on the driver as

    fn(token_level_rewards=(B, T), response_mask=(B, T), config=algorithm config, index=uid array, ...)
       -> (advantages (B, T), returns (B, T))

The outcome reward of completion i is Σ_t token_level_rewards[i, t]. steadyrl's estimators take contiguous
groups of equal size, so the completions are gathered by ``index`` (verl's prompt uid; the batch may have been
reordered for load balance), the estimator runs on the grouped rewards, and the result is put back in verl's
order and broadcast over the response tokens. Hyper-parameters by steadyrl's names come from
``algorithm.steadyrl_kwargs`` (``+algorithm.steadyrl_kwargs.eps=1e-6`` on the command line). A completion the
estimator leaves out (sample_mask False: NaN reward, MC-GRPO's pivot) gets advantage 0.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from verl.trainer.ppo import core_algos

from steadyrl import registry
from steadyrl.config import ConfigError, MethodSpec
from steadyrl.integrations.verl import LOSS_PREFIX


def group_order(index: Any, batch_size: int) -> tuple[torch.Tensor, int]:
    """(permutation putting each uid's completions next to each other, in first-seen order; group size)."""
    if index is None:
        raise ConfigError("steadyrl advantage estimators need verl's prompt uid (index) to form groups.")
    groups: dict[Any, list[int]] = {}
    for i, uid in enumerate(np.asarray(index, dtype=object).tolist()):
        groups.setdefault(uid, []).append(i)
    sizes = {len(members) for members in groups.values()}
    if len(sizes) != 1 or sum(len(m) for m in groups.values()) != batch_size:
        raise ConfigError(
            f"steadyrl advantage estimators need every prompt to have the same number of completions; got group "
            f"sizes {sorted(sizes)} (use rollout.n completions per prompt and no group filtering that splits groups)."
        )
    order = torch.tensor([i for members in groups.values() for i in members], dtype=torch.long)
    return order, sizes.pop()


def _kwargs(config: Any) -> dict[str, Any]:
    if config is None:
        return {}
    raw = config.get("steadyrl_kwargs", None) if hasattr(config, "get") else getattr(config, "steadyrl_kwargs", None)
    if raw is None:
        return {}
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(raw):
            return OmegaConf.to_container(raw, resolve=True)
    except ImportError:
        pass
    return dict(raw)


def make_advantage(name: str):
    """The verl advantage estimator for steadyrl's estimator ``name``."""

    def steadyrl_advantage(
        token_level_rewards: torch.Tensor,
        response_mask: torch.Tensor,
        index: Any = None,
        config: Any = None,
        **unused: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        fn = registry.resolve("advantage", MethodSpec(name, _kwargs(config)))
        rewards = token_level_rewards.sum(dim=-1)
        order, group_size = group_order(index, rewards.shape[0])
        order = order.to(rewards.device)
        with torch.no_grad():
            result = fn(rewards[order], group_size)
            grouped = torch.where(result.sample_mask.view(-1, *([1] * (result.advantages.dim() - 1))),
                                  result.advantages, torch.zeros_like(result.advantages))
            advantages = torch.empty_like(grouped)
            advantages[order] = grouped
            if advantages.dim() == 1:
                advantages = advantages.unsqueeze(-1)
            advantages = advantages.to(token_level_rewards.dtype) * response_mask
        return advantages, advantages

    steadyrl_advantage.__qualname__ = steadyrl_advantage.__name__ = f"steadyrl_{name}"
    steadyrl_advantage.steadyrl_name = name
    return steadyrl_advantage


def refuse_advantage(name: str, reason: str):
    """What ``steadyrl/<name>`` resolves to for an estimator verl cannot carry: a ConfigError naming why."""

    def not_carried(**unused: Any):
        raise ConfigError(f"algorithm.adv_estimator={LOSS_PREFIX}{name} is not carried by verl: {reason}.")

    not_carried.__qualname__ = not_carried.__name__ = f"steadyrl_{name}"
    not_carried.steadyrl_name = name
    return not_carried


def register_advantages() -> list[str]:
    """Register every steadyrl advantage estimator (all are stateless); returns the verl names of those carried.
    One that reads π_old's statistics (registry fact ``reads_old_statistics``) is registered as a refusal that
    names verl's own estimator: verl passes those statistics to its own estimator names only."""
    from steadyrl.integrations.status import VERL_OLD_STATISTICS

    names = []
    for name, entry in registry.FAMILIES["advantage"].table.items():
        verl_name = LOSS_PREFIX + name
        existing = core_algos.ADV_ESTIMATOR_REGISTRY.get(verl_name)
        if existing is not None and getattr(existing, "steadyrl_name", None) == name:
            del core_algos.ADV_ESTIMATOR_REGISTRY[verl_name]  # our own earlier registration (a re-install)
        if entry.reads_old_statistics:
            core_algos.register_adv_est(verl_name)(refuse_advantage(name, VERL_OLD_STATISTICS))
            continue
        core_algos.register_adv_est(verl_name)(make_advantage(name))
        names.append(verl_name)
    return names
