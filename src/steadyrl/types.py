"""Shape glossary and the typed containers that travel between the stages of an RL step.

Shapes (used in every signature of the package):

    P  prompts in a batch            G  completions per prompt (group size)
    B  = P * G completions           T  response (completion) length, padded
    Tp prompt length, left-padded    V  vocabulary size
    H  hidden size                   K  top-K logits (CAPO)
    L  MoE layers                    E  experts per token (top-k of the router)

Conventions:
    * ``response_mask: bool (B, T)``, True = the token counts. Masked positions may hold garbage, NaN
      included; ops select with ``torch.where(mask, x, 0)`` so garbage never leaks into a result.
    * Three policies are kept apart and named the same everywhere:
      ``rollout_logprobs`` (μ, what the sampler used), ``old_logprobs`` (π_old, the trainer's recompute at
      the parameters that sampled), ``logprobs`` (π_θ, with gradient). ``ref_logprobs`` is π_ref for KL.
    * Groups are contiguous: completions ``g*G .. g*G+G-1`` answer prompt ``g``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

Metrics = dict[str, Tensor]
"""Metric name -> 0-d tensor. Names are namespaced (``ratio/clip_frac_low``). A name ending in ``_max`` is
reduced across micro-batches and ranks with max, ``_min`` with min, anything else with a token-weighted mean."""


def _identity(x: Tensor) -> Tensor:
    return x


@dataclass
class LossInputs:
    """Everything a per-token policy loss or a correction may read, for one micro-batch.

    ``reduce_sum`` sums a tensor over every data-parallel rank (identity on one process); losses that need
    batch-level statistics (BAPO's bound search, Clip-Cov's covariance, STEER's |Ω| range) call it so their
    decision is the same on every rank and independent of the micro-batch split as far as the method allows.
    """

    logprobs: Tensor  # (B, T) log π_θ(y_t), carries the gradient
    old_logprobs: Tensor  # (B, T) log π_old(y_t), detached; equals logprobs.detach() on-policy
    advantages: Tensor  # (B, T) broadcast per-token advantages, detached
    response_mask: Tensor  # (B, T) bool
    rollout_logprobs: Tensor | None = None  # (B, T) log μ(y_t) from the sampler
    ref_logprobs: Tensor | None = None  # (B, T) log π_ref(y_t)
    entropy: Tensor | None = None  # (B, T) full-vocabulary entropy of π_θ, detached
    reduce_sum: Callable[[Tensor], Tensor] = field(default=_identity, repr=False)
    token_logits: Tensor | None = None  # (B, T) raw logit z_t[y_t] of the sampled token under π_θ (with grad)
    old_token_logits: Tensor | None = None  # (B, T) the same under π_old, detached
    token_ids: Tensor | None = None  # (B, T) sampled completion ids (CAPO's top-K membership)

    def __post_init__(self) -> None:
        # Checked once here, as rlax checks shapes at every entry, so that no op meets a silently broadcast
        # (B, 1) or transposed tensor: every per-token tensor is (B, T), the mask bool.
        shape = self.logprobs.shape
        if self.logprobs.dim() != 2:
            raise ValueError(f"LossInputs.logprobs must be (B, T), got shape {tuple(shape)}.")
        if self.response_mask.dtype != torch.bool:
            raise ValueError(f"LossInputs.response_mask must be bool, got {self.response_mask.dtype}.")
        for name in _PER_TOKEN:
            value = getattr(self, name)
            if value is not None and value.shape != shape:
                raise ValueError(
                    f"LossInputs.{name} has shape {tuple(value.shape)}, logprobs {tuple(shape)}; every per-token "
                    "tensor must be (B, T) (broadcast per-sequence values along T first)."
                )


_PER_TOKEN = ("old_logprobs", "advantages", "response_mask", "rollout_logprobs", "ref_logprobs", "entropy",
              "token_logits", "old_token_logits", "token_ids")


class AdvantageResult(NamedTuple):
    advantages: Tensor  # (B,) or (B, T)
    sample_mask: Tensor  # (B,) bool, False = left out of the loss (NaN reward, MC-GRPO pivot)
    metrics: Metrics


class CorrectionResult(NamedTuple):
    weights: Tensor  # (B, T) detached importance weights, 1 where no correction applies
    mask: Tensor  # (B, T) bool, False = token rejected
    metrics: Metrics


class LossResult(NamedTuple):
    loss: Tensor  # (B, T) per-token term to minimise, 0 at masked positions
    metrics: Metrics


@dataclass(frozen=True)
class GlobalCounts:
    """Normalisers summed over the whole optimizer step (all micro-batches, all ranks).

    Using these instead of per-micro-batch counts is what makes the gradient independent of how a batch is
    split into micro-batches or ranks.
    """

    num_tokens: Tensor | float  # Σ response_mask over the mini-batch
    num_seqs: Tensor | float  # number of completions in the mini-batch
    max_len: Tensor | float = 1.0  # the constant length L of Dr.GRPO's normaliser (e.g. max new tokens)


@dataclass
class RolloutBatch:
    """What a rollout backend returns for B = P * G completions."""

    prompt_ids: Tensor  # (B, Tp) long, left-padded with pad_token_id
    prompt_mask: Tensor  # (B, Tp) bool, True = real prompt token
    completion_ids: Tensor  # (B, T) long, right-padded with pad_token_id
    response_mask: Tensor  # (B, T) bool, True up to and including EOS
    rollout_logprobs: Tensor  # (B, T) float32 log μ(y_t) of the sampled token, 0 where masked
    truncated: Tensor  # (B,) bool, True = hit max_new_tokens without EOS
    routed_experts: Tensor | None = None  # (B, Tp + T, L, E) long, recorded router choices (R3)

    @property
    def batch_size(self) -> int:
        return self.completion_ids.shape[0]

    def select(self, index: Tensor) -> RolloutBatch:
        """Rows ``index`` of every tensor (keeps groups intact when index selects whole groups)."""
        pick = lambda t: None if t is None else t[index]  # noqa: E731
        return RolloutBatch(
            prompt_ids=self.prompt_ids[index],
            prompt_mask=self.prompt_mask[index],
            completion_ids=self.completion_ids[index],
            response_mask=self.response_mask[index],
            rollout_logprobs=self.rollout_logprobs[index],
            truncated=self.truncated[index],
            routed_experts=pick(self.routed_experts),
        )

    def to(self, device: torch.device | str) -> RolloutBatch:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return RolloutBatch(**{k: move(v) for k, v in self.__dict__.items()})
