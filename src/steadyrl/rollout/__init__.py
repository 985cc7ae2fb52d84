"""Rollout backends: the RolloutBackend protocol, the transformers backend and steadyrl's native sampler
(built by name through ``steadyrl.registry.build_backend``)."""

from __future__ import annotations

from steadyrl.rollout.base import RolloutBackend, SamplingParams, left_pad, position_ids_from_mask
from steadyrl.rollout.hf import HFRolloutBackend
from steadyrl.rollout.native import NativeRolloutBackend

__all__ = [
    "RolloutBackend",
    "SamplingParams",
    "HFRolloutBackend",
    "NativeRolloutBackend",
    "left_pad",
    "position_ids_from_mask",
]
