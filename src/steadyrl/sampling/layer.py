"""The sampling layer: the part of the collect stage between "which prompts" and "advantages".

    prompts   = selector.select(step)                                   (uniform | vade)
    rows      = generate(prompts) → task reward → reward shapers          (overlong_penalty | majority_vote)
              → augmenters (replay / hinted regeneration of dead groups)  (r3_replay | sage_hints)
              → filters (drop rows or groups; DAPO refills in more rounds) (dynamic_sampling | iqr_entropy)
    advantage = sampling.advantage(context) or the advantage function      (dcpo | riskpo | adora | copo)
    state     ← this step's rewards (prompt store, selector posterior, trajectory store, quantile tracker)

``RolloutCollector.collect`` runs it; with the defaults (uniform, nothing else) it draws, generates and
scores exactly what the collector did before the layer existed.  Its state is in ``Trainer.training_state()``:
a checkpoint and a guard rollback restore it with the model.  A rollback rewinds it too, on purpose: the
posteriors, histories and stored trajectories describe the policy that was rolled back to, not the collapsing
one; the draws themselves are seeded by the step number, so nothing random is replayed twice.

Distributed: with a filter that refills or an augmenter, every rank holds every row (gathered after each
generation) and takes the same decisions; the final batch is split evenly across ranks.  Otherwise each rank
keeps its own rows (as before) and only the per-row numbers the advantage needs are gathered.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from steadyrl.config import ConfigError, TrainConfig
from steadyrl.ops.sampling import zero_variance_groups
from steadyrl.rollout.text import decode_completions, eos_ids
from steadyrl.runtime.distributed import DistInfo
from steadyrl.sampling.base import AdvantageContext, extract_answer
from steadyrl.sampling.groups import (
    POLICY,
    Groups,
    empty_rollout,
    gather_objects,
    gather_rollout,
    gather_tensor,
    share,
)
from steadyrl.sampling.store import PromptStore
from steadyrl.tasks import Prompt, score_batch
from steadyrl.types import AdvantageResult, Metrics, RolloutBatch

Generate = Callable[..., RolloutBatch]
"""``generate(row_prompts, step, salt, backend=None) -> RolloutBatch`` on this rank (the collector's)."""


class SamplingLayer:
    def __init__(self, selector, filters=(), augmenters=(), shapers=(), advantage=None, *, task, tokenizer,
                 info: DistInfo, group_size: int, prompts_per_step: int, device: torch.device,
                 store_capacity: int = 65536) -> None:
        self.selector, self.filters, self.augmenters = selector, list(filters), list(augmenters)
        self.shapers, self.advantage = list(shapers), advantage
        self.task, self.tokenizer, self.info, self.device = task, tokenizer, info, device
        self.group_size, self.prompts_per_step = group_size, prompts_per_step
        self.pad_token_id, self.eos = tokenizer.pad_token_id, eos_ids(tokenizer)
        self.global_rows = not info.enabled or any(f.refill for f in self.filters) or bool(self.augmenters)
        self.store = PromptStore(store_capacity)
        self.store_enabled = bool(getattr(advantage, "needs_store", False))
        pool = getattr(selector, "pool", None)
        if pool is not None and len(pool) < prompts_per_step:
            raise ConfigError(f"the prompt selector's pool holds {len(pool)} prompts, fewer than "
                              f"rollout.prompts_per_step={prompts_per_step}; raise its pool_size.")
        self._generate: Generate | None = None
        self._metrics: Metrics = {}

    # ------------------------------------------------------------------ what components call

    def generate_rows(self, step: int, salt: int, rows: list[Prompt], per_group: int | None = None,
                      backend: Any = None) -> tuple[RolloutBatch, list[str]]:
        """Completions for ``rows`` (global rows when the layer holds global rows, else this rank's), with the
        generation split over ranks by groups of ``per_group`` rows and gathered back; decoded."""
        per_group = per_group or self.group_size
        if self.global_rows and self.info.enabled:
            mine = share(len(rows) // per_group, self.info)
            local = rows[mine.start * per_group : mine.stop * per_group]
            out = self._generate(local, step, salt, backend) if local else empty_rollout(self.device)
            rollout = gather_rollout(out, self.info, self.pad_token_id)
            self._generated += len(rows)
        else:
            rollout = self._generate(rows, step, salt, backend)
            self._generated += len(rows) * (1 if self.global_rows else self.info.world_size)
        return rollout, self.decode(rollout.completion_ids, rollout.response_mask)

    def decode(self, ids: Tensor, mask: Tensor) -> list[str]:
        return decode_completions(self.tokenizer, ids, mask, self.eos)

    def score(self, row_prompts: list[Prompt], completions: list[str]) -> Tensor:
        return self.score_all(row_prompts, completions)[0]

    def score_all(self, row_prompts: list[Prompt], completions: list[str]) -> tuple[Tensor, Tensor | None, tuple[str, ...]]:
        """(rewards (rows,), named components (rows, K) or None, their names); the task's scoring metrics (e.g.
        reward timeouts, per-component means) join the step's."""
        scores = score_batch(self.task, row_prompts, completions)
        for name, value in scores.metrics.items():
            self._score_metrics.setdefault(name, []).append(torch.as_tensor(value, dtype=torch.float32))
        names = tuple(scores.components)
        columns = torch.stack([scores.components[n] for n in names], dim=1).to(self.device) if names else None
        return scores.rewards.to(self.device), columns, names

    def shape(self, step: int, groups: Groups) -> Groups:
        for shaper in self.shapers:
            groups = shaper.shape(step, groups, self)
        return groups

    # ------------------------------------------------------------------ the stage

    def collect(self, step: int, generate: Generate) -> Groups:
        """The step's final rows: exactly ``prompts_per_step`` groups (global rows, or this rank's share)."""
        self._generate, self._generated, self._observed, self._score_metrics = generate, 0, [], {}
        P = self.prompts_per_step
        self._selected = self.selector.select(step, P, 0)
        groups = self._round(step, 0, self._selected)
        rounds, unfilled, refill = 1, 0, [f for f in self.filters if f.refill]
        if refill:
            cap, factor = max(f.max_rounds for f in refill), max(f.oversample for f in refill)
            while (kept := len(self._kept_groups(groups))) < P and rounds < cap:
                n = math.ceil((P - kept) * factor)  # not rounded to the world size: 2 processes draw as 1
                groups = groups.concat(self._round(step, rounds, self.selector.select(step, n, rounds)), self.pad_token_id)
                rounds += 1
            groups, unfilled = self._final_groups(groups, P)
        observed = self._observed[0]
        for more in self._observed[1:]:
            observed = observed.concat(more, self.pad_token_id)
        self._observe(step, observed)
        generated_groups = torch.tensor(float(len(observed.prompts) * (1 if self.global_rows else self.info.world_size)))
        dead = zero_variance_groups(torch.where(observed.keep, observed.task_rewards, float("nan")), self.group_size)
        self._metrics = {
            "sampling/generated": torch.tensor(float(self._generated)),
            "sampling/rounds": torch.tensor(float(rounds)),
            "sampling/zero_var_generated_frac": self._global_mean(dead.float(), generated_groups),
            "sampling/kept_rows_frac": self._global_mean(groups.keep.float(), None),
            "reward/task_mean": self._global_mean(torch.nan_to_num(groups.task_rewards), None),
        }
        if refill:
            self._metrics["sampling/unfilled_groups"] = torch.tensor(float(unfilled))
        for part in (self.selector, *self.filters, *self.augmenters, *self.shapers):
            self._metrics.update(getattr(part, "metrics", dict)())
        self._metrics.update({k: torch.stack(v).mean() for k, v in self._score_metrics.items()})
        self._metrics = _on(self._metrics, self.device)
        return groups

    def _round(self, step: int, round: int, prompts: list[Prompt]) -> Groups:
        first = 0
        if not self.global_rows:  # this rank's contiguous share, as the collector always did
            mine = share(len(prompts), self.info)
            first, prompts = mine.start, prompts[mine.start : mine.stop]
        rows = [p for p in prompts for _ in range(self.group_size)]
        rollout, completions = self.generate_rows(step, round, rows)
        rewards, components, names = self.score_all(rows, completions)
        n = len(rows)
        groups = Groups(prompts, self.group_size, rollout, rows, completions, rewards, rewards.clone(),
                        torch.ones(n, dtype=torch.bool, device=self.device),
                        torch.full((n,), POLICY, dtype=torch.int8, device=self.device), first, components, names)
        groups = self.shape(step, groups)
        self._observed.append(groups)
        for augmenter in self.augmenters:
            groups = augmenter.augment(step, groups, self)
        for f in self.filters:
            groups = replace(groups, keep=groups.keep & f.keep(groups).to(groups.keep.device))
        return groups

    def _kept_groups(self, groups: Groups) -> list[int]:
        return [i for i, k in enumerate(groups.keep.reshape(-1, self.group_size).any(1).tolist()) if k]

    def _final_groups(self, groups: Groups, n: int) -> tuple[Groups, int]:
        """The first ``n`` kept groups in generation order; short of that, the earliest dropped ones (rows
        left out of the loss) complete the batch."""
        kept = self._kept_groups(groups)
        dropped = [i for i in range(groups.num_groups) if i not in set(kept)]
        chosen = kept[:n] + dropped[: max(0, n - len(kept))]
        return groups.select_groups(sorted(chosen)), max(0, n - len(kept))

    def _observe(self, step: int, observed: Groups) -> None:
        rewards = torch.where(observed.keep, observed.rewards, float("nan"))
        prompts = observed.prompts
        if not self.global_rows:
            rewards, prompts = gather_tensor(rewards, self.info), self._selected
        self.selector.observe(step, prompts, rewards)
        for augmenter in self.augmenters:
            augmenter.observe(step, observed)

    def _global_mean(self, values: Tensor, count: Tensor | None) -> Tensor:
        if not self.global_rows:
            values = gather_tensor(values, self.info)
        return values.sum() / max(values.numel(), 1) if count is None else values.sum() / count.clamp(min=1)

    def advantages(self, step: int, groups: Groups, advantage_fn: Callable[..., AdvantageResult]) -> tuple[AdvantageResult, Tensor]:
        """(advantages over the global batch, the global rewards they saw: NaN for filtered-out rows)."""
        rewards = torch.where(groups.keep, groups.rewards, float("nan"))
        lengths, prompts = groups.lengths, groups.prompts
        needs_answers = bool(getattr(self.advantage, "needs_answers", False))
        answers = [extract_answer(self.task, c) for c in groups.completions] if needs_answers else None
        if not self.global_rows:
            rewards, lengths, prompts = gather_tensor(rewards, self.info), gather_tensor(lengths, self.info), self._selected
            answers = gather_objects(answers, self.info) if needs_answers else None
        entry = getattr(advantage_fn, "entry", None)
        if self.advantage is not None:
            ctx = AdvantageContext(step, rewards, self.group_size, prompts, lengths, answers, self.store)
            result = self.advantage(ctx)
        elif getattr(entry, "reads_old_statistics", False):  # the optimal token baseline: the score stage computes it
            result = AdvantageResult(torch.zeros_like(rewards), torch.isfinite(rewards), {})
        elif getattr(entry, "reads_components", False):  # GDPO: the named rewards (B, K), missing rows NaN
            columns = groups.components if groups.components is not None else groups.rewards[:, None]
            columns = torch.where(groups.keep[:, None], columns, float("nan"))
            if not self.global_rows:
                columns = gather_tensor(columns, self.info)
            result = advantage_fn(columns, self.group_size)
        else:
            result = advantage_fn(rewards, self.group_size)
        if self.store_enabled:
            self.store.update(step, prompts, rewards, self.group_size, getattr(self.advantage, "old_scale", 1.0))
        return result._replace(metrics=_on(result.metrics, self.device)), rewards

    def metrics(self) -> Metrics:
        return dict(self._metrics)

    def rank_rows(self, groups: Groups) -> tuple[Groups, slice]:
        """This rank's groups of the step, and where their rows sit in the global batch (the advantage's)."""
        g = self.group_size
        if not self.global_rows:  # the rank's own rows already
            start = groups.first_group * g
            return groups, slice(start, start + groups.rollout.batch_size)
        if not self.info.enabled:
            return groups, slice(0, groups.rollout.batch_size)
        per = groups.num_groups // self.info.world_size
        first = self.info.rank * per
        return groups.select_groups(list(range(first, first + per))), slice(first * g, (first + per) * g)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        return {
            "selector": self.selector.state_dict(),
            "filters": [f.state_dict() for f in self.filters],
            "augmenters": [a.state_dict() for a in self.augmenters],
            "shapers": [s.state_dict() for s in self.shapers],
            "advantage": self.advantage.state_dict() if self.advantage is not None else {},
            "store": self.store.state_dict() if self.store_enabled else {},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.selector.load_state_dict(state.get("selector", {}))
        for parts, key in ((self.filters, "filters"), (self.augmenters, "augmenters"), (self.shapers, "shapers")):
            for part, s in zip(parts, state.get(key, [{}] * len(parts))):
                part.load_state_dict(s)
        if self.advantage is not None:
            self.advantage.load_state_dict(state.get("advantage", {}))
        self.store.load_state_dict(state.get("store", {}))


def _on(metrics: Metrics, device: torch.device) -> Metrics:
    """Metrics on the training device (the step's accumulator stacks them with the update's)."""
    return {k: torch.as_tensor(v).to(device) for k, v in metrics.items()}


def check_sampling(cfg: TrainConfig) -> None:
    """Names and settings of the sampling section, before anything is loaded (raises ConfigError)."""
    from steadyrl import registry

    s = cfg.sampling
    registry.check("prompt_selector", s.selector)
    for family, specs in (("group_filter", s.filters), ("group_augmenter", s.augmenters), ("reward_shaper", s.reward_shapers)):
        for spec in specs:
            registry.check(family, spec)
    if s.advantage is not None:
        registry.check("layer_advantage", s.advantage)
    if s.store_capacity < 1:
        raise ConfigError(f"sampling.store_capacity={s.store_capacity}; it must be at least 1.")
    moves = bool(s.augmenters) or any(registry.lookup("group_filter", f.name).target.refill for f in s.filters)
    if moves and cfg.routing_replay == "R3":
        raise ConfigError("routing_replay=R3 cannot be combined with sampling filters that refill or with augmenters "
                          "(recorded routing does not follow rows the layer replaces or gathers); use R2.")


def build_sampling_layer(cfg: TrainConfig, *, task: Any, tokenizer: Any, model: Any, info: DistInfo,
                         device: torch.device) -> SamplingLayer:
    """The run's sampling layer from ``cfg.sampling`` (components built through the registry)."""
    from steadyrl import registry

    s, r = cfg.sampling, cfg.rollout
    context = {"task": task, "seed": cfg.run.seed, "model": model, "tokenizer": tokenizer,
               "backend_spec": r.backend, "max_new_tokens": r.max_new_tokens}

    def build(family: str, spec: Any) -> Any:
        try:
            return registry.build(family, spec, **context)
        except ValueError as exc:  # a setting out of range: the user's to fix, reported as one line
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"sampling {family} {spec.name!r}: {exc}") from exc

    return SamplingLayer(
        build("prompt_selector", s.selector),
        [build("group_filter", spec) for spec in s.filters],
        [build("group_augmenter", spec) for spec in s.augmenters],
        [build("reward_shaper", spec) for spec in s.reward_shapers],
        build("layer_advantage", s.advantage) if s.advantage is not None else None,
        task=task, tokenizer=tokenizer, info=info, group_size=r.group_size, prompts_per_step=r.prompts_per_step,
        device=device, store_capacity=s.store_capacity,
    )


def default_layer(task: Any, tokenizer: Any, *, seed: int, info: DistInfo, group_size: int, prompts_per_step: int,
                  device: torch.device) -> SamplingLayer:
    """Uniform prompts, nothing else: the collector's behaviour without a configured layer."""
    from steadyrl.sampling.selectors import UniformSelector

    return SamplingLayer(UniformSelector(task, seed), task=task, tokenizer=tokenizer, info=info,
                         group_size=group_size, prompts_per_step=prompts_per_step, device=device)
