"""Stage 1 of an RL step, collect: prompts → rollout → reward → advantage, as a ``ScoredBatch``.

Every rank draws the same global prompt list for the step (seeded by the step number) and keeps its own slice
of whole groups. Rewards are gathered from all ranks so that advantages, including estimators with
batch-level statistics (batch std, BNPO), are computed on the global batch exactly as on one process.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from steadyrl.models.chat import PromptRenderer
from steadyrl.ops.masking import masked_fill_zero, masked_var
from steadyrl.rollout.base import RolloutBackend, SamplingParams
from steadyrl.rollout.text import decode_completions, encode_prompts, eos_ids
from steadyrl.runtime.distributed import DistInfo
from steadyrl.runtime.seeding import step_seed
from steadyrl.tasks import Prompt, Task, score_batch
from steadyrl.train.batch import ScoredBatch


def gather_rewards(local: Tensor, info: DistInfo) -> Tensor:
    if not info.enabled:
        return local
    parts = [torch.empty_like(local) for _ in range(info.world_size)]
    dist.all_gather(parts, local)
    return torch.cat(parts)


@dataclass
class Collected:
    batch: ScoredBatch
    prompts: list[Prompt]
    completions: list[str]
    metrics: dict[str, Tensor]  # per-rank tensors, token-/sample-weighted means
    rollout_s: float
    reward_components: dict[str, Tensor] = field(default_factory=dict)  # name -> (B_local,) of multi-reward tasks


class RolloutCollector:
    def __init__(
        self,
        backend: RolloutBackend,
        tokenizer,
        task: Task,
        advantage_fn,
        *,
        params: SamplingParams,
        prompts_per_step: int,
        group_size: int,
        info: DistInfo,
        seed: int,
        device: torch.device,
        mask_truncated: bool = False,
        renderer: PromptRenderer | None = None,
    ) -> None:
        self.backend = backend
        self.tokenizer = tokenizer
        self.task = task
        self.advantage_fn = advantage_fn
        self.params = params
        self.prompts_per_step = prompts_per_step
        self.group_size = group_size
        self.info = info
        self.seed = seed
        self.device = device
        self.mask_truncated = mask_truncated
        self.eos_ids = eos_ids(tokenizer)
        self.renderer = renderer

    def local_prompts(self, step: int) -> list[Prompt]:
        prompts = self.task.sample("train", self.prompts_per_step, seed=step_seed(self.seed, step))
        per_rank = self.prompts_per_step // self.info.world_size
        return prompts[self.info.rank * per_rank : (self.info.rank + 1) * per_rank]

    def collect(self, step: int) -> Collected:
        prompts = [p for p in self.local_prompts(step) for _ in range(self.group_size)]  # G copies, contiguous
        prompt_ids, prompt_mask = encode_prompts(self.tokenizer, prompts, self.device, self.renderer)
        generator = torch.Generator(device=self.device).manual_seed(step_seed(self.seed, step, 1 + self.info.rank))
        start = time.perf_counter()
        self.backend.sync_weights()
        rollout = self.backend.generate(prompt_ids, prompt_mask, self.params, generator=generator)
        rollout_s = time.perf_counter() - start
        completions = decode_completions(self.tokenizer, rollout.completion_ids, rollout.response_mask, self.eos_ids)
        scores = score_batch(self.task, prompts, completions)  # rewards, named parts, scoring metrics
        rewards = scores.rewards.to(self.device)  # (B,) NaN = unscorable
        all_rewards = gather_rewards(rewards, self.info)  # estimators see the global batch, as on one process
        adv = self.advantage_fn(all_rewards, self.group_size)
        mine = slice(self.info.rank * len(prompts), (self.info.rank + 1) * len(prompts))
        advantages, sample_mask = adv.advantages[mine], adv.sample_mask[mine]
        if self.mask_truncated:
            sample_mask = sample_mask & ~rollout.truncated
        if advantages.dim() == 1:  # one advantage per completion, broadcast over its tokens
            advantages = advantages[:, None].expand_as(rollout.rollout_logprobs)
        advantages = masked_fill_zero(advantages.float(), rollout.response_mask).detach()
        batch = ScoredBatch(rollout, rewards=rewards, advantages=advantages, sample_mask=sample_mask)
        metrics = {**_reward_metrics(all_rewards), **adv.metrics, **_rollout_metrics(rollout)}
        metrics.update({name: value.to(self.device) for name, value in scores.metrics.items()})
        components = {name: value.to(self.device) for name, value in scores.components.items()}
        return Collected(batch, prompts, completions, metrics, rollout_s, components)


def _reward_metrics(rewards: Tensor) -> dict[str, Tensor]:
    finite = torch.isfinite(rewards)
    return {
        "reward/mean": torch.where(finite, rewards, 0.0).sum() / finite.sum().clamp(min=1),
        "reward/std": masked_var(rewards, finite).sqrt(),
    }


def _rollout_metrics(rollout) -> dict[str, Tensor]:
    lengths = rollout.response_mask.sum(1).float()
    return {
        "rollout/len_mean": lengths.mean(),
        "rollout/len_max": lengths.max(),
        "rollout/truncated_frac": rollout.truncated.float().mean(),
    }
