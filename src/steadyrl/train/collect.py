"""Stage 1 of an RL step, collect: prompts → rollout → reward → advantage, as a ``ScoredBatch``.

The sampling layer (``steadyrl.sampling.layer``) decides which prompts, which groups and which rewards; this
stage generates what it asks for (prompts rendered as in eval: the chat template when the model has one) and
turns its result into the rank's batch. Every rank draws the same global
prompt list for the step (seeded by the step number) and keeps its own slice of whole groups. Rewards are
gathered from all ranks so that advantages, including estimators with batch-level statistics (batch std,
BNPO), are computed on the global batch exactly as on one process.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from steadyrl.models.chat import PromptRenderer
from steadyrl.ops.masking import masked_fill_zero, masked_var
from steadyrl.rollout.base import RolloutBackend, SamplingParams
from steadyrl.rollout.text import encode_prompts
from steadyrl.runtime.distributed import DistInfo
from steadyrl.runtime.seeding import step_seed
from steadyrl.sampling.layer import SamplingLayer, default_layer
from steadyrl.tasks import Prompt, Task
from steadyrl.train.batch import ScoredBatch

_SALT_STRIDE = 100_003  # separates the generator seeds of a step's generation calls (rounds, hints, momentum)


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
        layer: SamplingLayer | None = None,
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
        self.layer = layer if layer is not None else default_layer(
            task, tokenizer, seed=seed, info=info, group_size=group_size, prompts_per_step=prompts_per_step, device=device
        )
        self.renderer = renderer
        self._rollout_s = 0.0

    def generate(self, prompts: list[Prompt], step: int, salt: int = 0, backend: RolloutBackend | None = None):
        """Completions of ``prompts`` (one row each) on this rank; the layer's generation callback. The
        generator is seeded by (run seed, step, rank, salt): salt 0 is the step's first draw."""
        prompt_ids, prompt_mask = encode_prompts(self.tokenizer, prompts, self.device, self.renderer)
        seed = step_seed(self.seed, step, 1 + self.info.rank + _SALT_STRIDE * salt)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        start = time.perf_counter()
        rollout = (backend or self.backend).generate(prompt_ids, prompt_mask, self.params, generator=generator)
        self._rollout_s += time.perf_counter() - start
        return rollout

    def collect(self, step: int) -> Collected:
        self._rollout_s = 0.0
        self.backend.sync_weights()
        groups = self.layer.collect(step, self.generate)  # selection → rollout → reward → shaping → filters
        adv, all_rewards = self.layer.advantages(step, groups, self.advantage_fn)  # global, as on one process
        groups, mine = self.layer.rank_rows(groups)
        rollout, prompts, completions = groups.rollout, groups.row_prompts, groups.completions
        advantages, sample_mask = adv.advantages[mine], adv.sample_mask[mine]
        if self.mask_truncated:
            sample_mask = sample_mask & ~rollout.truncated
        if advantages.dim() == 1:  # one advantage per completion, broadcast over its tokens
            advantages = advantages[:, None].expand_as(rollout.rollout_logprobs)
        advantages = masked_fill_zero(advantages.float(), rollout.response_mask).detach()
        batch = ScoredBatch(rollout, rewards=groups.rewards, advantages=advantages, sample_mask=sample_mask)
        metrics = {**_reward_metrics(all_rewards), **adv.metrics, **_rollout_metrics(rollout), **self.layer.metrics()}
        metrics.update(_use_metrics(adv, metrics["sampling/generated"]))
        return Collected(batch, prompts, completions, metrics, self._rollout_s, groups.named_components())


def _reward_metrics(rewards: Tensor) -> dict[str, Tensor]:
    finite = torch.isfinite(rewards)
    return {
        "reward/mean": torch.where(finite, rewards, 0.0).sum() / finite.sum().clamp(min=1),
        "reward/std": masked_var(rewards, finite).sqrt(),
    }


def _use_metrics(adv, generated: Tensor) -> dict[str, Tensor]:
    """How much of what was generated reaches the gradient: completions in the loss, and those of them with a
    non-zero advantage (global counts)."""
    trained = adv.sample_mask.float().sum()
    informative = (adv.sample_mask & (adv.advantages.reshape(adv.sample_mask.shape[0], -1) != 0).any(1)).float().sum()
    return {
        "sampling/trained": trained,
        "sampling/informative_frac": informative / trained.clamp(min=1),
        "sampling/generated_per_informative": generated / informative.clamp(min=1),
    }


def _rollout_metrics(rollout) -> dict[str, Tensor]:
    lengths = rollout.response_mask.sum(1).float()
    return {
        "rollout/len_mean": lengths.mean(),
        "rollout/len_max": lengths.max(),
        "rollout/truncated_frac": rollout.truncated.float().mean(),
    }
