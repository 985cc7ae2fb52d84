"""The rollout backend protocol: prompts in, completions with masks and the sampler's own log-probs out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from steadyrl.types import RolloutBatch


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 8
    temperature: float = 1.0
    """0 means greedy decoding."""
    top_p: float = 1.0
    top_k: int = 0
    """0 disables top-k."""

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class RolloutBackend(Protocol):
    """Samples completions for already-tokenised, left-padded prompts.

    ``generate`` returns a RolloutBatch whose ``rollout_logprobs`` are log μ(y_t): the log-probability of each
    sampled token under the distribution the sampler actually drew from (after temperature, top-k, top-p),
    computed by the sampler's own forward (its dtype, its kernels). For greedy decoding they are the log-probs
    of the temperature-1 distribution.
    """

    def generate(
        self,
        prompt_ids: Tensor,  # (B, Tp) long, left-padded
        prompt_mask: Tensor,  # (B, Tp) bool
        params: SamplingParams,
        generator: torch.Generator | None = None,
    ) -> RolloutBatch: ...

    def sync_weights(self) -> None:
        """Make the sampler use the policy's current parameters (called after every optimizer step)."""
        ...


def left_pad(sequences: list[list[int]], pad_id: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """Left-pad token lists to (B, Tp) ids and a bool mask."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.bool)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq) :] = True
    return ids.to(device), mask.to(device)


def position_ids_from_mask(mask: Tensor) -> Tensor:
    """Positions counted over real tokens only, as HF generate does for left padding; pads get 1."""
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill(~mask.bool(), 1)
