"""Token filters: stabilisers that mask or reweight tokens using the training forward (CAPO is one).

A filter is built once per run (``registry.build("token_filter", spec, model=..., distributed=...,
optimizer_defaults=...)``) and called for every micro-batch after the forward and before the loss. It returns
a ``FilterResult``: a keep-mask and detached weights that compose by multiplication with those of the
correction and the loss, and optionally a differentiable per-token penalty added to the loss.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from steadyrl.types import LossInputs, Metrics


class FilterResult(NamedTuple):
    keep: Tensor  # (B, T) bool, False = token rejected (it leaves the loss and every normaliser)
    weights: Tensor  # (B, T) detached, multiplies the per-token loss
    penalty: Tensor | None  # (B, T) differentiable term added to the loss on every counted token, or None
    metrics: Metrics


class TokenFilter:
    needs_hidden: bool = False
    """Ask the forward for the final hidden states (B, T, H) that predict each completion token."""

    def __init__(self, *, model: torch.nn.Module, distributed: bool = False) -> None:
        self.model = model
        self.distributed = distributed

    def __call__(self, inputs: LossInputs, hidden: Tensor | None, lr: float) -> FilterResult:
        """The filter's verdict on one micro-batch (``hidden`` (B, T, H) when ``needs_hidden``)."""
        raise NotImplementedError

    def after_step(self) -> None:
        """Called after every optimizer step that was not skipped."""

    def discard_step(self) -> None:
        """Called instead of ``after_step`` when the step was skipped (non-finite gradients): forget what the
        step's micro-batches recorded."""

    def state_dict(self) -> dict:
        """State that must survive a checkpoint and a guard rollback (both restore it through the updater)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
