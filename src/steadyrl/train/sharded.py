"""``run.parallel: fsdp`` in the trainer: the sampler's full copy, the sharded policy and reference, and the state
a checkpoint or the stability guard keeps (the FSDP mechanics are in ``runtime/fsdp.py``).

    torchrun --nproc_per_node 8 -m steadyrl.cli train recipe.yaml --set run.parallel=fsdp

Each rank still owns whole GRPO groups (``rollout.prompts_per_step / N`` prompts) and samples them itself, as
with ``ddp``; what changes is where the weights live:

* **policy**: sharded (parameters, gradients, AdamW state: 1/N each); the chunked policy forward is the root
  unit's forward method, so π_old and π_θ forwards gather each block for its forward only.
* **sampler**: rollout backends decode with full weights, so every rank keeps a full copy of the policy in
  ``rollout.sampler_dtype`` (default: the model's dtype), made before sharding and refreshed by an all-gather,
  one parameter at a time, in ``sync_weights`` (before every rollout and every evaluation).
* **reference** (``kl.reference: initial``): sharded like the policy, freed after every forward.
* **gradient combiner**: built with ``distributed=False``: FSDP's reduce-scatter has already summed each
  backward's gradient over ranks. ``sum`` adds nothing. PCGrad / fixed_alpha / PCR keep their per-block sums S
  as shards and all-reduce their partial squared norms and inner products (stabilisers/pcr.py); PCGrad and
  fixed_alpha equal the data-parallel gradient exactly, while PCR's sample j becomes micro-batch j of every
  rank together (the reduce-scatter merges the ranks' micro-batches before the combiner sees them).
* **CAPO**: reads the LM head's weight W between the policy forward and its backward, while the root unit is
  gathered, so it sees the full W (and its penalty's gradient reaches W's shards through the reduce-scatter);
  its optimizer-model moments are replicated on every rank, as with ``ddp``.
* **checkpoints**: the full model and optimizer state, gathered one tensor at a time to rank 0's CPU and written
  by rank 0 (``model.pt``: the unsharded names; ``optimizer.pt``: torch.distributed.checkpoint's full layout,
  keyed by parameter name), so a checkpoint does not depend on N; on resume every rank reads the files and keeps
  its shards. ``step-N/hf/`` is written from the same gathered state.
* **stability guard**: each rank snapshots and restores its own shards in memory (no gather).
"""

from __future__ import annotations

import copy
from dataclasses import fields, replace
from typing import Any

import torch

from steadyrl import registry
from steadyrl.config import ConfigError, MethodSpec, TrainConfig
from steadyrl.runtime.distributed import DistInfo
from steadyrl.runtime.fsdp import (
    FORWARD_METHOD,
    FullState,
    LocalShards,
    check_world,
    gather_into,
    shard_model,
)
from steadyrl.train.forward import PolicyOutput, chunked_policy_forward


def check_fsdp(cfg: TrainConfig, info: DistInfo) -> None:
    """Refuse, before any model is loaded, what ``run.parallel=fsdp`` does not support, each with its reason."""
    if cfg.run.parallel != "fsdp":
        return
    check_world(info.world_size)
    if cfg.model.lora is not None:
        raise ConfigError(
            "model.lora with run.parallel=fsdp is not supported: LoRA already leaves no gradient or optimizer state to "
            "shard, and the merged-weight sampler and adapter checkpoints assume unsharded weights; use "
            "run.parallel=ddp with LoRA."
        )
    if cfg.guard is not None and cfg.guard.checkpoint_snapshots:
        raise ConfigError(
            "guard.checkpoint_snapshots=true with run.parallel=fsdp: the guard's snapshots are each rank's own shards, "
            "which a checkpoint written by rank 0 cannot hold; set guard.checkpoint_snapshots=false (a resumed run "
            "then takes its first snapshot at the resume step)."
        )
    if cfg.routing_replay != "none":
        raise ConfigError(
            "routing_replay with run.parallel=fsdp is not supported (the replay hooks are untested on sharded MoE "
            "blocks); use run.parallel=ddp."
        )
    if any(shaper.name == "majority_vote" for shaper in cfg.sampling.reward_shapers):
        raise ConfigError(
            "sampling.reward_shapers majority_vote with run.parallel=fsdp is not supported: its momentum policy is a "
            "full copy averaged into and sampled from unsharded weights; use run.parallel=ddp."
        )


class ShardedPolicy:
    """Built by the trainer after the model (and reference) are loaded and before the optimizer: keeps a full
    sampler copy of ``model``, then shards ``model`` and ``ref_model`` in place."""

    def __init__(
        self, model: torch.nn.Module, ref_model: torch.nn.Module | None, *, sampler_dtype: torch.dtype | None = None
    ) -> None:
        dtype = sampler_dtype or next(model.parameters()).dtype
        self.sampler = copy.deepcopy(model).to(dtype).eval().requires_grad_(False)
        self.model = shard_model(model, forward_methods={FORWARD_METHOD: _policy_forward})
        self.ref_model = ref_model
        if ref_model is not None:
            shard_model(ref_model, forward_methods={FORWARD_METHOD: _policy_forward}, reshard_root_after_forward=True)

    def backend(self, spec: MethodSpec, tokenizer: Any) -> GatheredSampler:
        """The rollout backend ``spec`` over the full copy; its ``sync_weights`` gathers the policy into the copy."""
        return GatheredSampler(registry.build_backend(spec, self.sampler, tokenizer), self.model, self.sampler)

    def training_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The guard's view: each rank's own shards."""
        return {"model": LocalShards(self.model), "optimizer": LocalShards(optimizer)}

    def checkpoint_state(self, optimizer: torch.optim.Optimizer, *, gather: bool) -> dict[str, FullState]:
        """A checkpoint's view: the full state. ``gather=True`` (saving) gathers it to rank 0 now; every rank calls."""
        states = {"model": FullState(self.model), "optimizer": FullState(self.model, optimizer)}
        if gather:
            for state in states.values():
                state.gather()
        return states


def _policy_forward(model: torch.nn.Module, batch: Any, **kwargs: Any) -> PolicyOutput:
    """The chunked policy forward as the root unit's forward method. Views among its outputs are copied: FSDP
    hooks the root's backward on the outputs, and an in-place op on a view would drop that hook."""
    out = chunked_policy_forward(model, batch, **kwargs)
    views = {f.name: t.clone() for f in fields(out) if isinstance(t := getattr(out, f.name), torch.Tensor) and t._is_view()}
    return replace(out, **views)


class GatheredSampler:
    """A rollout backend over a full copy of a sharded policy; everything but ``sync_weights`` is the backend's."""

    def __init__(self, backend: Any, policy: torch.nn.Module, sampler: torch.nn.Module) -> None:
        self.backend, self.policy, self.sampler_copy = backend, policy, sampler

    def generate(self, *args: Any, **kwargs: Any):
        return self.backend.generate(*args, **kwargs)

    def sync_weights(self) -> None:
        gather_into(self.policy, self.sampler_copy)  # a collective: every rank syncs at the same points
        self.backend.sync_weights()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.backend, name)
