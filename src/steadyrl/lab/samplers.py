"""The mismatch axis: samplers μ that differ from the fp32 policy π_old at the same parameters.

    fp32    the policy itself (μ = π_old exactly)
    bf16    the rollout backends' bf16 sampler copy (``rollout.sampler_dtype: bfloat16``)
    fp8     the rollout backends' FP8 fake-quantised copy (``rollout.sampler_quant: fp8``, rollout/quant.py)
    noise   a copy whose LM head is perturbed once by Gaussian noise, ΔW ∼ N(0, (σ / ‖w_norm‖)²): the logits
            move by ΔW h with h the final-norm output (‖h‖ ≈ ‖w_norm‖), i.e. Gaussian logit noise of about σ
            that is a fixed function of the context, so μ is a distribution that can be enumerated [lab only]

The first three are built by ``build_backend`` exactly as the trainer builds them, so μ is the sampler a user
gets from the config. Each sampler is made at θ_old; the lab never syncs it (μ is the behaviour policy of the
one rollout batch being measured).
"""

from __future__ import annotations

import copy

import torch

from steadyrl import registry

MISMATCHES = ("fp32", "bf16", "fp8", "noise")


def final_norm_weight(model: torch.nn.Module) -> torch.Tensor:
    base = getattr(model, "model", None) or model.base_model
    return base.norm.weight


def noisy_head_copy(policy: torch.nn.Module, sigma: float, seed: int) -> torch.nn.Module:
    """A frozen copy of ``policy`` with an untied LM head W + ΔW, ΔW_ij ∼ N(0, (σ / ‖w_norm‖)²) (seeded)."""
    sampler = copy.deepcopy(policy).eval().requires_grad_(False)
    head = sampler.get_output_embeddings()
    scale = sigma / float(final_norm_weight(policy).detach().norm().clamp(min=1e-12))
    noise = torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(seed)) * scale
    new_head = torch.nn.Linear(head.weight.shape[1], head.weight.shape[0], bias=False)
    new_head.weight = torch.nn.Parameter(head.weight.detach().clone() + noise.to(head.weight.dtype), requires_grad=False)
    sampler.set_output_embeddings(new_head)
    return sampler


def make_sampler(policy: torch.nn.Module, tokenizer, kind: str, *, noise_sigma: float = 1.0, seed: int = 0) -> torch.nn.Module:
    """The sampler model of mismatch ``kind`` (module docstring) at the policy's current parameters."""
    if kind == "fp32":
        return policy
    if kind == "bf16":
        return registry.build_backend("hf", policy, tokenizer, sampler_dtype=torch.bfloat16).sampler
    if kind == "fp8":
        return registry.build_backend("hf", policy, tokenizer, sampler_quant="fp8").sampler
    if kind == "noise":
        return noisy_head_copy(policy, noise_sigma, seed)
    raise ValueError(f"unknown mismatch {kind!r}; valid: {', '.join(MISMATCHES)}.")
