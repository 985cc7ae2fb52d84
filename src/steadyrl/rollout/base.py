"""The rollout backend protocol: prompts in, completions with masks and the sampler's own log-probs out."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from steadyrl.models.lora import is_peft_model, merged_copy, merged_state_dict, unwrap_peft
from steadyrl.models.precision import body_dtype, cast_lm_head_to_fp32
from steadyrl.models.routing import supported_moe_layers
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


class SamplerCopyMixin:
    """What both backends share: the policy, its sampler (a separate copy in ``sampler_dtype`` when that differs
    from the policy's dtype, so the train-inference gap is real), and MoE routing recording.

    A LoRA policy (a peft model) samples through the causal LM inside the wrapper, its LoRA layers active; a
    separate sampler of it is a plain copy with the adapters merged in (models/lora.py), refreshed by merging."""

    def _init_sampler(
        self,
        model: torch.nn.Module,
        pad_token_id: int,
        eos_token_id: int | list[int],
        sampler_dtype: torch.dtype | None,
        record_routing: bool | None,
    ) -> None:
        self.policy = model
        self.pad_token_id = pad_token_id
        self.eos_token_id = eos_token_id
        param_dtype = body_dtype(model)
        self.separate_sampler = sampler_dtype is not None and sampler_dtype != param_dtype
        self.lora = is_peft_model(model)
        if self.separate_sampler:
            copied = merged_copy(model) if self.lora else copy.deepcopy(model)
            self.sampler = copied.to(sampler_dtype).eval().requires_grad_(False)
            if getattr(model, "lm_head_fp32", False):  # the copy samples from an fp32 head too
                cast_lm_head_to_fp32(self.sampler)
        else:
            self.sampler = unwrap_peft(model)  # peft's own forward hides the cache API the backends call
        if record_routing is None:
            record_routing = bool(supported_moe_layers(self.sampler, strict=False))
        self.record_routing = record_routing

    @torch.no_grad()
    def sync_weights(self) -> None:
        """Copy the policy's current parameters into the low-precision sampler (no-op when it is the policy)."""
        if not self.separate_sampler:
            return
        if self.lora:
            merged = merged_state_dict(self.policy)
            for name, dst in self.sampler.named_parameters():
                dst.copy_(merged[name])
            return
        for dst, src in zip(self.sampler.parameters(), self.policy.parameters()):
            dst.copy_(src)


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
