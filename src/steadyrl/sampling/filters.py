"""Group filters (registry family ``group_filter``): rows or whole groups left out before the advantage.

``dynamic_sampling`` drops groups without reward variance and has the layer generate replacements (DAPO);
``iqr_entropy`` drops low-entropy outlier trajectories within a group (M-GRPO).  A filter returns a per-row
keep mask; the layer drops a group when none of its rows stays and refills when the filter asks for it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from steadyrl.ops.sampling import iqr_keep, sequence_nll, zero_variance_groups
from steadyrl.sampling.groups import Groups


class DynamicSampling:
    """DAPO dynamic sampling (Yu et al., arXiv 2503.14476 §3.2; methods.md §6.3; verl ``recipe/dapo``):
    keep a group only when 0 < #correct < G, i.e. its rewards are not all equal, and over-sample until the
    batch holds ``rollout.prompts_per_step`` such groups.

    Each further generation round asks the prompt selector for ⌈missing × ``oversample``⌉ prompts (the
    ranks share their generation unevenly when needed, so several processes draw as one); at most ``max_rounds`` rounds run (verl's
    ``max_num_gen_batches``).  When the cap is reached with too few groups the batch is completed with the
    earliest dropped groups, left out of the loss (``sampling/unfilled_groups`` counts them) [INF: verl stops
    with an error or trains a smaller batch; steadyrl keeps the batch shape].  The cost is reported as
    ``sampling/generated`` and ``sampling/rounds``.  ``on="task_reward"`` tests the task's reward before
    reward shaping (verl's ``filter_groups.metric: acc``); ``"reward"`` the shaped one.
    """

    refill = True

    def __init__(self, max_rounds: int = 4, oversample: float = 1.0, on: str = "task_reward") -> None:
        if max_rounds < 1 or oversample < 1.0:
            raise ValueError(f"dynamic_sampling needs max_rounds >= 1 and oversample >= 1, got {max_rounds}, {oversample}.")
        if on not in ("task_reward", "reward"):
            raise ValueError(f"on must be 'task_reward' or 'reward', got {on!r}.")
        self.max_rounds, self.oversample, self.on = max_rounds, oversample, on

    def keep(self, groups: Groups) -> Tensor:
        values = groups.task_rewards if self.on == "task_reward" else groups.rewards
        values = torch.where(groups.keep, values, float("nan"))
        dead = zero_variance_groups(values, groups.group_size)
        return (~dead).repeat_interleave(groups.group_size)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class IqrEntropyFilter:
    """M-GRPO's IQR filter (arXiv 2512.13070; methods.md §6.11): drop trajectories whose entropy lies below the
    lower fence Q1 − k·IQR of their group (``ops.sampling.iqr_keep``).

    [INF] The trajectory entropy is the mean sampled-token surprisal −log μ(y_t) (an unbiased estimate of the
    mean per-token entropy, free at rollout time; the official code for the filter was not in the stored
    repository, baibizhe/M_GRPO).  k = 1.5 (Tukey) and ``scope="group"`` are our choices.  Dropped rows leave
    the group's advantage statistics and the loss; the group itself stays."""

    refill = False

    def __init__(self, k: float = 1.5, scope: str = "group") -> None:
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}.")
        self.k, self.scope = k, scope
        iqr_keep(torch.zeros(2), 2, k=k, scope=scope)  # validates scope now, not at the first step

    def keep(self, groups: Groups) -> Tensor:
        r = groups.rollout
        entropy = sequence_nll(r.rollout_logprobs, r.response_mask)
        entropy = torch.where(groups.keep, entropy, float("nan"))
        return iqr_keep(entropy, groups.group_size, k=self.k, scope=self.scope)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
