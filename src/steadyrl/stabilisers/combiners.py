"""Gradient combiners: how the named loss terms of a step become one gradient.

The updater hands every micro-batch's named terms (``{"policy": ..., "kl": ...}``) to ``backward`` and calls
``finalize`` once per optimizer step, before clipping. ``rescale`` multiplies what the policy and KL terms
contributed so far (the normaliser correction of train/update.py). ``SumCombiner`` is ordinary training; PCGrad
and PCR (gradient-conflict resolution) keep the terms' gradients apart.
"""

from __future__ import annotations

import torch
from torch import Tensor

from steadyrl.runtime.distributed import all_reduce_gradients
from steadyrl.types import Metrics


class GradientCombiner:
    separable_aux = True
    """Auxiliary terms (retention) may be backpropagated in calls of their own, after ``rescale``."""

    def __init__(self, *, model: torch.nn.Module | None = None, distributed: bool = False) -> None:
        self.model = model
        self.distributed = distributed

    def begin(self, params: list[torch.nn.Parameter]) -> None:
        self.params = params

    def rescale(self, scale: Tensor) -> None:
        """Multiply the gradient accumulated since ``begin`` by ``scale`` (0-d)."""
        grads = [p.grad for p in self.params if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, scale.to(grads[0].dtype))

    def state_dict(self) -> dict:
        """State kept across optimizer steps (none here); a checkpoint and a guard rollback restore it."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def backward(self, terms: dict[str, Tensor]) -> None:
        raise NotImplementedError

    def finalize(self, params: list[torch.nn.Parameter]) -> Metrics:
        raise NotImplementedError


class SumCombiner(GradientCombiner):
    """One backward of the summed terms; gradients summed over ranks."""

    def backward(self, terms: dict[str, Tensor]) -> None:
        total = sum(terms.values())
        if total.requires_grad:
            total.backward()

    def finalize(self, params: list[torch.nn.Parameter]) -> Metrics:
        if self.distributed:
            all_reduce_gradients(params)
        return {}
