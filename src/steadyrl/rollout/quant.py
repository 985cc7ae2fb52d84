"""Fake quantisation of the sampler copy: a real, measurable FP8 train-inference gap on any device.

``rollout.sampler_quant: fp8`` samples with a copy of the policy whose linear layers compute in FP8 (E4M3)
the way an FP8 inference engine does (W8A8), simulated by rounding to the FP8 grid and back:

    q(x; s) = s · fp8_e4m3(x / s)                    round to the nearest E4M3 value, |x / s| ≤ 448
    weights      s = max|W| / 448 per output row     re-quantised after every sync (``quantize_weights``)
    activations  s = max|x| / 448 per token          the input of every quantised linear, on every forward

The products are then taken in the copy's own dtype (fp32 unless ``sampler_dtype`` says otherwise), as an
FP8 GEMM accumulates in higher precision. Embeddings and the LM head stay unquantised, as in vLLM's FP8
checkpoints [INF: the per-row weight / per-token activation scales are the common dynamic FP8 recipe; the
Qwen paper (arXiv 2512.01374) does not give its kernels]. Only ``nn.Linear`` modules are quantised: the fused
expert weights of transformers' MoE blocks (``Qwen2MoeExperts``) and their routers keep the copy's dtype, so on
an MoE the gap comes from the attention and shared-expert layers and the activations they pass on. On the embedded tiny adder this gives a k3
mismatch of about 1e-3 per token against the fp32 policy.
"""

from __future__ import annotations

import typing

import torch
from torch import Tensor

from steadyrl.config import ConfigError, SamplerQuant

SAMPLER_QUANTS: tuple[str, ...] = typing.get_args(SamplerQuant)
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0


def check_sampler_quant(name: str | None) -> None:
    if name is not None and name not in SAMPLER_QUANTS:
        raise ConfigError(f"rollout.sampler_quant={name!r}; valid: {', '.join(SAMPLER_QUANTS)} (or leave it unset).")


def fake_quant_fp8(x: Tensor, dim: int = -1) -> Tensor:
    """x rounded to FP8 E4M3 with one scale per slice along ``dim`` (max|x| / 448), returned in x's dtype.

    A slice of zeros stays zero (its scale is clamped, not divided by); an empty tensor is returned as is.
    """
    if x.numel() == 0:
        return x
    scale = x.detach().abs().amax(dim=dim, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
    return ((x.float() / scale).to(FP8_DTYPE).float() * scale).to(x.dtype)


def quantised_linears(model: torch.nn.Module) -> list[torch.nn.Linear]:
    """Every nn.Linear of ``model`` except its LM head (the output embedding)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head]


def _quantise_input(module: torch.nn.Module, args: tuple) -> tuple:
    return (fake_quant_fp8(args[0]), *args[1:])


@torch.no_grad()
def quantize_weights(model: torch.nn.Module) -> None:
    """Round every quantised linear's weight to FP8 in place (after each copy of the policy's weights)."""
    for linear in quantised_linears(model):
        linear.weight.copy_(fake_quant_fp8(linear.weight, dim=-1))


def install_fake_quant(model: torch.nn.Module, kind: str) -> None:
    """Quantise ``model``'s weights now and its activations on every forward (a forward pre-hook per linear)."""
    check_sampler_quant(kind)
    for linear in quantised_linears(model):
        linear.register_forward_pre_hook(_quantise_input)
    quantize_weights(model)
