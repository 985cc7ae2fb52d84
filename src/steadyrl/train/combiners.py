"""Gradient combiners: how the named loss terms of a step become one gradient.

The trainer hands every micro-batch's named terms (``{"policy": ..., "kl": ...}``) to ``backward`` and calls
``finalize`` once per optimizer step, before clipping. ``SumCombiner`` is ordinary training; PCGrad and PCR
(gradient-conflict resolution) keep the terms' gradients apart.
"""

from __future__ import annotations

import torch
from torch import Tensor

from steadyrl.train.distributed import all_reduce_gradients
from steadyrl.types import Metrics


class GradientCombiner:
    def __init__(self, *, model: torch.nn.Module | None = None, distributed: bool = False) -> None:
        self.model = model
        self.distributed = distributed

    def begin(self, params: list[torch.nn.Parameter]) -> None:  # noqa: B027 - optional hook
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
