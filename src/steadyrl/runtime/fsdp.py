"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for the trainer: what is sharded, what is gathered, and when.

``run.parallel: fsdp`` (launched with ``torchrun --nproc_per_node N``) shards the policy over the N ranks:

* **Sharded** (each rank holds 1/N, dim 0 of every tensor): the parameters, their gradients and the AdamW state
  (exp_avg, exp_avg_sq), i.e. the 4 + 4 + 8 bytes per parameter of fp32 training become (4 + 4 + 8)/N.
* **Units**: every transformer block (the classes in transformers' ``_no_split_modules``) is one FSDP unit,
  all-gathered for its forward and again for its backward, freed after each; so are untied input embeddings.
  The root unit holds the rest (final norm, LM head, and the embeddings when tied to it), gathered for the
  whole policy forward and kept until its backward.
* **Gradients are summed over ranks**, not averaged: each rank's loss is already normalised by *global* counts
  (``ops.aggregation.global_counts``), so its gradient is a partial sum of the single-process gradient, as in the
  data-parallel path (``runtime/distributed.py``). The reduce-scatter after every backward runs with divide
  factor 1 and SUM (``set_gradient_divide_factor(1.0)``, ``set_force_sum_reduction_for_comms(True)``), so each
  rank ends with its shard of exactly the single-process gradient; the gradient combiner adds no all-reduce of
  gradients (the conflict combiners all-reduce only their per-block partial norms, stabilisers/pcr.py).
* **The chunked policy forward** (``train/forward.py``) runs the decoder, then multiplies the hidden states by
  the LM head's weight chunk by chunk, outside the model's own ``forward``; it is registered as a forward method
  of the root unit (``register_fsdp_forward_method``), so the root is all-gathered around it and its gradient is
  reduce-scattered after backward like any forward's.
* **Full tensors** are gathered, one parameter at a time, where something needs the whole model: the sampler's
  copy (``gather_into``), the checkpoint and the HF export (``full_model_state_dict``, on rank 0's CPU).

``local`` and ``full`` return a plain (non-DTensor) tensor unchanged, so callers need not know the mode.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from steadyrl.config import ConfigError

FORWARD_METHOD = "steadyrl_policy_forward"
"""The name under which a sharded model carries the chunked policy forward (``train/forward.py``)."""


def _fsdp():
    from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

    return FSDPModule, fully_shard, register_fsdp_forward_method


def _dtensor_type() -> type:
    from torch.distributed.tensor import DTensor

    return DTensor


def is_sharded(model: nn.Module) -> bool:
    FSDPModule, _, _ = _fsdp()
    return isinstance(model, FSDPModule)


def local(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor; any other tensor as is."""
    return t.to_local() if isinstance(t, _dtensor_type()) else t


def full(t: Tensor) -> Tensor:
    """The whole tensor of a DTensor (a collective: every rank must call it); any other tensor as is."""
    return t.full_tensor() if isinstance(t, _dtensor_type()) else t


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The modules that must not be split: transformers' ``_no_split_modules`` (the decoder layers)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ConfigError(
            f"run.parallel=fsdp shards a model block by block, but {type(model).__name__} names no transformer block "
            "class (transformers' _no_split_modules); use run.parallel=ddp for this model."
        )
    return blocks


def shard_model(
    model: nn.Module,
    *,
    forward_methods: dict[str, Callable[..., Any]] | None = None,
    reshard_root_after_forward: bool | None = None,
) -> nn.Module:
    """``fully_shard`` every transformer block, then the root; sum (not average) gradients over ranks; register
    ``forward_methods`` (``{name: fn(model, *args, **kwargs)}``) as forward methods of the root.

    ``reshard_root_after_forward``: None keeps the root gathered from a forward until its backward (training:
    the LM head is read again between the two, by CAPO); True frees it after each forward (a frozen reference
    model). Needs an initialised process group. Returns ``model``, now an FSDPModule with DTensor parameters.
    """
    _, fully_shard, register_fsdp_forward_method = _fsdp()
    for block in transformer_blocks(model):
        fully_shard(block, reshard_after_forward=True)
    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    if embeddings is not None and (head is None or embeddings.weight is not head.weight):
        fully_shard(embeddings, reshard_after_forward=True)  # untied: gathered for its own forward only
    fully_shard(model, reshard_after_forward=reshard_root_after_forward)
    for unit in _units(model):
        unit.set_gradient_divide_factor(1.0)  # Σ over ranks: each rank's loss is normalised by global counts
        unit.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no PREMUL_SUM)
    for name, fn in (forward_methods or {}).items():
        setattr(model, name, _bound(fn, model))
        register_fsdp_forward_method(model, name)
    return model


def _bound(fn: Callable[..., Any], model: nn.Module) -> Callable[..., Any]:
    def method(*args: Any, **kwargs: Any) -> Any:
        return fn(model, *args, **kwargs)

    return method


def _units(model: nn.Module) -> list[nn.Module]:
    FSDPModule, _, _ = _fsdp()
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def reshard(model: nn.Module) -> None:
    """Free every gathered unit (a no-op for units already sharded)."""
    for unit in _units(model):
        unit.reshard()


@torch.no_grad()
def gather_into(sharded: nn.Module, plain: nn.Module) -> None:
    """Copy the full parameters of ``sharded`` into the same-named parameters of the unsharded ``plain`` model
    (its dtype and device), one parameter at a time, so only one full parameter is in flight. Every rank calls it."""
    reshard(sharded)
    targets = dict(plain.named_parameters())
    for name, param in sharded.named_parameters():
        whole = full(param.detach())
        if name in targets:
            targets[name].copy_(whole)
        del whole


# ----------------------------------------------------------------------------- state dicts


def _options(**kwargs: Any):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def full_model_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The full state dict, gathered one tensor at a time into rank 0's CPU memory (the other ranks get {}).
    Every rank calls it. Keys are the unsharded model's parameter names."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    reshard(model)
    state = get_model_state_dict(model, options=_options(cpu_offload=True))
    for names in _tied_names(model):  # tied weights (embeddings = LM head) gathered once share one tensor again,
        present = [n for n in names if n in state]  # so save_pretrained writes them once, as for an unsharded model
        for name in present[1:]:
            state[name] = state[present[0]]
    return state


def _tied_names(model: nn.Module) -> list[list[str]]:
    by_param: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_param.setdefault(id(param), []).append(name)
    return [names for names in by_param.values() if len(names) > 1]


def load_full_model_state_dict(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Inverse of ``full_model_state_dict`` on a rank that holds the whole dict (every rank reads the file)."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    reshard(model)
    set_model_state_dict(model, state, options=_options())


def full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The full optimizer state on rank 0's CPU ({} elsewhere), keyed by parameter name (torch.distributed.checkpoint
    layout, not ``optimizer.state_dict()``'s parameter indices)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=True))


def load_full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=_options())


class FullState:
    """``state_dict`` / ``load_state_dict`` of the full (gathered) model or optimizer state, for checkpoints.
    ``state_dict`` is a collective: call ``gather()`` on every rank, then ``state_dict()`` on rank 0."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        self.model, self.optimizer = model, optimizer
        self._gathered: dict[str, Any] | None = None

    def gather(self) -> FullState:
        if self.optimizer is None:
            self._gathered = full_model_state_dict(self.model)
        else:
            self._gathered = full_optimizer_state_dict(self.model, self.optimizer)
        return self

    def state_dict(self) -> dict[str, Any]:
        if self._gathered is None:
            raise RuntimeError("FullState.state_dict() needs gather() on every rank first.")
        return self._gathered

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.optimizer is None:
            load_full_model_state_dict(self.model, state)
        else:
            load_full_optimizer_state_dict(self.model, self.optimizer, state)


class LocalShards:
    """``state_dict`` / ``load_state_dict`` of this rank's shards only (no collective): the stability guard's
    in-memory snapshots, which every rank takes and restores for itself. ``obj`` is the sharded model or its
    optimizer; DTensors are stored as their local tensors and rebuilt on load."""

    def __init__(self, obj: nn.Module | torch.optim.Optimizer) -> None:
        self.obj = obj

    def state_dict(self) -> dict[str, Any]:
        if isinstance(self.obj, nn.Module):
            return {name: local(p.detach()) for name, p in self.obj.named_parameters()}
        return _map_tensors(self.obj.state_dict(), lambda t, _: local(t))

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        if isinstance(self.obj, nn.Module):
            params = dict(self.obj.named_parameters())
            if set(state) != set(params):
                raise KeyError(f"shard snapshot keys differ from the model's: {sorted(set(state) ^ set(params))[:3]}")
            for name, p in params.items():
                local(p).copy_(state[name])
            return
        params = [p for group in self.obj.param_groups for p in group["params"]]
        self.obj.load_state_dict(_map_tensors(state, lambda t, index: as_shard_of(t, params[index])))


def as_shard_of(t: Tensor, param: Tensor) -> Tensor:
    """``t``, this rank's shard of a tensor shaped like ``param``, as a DTensor laid out like ``param`` (a
    gradient or optimizer state of a sharded parameter); returned as is for a plain ``param`` or a scalar."""
    DTensor = _dtensor_type()
    if isinstance(param, DTensor) and t.dim() > 0:
        return DTensor.from_local(
            t.to(param.device), param.device_mesh, param.placements, shape=param.shape, stride=param.stride()
        )
    return t


def _map_tensors(state: dict[str, Any], fn: Callable[[Tensor, int], Tensor]) -> dict[str, Any]:
    """An optimizer state dict with every per-parameter tensor replaced by ``fn(tensor, param_index)``."""
    mapped = {
        index: {k: fn(v, index) if isinstance(v, Tensor) else v for k, v in per_param.items()}
        for index, per_param in state["state"].items()
    }
    return {**state, "state": mapped}


def check_world(world_size: int) -> None:
    if world_size < 2:
        raise ConfigError(
            "run.parallel=fsdp shards the model over processes; launch with torchrun --nproc_per_node N (N >= 2), "
            "or use run.parallel=ddp on one process."
        )
