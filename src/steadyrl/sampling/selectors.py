"""Prompt selectors (registry family ``prompt_selector``): which prompts a step generates for.

``uniform`` is steadyrl's behaviour before the sampling layer (a fresh seeded draw per step), optionally from
a fixed pool so that prompts recur (per-prompt history only means something when they do).  ``vade`` keeps a
Beta posterior of every pool prompt's pass rate and picks the prompts whose sampled pass rate is most
informative.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from steadyrl.ops.sampling import bernoulli_information, beta_decay, beta_update
from steadyrl.runtime.seeding import step_seed
from steadyrl.tasks import Prompt
from steadyrl.tasks.base import draw_from_pool
from steadyrl.types import Metrics

_ROUND_SALT = 200_003  # separates a step's later generation rounds from its first draw
_POOL_SALT = 5_003
_THOMPSON_SALT = 300_007


def _draw_pool(task: Any, pool_size: int, seed: int) -> list[Prompt]:
    """``pool_size`` train prompts drawn once (the run's fixed pool), duplicates by id removed."""
    unique: dict[str, Prompt] = {}
    for p in task.sample("train", pool_size, seed=step_seed(seed, 0, _POOL_SALT)):
        unique.setdefault(p.id, p)
    return list(unique.values())


class UniformSelector:
    """Uniform prompts: ``task.sample("train", n, seed=step_seed(seed, step))`` per step (steadyrl's draw before
    the sampling layer, unchanged), or with ``pool_size > 0`` a seeded draw without replacement from a fixed
    pool of that many train prompts (drawn once from the run seed), so that prompts come back.  A later
    generation round of the same step (DAPO refill) draws with another seed."""

    def __init__(self, task: Any, seed: int, pool_size: int = 0) -> None:
        if pool_size < 0:
            raise ValueError(f"pool_size must be >= 0 (0 = a fresh draw each step), got {pool_size}.")
        self.task, self.seed = task, seed
        self.pool = _draw_pool(task, pool_size, seed) if pool_size else None

    def select(self, step: int, n: int, round: int) -> list[Prompt]:
        seed = step_seed(self.seed, step) if round == 0 else step_seed(self.seed, step, _ROUND_SALT + round)
        if self.pool is None:
            return self.task.sample("train", n, seed=seed)
        return draw_from_pool(self.pool, n, seed)

    def observe(self, step: int, prompts: list[Prompt], rewards: Tensor) -> None:
        pass

    def metrics(self) -> Metrics:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class VadeSelector:
    """VADE prompt selection (Hu et al., arXiv 2511.18902; methods.md §6.21, addendum §3.2), a non-stationary
    Bernoulli bandit over a fixed pool of ``pool_size`` train prompts.

        posterior  p_i ∼ Beta(α_i, β_i),  prior Beta(α₀, β₀) = Beta(``prior_alpha``, ``prior_beta``)
        select     draw p̃_i ∼ Beta(α_i, β_i) (Thompson), take the n prompts with the largest p̃_i(1 − p̃_i)
        observe    s_i = Σ_j clip((R_ij − r_min)/(r_max − r_min), 0, 1), f_i = (#valid rewards) − s_i
                   every prompt:        (α, β) ← prior + λ_step·((α, β) − prior)       once per step
                   an observed prompt:  (α, β) ← prior + λ_seen·((α, β) − prior), then (α + s_i, β + f_i)

    p(1 − p) is the variance of a 0/1 reward, so the selection favours prompts the policy solves about half
    the time, whose groups are the least likely to be all-equal; no extra rollout is spent.  [INF] The two
    decay scales are our reading of the abstract's "two-scale prior decay" (the paper's exact rule and
    constants were not recovered; the official code is not in the store): a slow decay of every arm per step
    (``decay_step``, unvisited estimates drift back toward the prior as the policy moves on) and a fast one of
    an arm's old evidence when it gets new rollouts (``decay_seen``, recent rollouts outweigh old ones).
    ``decay_step = decay_seen = 1`` is the stationary conjugate update.  Draws use a NumPy generator seeded by
    (run seed, step, round): identical on every rank.  A later generation round of the same step takes the
    next-best prompts not yet taken.  Rewards are read as pass/fail on [``reward_min``, ``reward_max``].
    """

    def __init__(
        self,
        task: Any,
        seed: int,
        pool_size: int = 1024,
        prior_alpha: float = 1.0,
        prior_beta: float = 1.0,
        decay_step: float = 0.995,
        decay_seen: float = 0.7,
        reward_min: float = 0.0,
        reward_max: float = 1.0,
    ) -> None:
        if pool_size < 1 or prior_alpha <= 0 or prior_beta <= 0:
            raise ValueError(f"VADE needs pool_size >= 1 and positive priors, got {pool_size}, {prior_alpha}, {prior_beta}.")
        if not (0 < decay_step <= 1 and 0 <= decay_seen <= 1) or reward_max <= reward_min:
            raise ValueError("VADE needs 0 < decay_step <= 1, 0 <= decay_seen <= 1 and reward_max > reward_min.")
        self.seed, self.prior = seed, (float(prior_alpha), float(prior_beta))
        self.decay_step, self.decay_seen = decay_step, decay_seen
        self.reward_range = (reward_min, reward_max)
        self.pool = _draw_pool(task, pool_size, seed)
        self.index = {p.id: i for i, p in enumerate(self.pool)}
        self.alpha = torch.full((len(self.pool),), self.prior[0], dtype=torch.float64)
        self.beta = torch.full((len(self.pool),), self.prior[1], dtype=torch.float64)
        self.seen = torch.zeros(len(self.pool), dtype=torch.bool)
        self._taken: set[int] = set()
        self._last: dict[str, Tensor] = {}

    def select(self, step: int, n: int, round: int) -> list[Prompt]:
        if round == 0:
            self._taken = set()
        free = [i for i in range(len(self.pool)) if i not in self._taken]
        if n > len(free):
            raise ValueError(f"VADE cannot select {n} prompts from the {len(free)} left in its pool; raise pool_size.")
        rng = np.random.default_rng(step_seed(self.seed, step, _THOMPSON_SALT + round))
        draw = torch.from_numpy(rng.beta(self.alpha.numpy(), self.beta.numpy()))
        score = bernoulli_information(draw)
        values = score.tolist()
        order = sorted(free, key=lambda i: (-values[i], i))[:n]
        self._taken.update(order)
        pick = torch.tensor(order, dtype=torch.long)
        mean = self.alpha[pick] / (self.alpha[pick] + self.beta[pick])
        self._last = {"vade/selected_mean_p": mean.mean().float(), "vade/selected_info": score[pick].mean().float()}
        return [self.pool[i] for i in order]

    def observe(self, step: int, prompts: list[Prompt], rewards: Tensor) -> None:
        self.alpha, self.beta = beta_decay(self.alpha, self.beta, self.decay_step, self.prior)
        low, high = self.reward_range
        r = rewards.detach().double().cpu().reshape(len(prompts), -1)
        valid = ~torch.isnan(r)
        scaled = torch.where(valid, ((r - low) / (high - low)).clamp(0, 1), 0.0)
        for p, s, n in zip(prompts, scaled.sum(1).tolist(), valid.sum(1).tolist()):
            i = self.index.get(p.id)
            if i is None or n == 0:
                continue
            a, b = beta_decay(self.alpha[i], self.beta[i], self.decay_seen, self.prior)
            self.alpha[i], self.beta[i] = beta_update(a, b, torch.tensor(s, dtype=torch.float64), torch.tensor(n - s, dtype=torch.float64))
            self.seen[i] = True

    def metrics(self) -> Metrics:
        return {**self._last, "vade/pool_seen_frac": self.seen.float().mean()}

    def state_dict(self) -> dict[str, Any]:
        return {"alpha": self.alpha.clone(), "beta": self.beta.clone(), "seen": self.seen.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "alpha" in state:
            self.alpha, self.beta = state["alpha"].clone().double(), state["beta"].clone().double()
            self.seen = state["seen"].clone()
