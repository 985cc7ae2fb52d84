"""Rollout backends: the RolloutBackend protocol, the transformers backend and steadyrl's native sampler."""

from __future__ import annotations

import torch

from steadyrl.config import ConfigError
from steadyrl.rollout.base import RolloutBackend, SamplingParams, left_pad, position_ids_from_mask
from steadyrl.rollout.hf import HFRolloutBackend
from steadyrl.rollout.native import NativeRolloutBackend

BACKENDS = ("hf", "native")


def build_backend(
    name: str,
    model: torch.nn.Module,
    tokenizer,
    *,
    sampler_dtype: torch.dtype | None = None,
    sampler_quant: str | None = None,
) -> RolloutBackend:
    ids = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
    if name == "hf":
        return HFRolloutBackend(model, **ids, sampler_dtype=sampler_dtype, sampler_quant=sampler_quant)
    if name == "native":
        return NativeRolloutBackend(model, **ids, sampler_dtype=sampler_dtype, sampler_quant=sampler_quant)
    raise ConfigError(f"unknown rollout.backend {name!r}; valid: {', '.join(BACKENDS)}.")


__all__ = [
    "RolloutBackend",
    "SamplingParams",
    "HFRolloutBackend",
    "NativeRolloutBackend",
    "build_backend",
    "left_pad",
    "position_ids_from_mask",
]
