"""Token filters: stabilisers that mask or reweight tokens using the training forward (CAPO is one).

A filter is built once per run with ``cls(model=..., distributed=..., **hyper_parameters)`` and called for
every micro-batch after the forward and before the loss. It returns a keep-mask and detached weights that
compose by multiplication with those of the correction and the loss.
"""

from __future__ import annotations

import torch
from torch import Tensor

from steadyrl.types import LossInputs, Metrics


class TokenFilter:
    needs_hidden: bool = False
    """Ask the forward for the final hidden states (B, T, H) that predict each completion token."""

    def __init__(self, *, model: torch.nn.Module, distributed: bool = False) -> None:
        self.model = model
        self.distributed = distributed

    def __call__(self, inputs: LossInputs, hidden: Tensor | None, lr: float) -> tuple[Tensor, Tensor, Metrics]:
        """(keep mask (B, T) bool, weights (B, T) detached, metrics) for one micro-batch."""
        raise NotImplementedError

    def loss_penalty(self) -> Tensor | None:
        """Soft variants: a differentiable (B, T) penalty for the micro-batch of the last call, added to the
        per-token loss (and aggregated with it) instead of, or besides, masking. None when unused."""
        return None

    def after_step(self) -> None:
        """Called after every optimizer step that was not skipped."""

    def discard_step(self) -> None:
        """Called instead of ``after_step`` when the step was skipped (non-finite gradients): forget what the
        step's micro-batches recorded."""

    def state_dict(self) -> dict:
        """State that must survive a checkpoint (saved in the trainer's checkpoint, restored on resume)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
