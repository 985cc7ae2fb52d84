"""Tiny randomly initialised causal LMs (dense and MoE) for the offline stability lab and the tests.

The models are the real transformers architectures (Qwen2, Llama, Qwen2-MoE, Qwen3-MoE) at toy sizes, so
everything the trainer does on them (logprobs, generation, gradient checkpointing, MoE routing record /
replay) works unchanged on the full-size checkpoints.

Defaults:
  * special-token ids match :func:`steadyrl.models.build_char_tokenizer` (pad 0, eos 1, bos 2);
  * ``intermediate_size`` defaults to ⌈8/3 · hidden_size⌉ rounded up to a multiple of 32 (the usual
    SwiGLU width, same parameter count as a 4·H two-matrix MLP);
  * MoE: ``num_experts=4``, ``num_experts_per_tok=2``, ``moe_intermediate_size = hidden_size``, the router
    auxiliary (load-balancing) loss is off (``router_aux_loss_coef=0``, ``output_router_logits=False``) so
    the RL loss is the only objective; ``norm_topk_prob`` keeps the architecture's default (False for both
    in transformers) unless passed in ``extra``;
  * Qwen2-MoE's shared expert is OFF by default (``shared_expert_intermediate_size=0``: the module still
    exists but has zero width, so it contributes exactly 0), which makes the two MoE architectures differ
    only in attention details and keeps routing the only source of expert variation. Pass
    ``shared_expert_intermediate_size=...`` to turn it on.
"""

from __future__ import annotations

import math
import warnings

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

DENSE_ARCHS = ("qwen2", "llama")
MOE_ARCHS = ("qwen2_moe", "qwen3_moe")


def tiny_model_config(
    arch: str = "qwen2",
    *,
    vocab_size: int,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 256,
    tie_word_embeddings: bool = True,
    pad_token_id: int = 0,
    bos_token_id: int = 2,
    eos_token_id: int = 1,
    num_experts: int | None = None,
    num_experts_per_tok: int | None = None,
    moe_intermediate_size: int | None = None,
    **extra,
) -> PretrainedConfig:
    """A transformers config for a tiny ``arch`` in {"qwen2", "llama", "qwen2_moe", "qwen3_moe"}.

    ``extra`` is passed to the config unchanged (e.g. ``rms_norm_eps``, ``norm_topk_prob``,
    ``shared_expert_intermediate_size``, ``decoder_sparse_step``) and wins over the defaults here.
    """
    if arch not in DENSE_ARCHS + MOE_ARCHS:
        raise ValueError(f"unknown tiny-model arch {arch!r}; valid: {list(DENSE_ARCHS + MOE_ARCHS)}")
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if hidden_size % num_heads != 0:
        raise ValueError(f"hidden_size {hidden_size} must be divisible by num_heads {num_heads}")
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"num_heads {num_heads} must be divisible by num_kv_heads {num_kv_heads}")
    if intermediate_size is None:
        intermediate_size = 32 * math.ceil(8 * hidden_size / 3 / 32)
    kwargs: dict = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
    )
    moe_args = dict(
        num_experts=num_experts,
        num_experts_per_tok=num_experts_per_tok,
        moe_intermediate_size=moe_intermediate_size,
    )
    if arch in DENSE_ARCHS:
        given = [name for name, value in moe_args.items() if value is not None]
        if given:
            raise ValueError(f"{given} only apply to MoE archs {list(MOE_ARCHS)}, not {arch!r}")
    else:
        num_experts = 4 if num_experts is None else num_experts
        num_experts_per_tok = 2 if num_experts_per_tok is None else num_experts_per_tok
        if not 1 <= num_experts_per_tok <= num_experts:
            raise ValueError(
                f"num_experts_per_tok must be in [1, num_experts={num_experts}], got {num_experts_per_tok}"
            )
        kwargs.update(
            num_experts=num_experts,
            num_experts_per_tok=num_experts_per_tok,
            moe_intermediate_size=hidden_size if moe_intermediate_size is None else moe_intermediate_size,
            router_aux_loss_coef=0.0,
            output_router_logits=False,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        )
        if arch == "qwen2_moe":
            kwargs["shared_expert_intermediate_size"] = 0
    kwargs.update(extra)
    return AutoConfig.for_model(arch, **kwargs)


def build_tiny_model(
    config: PretrainedConfig,
    seed: int = 0,
    *,
    attn_implementation: str = "sdpa",
) -> PreTrainedModel:
    """``AutoModelForCausalLM.from_config`` with a deterministic initialisation from ``seed``.

    The global torch RNG is forked, so building a model neither depends on nor changes the caller's RNG
    state. ``attn_implementation`` is ``"sdpa"`` (default) or ``"eager"``; both run on CPU.
    """
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # A zero-width shared expert (the Qwen2-MoE default here) warns that initialising it is a no-op.
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors is a no-op")
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    return model


def count_parameters(model: torch.nn.Module, *, trainable_only: bool = False) -> int:
    """Number of distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
