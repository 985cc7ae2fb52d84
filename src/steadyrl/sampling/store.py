"""Per-prompt state across steps: reward statistics and pass-rate history (``PromptStore``), and stored
trajectories (``TrajectoryBuffer``).  Both are bounded: the prompt seen least recently is evicted first.

Both hold plain Python numbers and lists, so a checkpoint and a guard snapshot copy them exactly, and every
rank holds the same values (they are updated from the global rewards).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor

from steadyrl.ops.advantages_context import group_mean_std, pooled_group_stats
from steadyrl.tasks import Prompt


class PromptStore:
    """For each prompt id: ``times`` (steps it took part in), DCPO's cumulative reward ``mean`` / ``std``
    (``ops.advantages_context.pooled_group_stats``), the last ``history`` pass rates (mean reward of a
    step's group) and the last step it was seen.  At most ``capacity`` prompts (least recently seen evicted)."""

    def __init__(self, capacity: int = 65536, history: int = 8) -> None:
        if capacity < 1 or history < 1:
            raise ValueError(f"PromptStore needs capacity >= 1 and history >= 1, got {capacity}, {history}.")
        self.capacity, self.history = capacity, history
        self.records: OrderedDict[str, dict[str, Any]] = OrderedDict()

    def __len__(self) -> int:
        return len(self.records)

    def stats(self, prompts: list[Prompt], device: torch.device | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(P,) stored mean, std (float32) and times (long) of each prompt; 0, 0, 0 for an unseen one."""
        recs = [self.records.get(p.id) for p in prompts]
        mean = torch.tensor([r["mean"] if r else 0.0 for r in recs], dtype=torch.float32, device=device)
        std = torch.tensor([r["std"] if r else 0.0 for r in recs], dtype=torch.float32, device=device)
        times = torch.tensor([r["times"] if r else 0 for r in recs], dtype=torch.long, device=device)
        return mean, std, times

    def pass_history(self, prompt: Prompt) -> list[float]:
        rec = self.records.get(prompt.id)
        return list(rec["passes"]) if rec else []

    def update(self, step: int, prompts: list[Prompt], rewards: Tensor, group_size: int, old_scale: float = 1.0) -> None:
        """Fold one step's groups (rewards (P·G,), NaN = missing) into the records.  Every group reads the
        records as they were before this step (a prompt drawn twice in one step: the later group wins)."""
        old_mean, old_std, times = self.stats(prompts, rewards.device)
        step_mean, step_std, count = group_mean_std(rewards, group_size)
        mean, std = pooled_group_stats(old_mean, old_std, times, step_mean, step_std, old_scale=old_scale)
        for p, m, s, t, n, pm in zip(prompts, mean.tolist(), std.tolist(), times.tolist(), count.tolist(), step_mean.tolist()):
            if n == 0:  # nothing scorable: the step tells us nothing about the prompt
                continue
            rec = self.records.pop(p.id, None) or {"passes": []}
            rec.update(times=t + 1, mean=m, std=s, last_step=step)
            rec["passes"] = (rec["passes"] + [pm])[-self.history :]
            self.records[p.id] = rec  # most recently seen last
        while len(self.records) > self.capacity:
            self.records.popitem(last=False)

    def state_dict(self) -> dict[str, Any]:
        return {"records": [(k, dict(v, passes=list(v["passes"]))) for k, v in self.records.items()]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.records = OrderedDict((k, dict(v, passes=list(v["passes"]))) for k, v in state.get("records", []))


class TrajectoryBuffer:
    """Completions kept per prompt for replay (R³): at most ``per_prompt`` per prompt (oldest dropped first)
    and ``max_prompts`` prompts (least recently updated dropped first).  A trajectory is its completion token
    ids (EOS included), the sampler's log-probs of them, whether it was truncated, its reward and its step."""

    def __init__(self, per_prompt: int = 4, max_prompts: int = 4096) -> None:
        if per_prompt < 1 or max_prompts < 1:
            raise ValueError(f"TrajectoryBuffer needs per_prompt >= 1 and max_prompts >= 1, got {per_prompt}, {max_prompts}.")
        self.per_prompt, self.max_prompts = per_prompt, max_prompts
        self.items: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()

    def __len__(self) -> int:
        return sum(len(v) for v in self.items.values())

    def add(self, prompt_id: str, trajectory: dict[str, Any]) -> None:
        kept = self.items.pop(prompt_id, [])
        kept = (kept + [trajectory])[-self.per_prompt :]
        self.items[prompt_id] = kept
        while len(self.items) > self.max_prompts:
            self.items.popitem(last=False)

    def candidates(self, prompt_id: str, exclude_reward: float) -> list[dict[str, Any]]:
        """Stored trajectories of the prompt whose reward differs from ``exclude_reward``, newest first."""
        return [t for t in reversed(self.items.get(prompt_id, [])) if t["reward"] != exclude_reward]

    def state_dict(self) -> dict[str, Any]:
        return {"items": [(k, [dict(t) for t in v]) for k, v in self.items.items()]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.items = OrderedDict((k, [dict(t) for t in v]) for k, v in state.get("items", []))
