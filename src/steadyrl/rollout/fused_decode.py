"""A fused single-token decode step for dense Llama / Qwen2 decoders (the native backend's fast path)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def plain_sdpa_causal(config) -> bool:
    """True when every layer is full causal attention through SDPA: the mask is then a (B, 1, 1, L) bool view."""
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    return (
        config._attn_implementation == "sdpa"
        and layer_types == {"full_attention"}
        and getattr(config, "sliding_window", None) is None
        and getattr(config, "attention_chunk_size", None) is None
    )


def _rms_norm(norm: torch.nn.Module, hidden: Tensor) -> Tensor:
    """LlamaRMSNorm / Qwen2RMSNorm, op for op (fp32 statistics, weight applied in the input dtype)."""
    input_dtype = hidden.dtype
    hidden = hidden.to(torch.float32)
    hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * hidden.to(input_dtype)


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _linear(layer: torch.nn.Linear, x: Tensor) -> Tensor:
    return F.linear(x, layer.weight, layer.bias)


class LlamaFamilyDecodeStep:
    """One decode token through a dense Llama / Qwen2 decoder, from the HF modules' own weights.

    The same operations in the same order as the transformers modules (RMSNorm in fp32, the model's rotary
    module, SDPA over the KV heads with the query heads packed as HF's ``pack_gqa`` does), without their
    per-call machinery. Reads and writes the backend's static K/V buffers, (B, H_kv, L, D) per layer. Used only
    when ``supports(model)``: exact ``nn.Linear`` / ``nn.Embedding`` modules (no LoRA or quantised wrappers), no
    hooks (they would not run), plain causal SDPA.
    """

    MODEL_TYPES = ("llama", "qwen2")

    @classmethod
    def supports(cls, model: torch.nn.Module) -> bool:
        config = model.config
        base = getattr(model, "model", None)
        if config.model_type not in cls.MODEL_TYPES or not plain_sdpa_causal(config) or base is None:
            return False
        if (
            type(getattr(model, "lm_head", None)) is not torch.nn.Linear
            or type(base.embed_tokens) is not torch.nn.Embedding
        ):
            return False
        if torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks:
            return False
        if any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()):
            return False
        for layer in base.layers:
            attn, mlp = layer.self_attn, layer.mlp
            linears = [
                attn.q_proj,
                attn.k_proj,
                attn.v_proj,
                attn.o_proj,
                mlp.gate_proj,
                mlp.up_proj,
                mlp.down_proj,
            ]
            if any(type(m) is not torch.nn.Linear for m in linears):
                return False
            norms = [layer.input_layernorm, layer.post_attention_layernorm]
            if not all(
                type(n).__name__.endswith("RMSNorm") and hasattr(n, "variance_epsilon") for n in norms
            ):
                return False
        return True

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.base = model.model
        self.layers = list(self.base.layers)

    def __call__(
        self,
        token: Tensor,  # (B, 1) long
        position: Tensor,  # (B, 1) long
        visible: Tensor,  # (B, L) bool, the cache slots the token attends to (its own slot included)
        slot: Tensor,  # (1,) long, the cache slot this token's K/V go to
        keys: list[Tensor],  # per layer (B, H_kv, L, D)
        values: list[Tensor],  # per layer (B, H_kv, L, D)
        kv_len: int | None = None,  # attend over slots [0, kv_len) only (eager); None = all L (CUDA graphs)
    ) -> Tensor:  # (B, V) fp32 logits
        batch = token.shape[0]
        hidden = self.base.embed_tokens(token)
        cos, sin = self.base.rotary_emb(hidden, position)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        mask = visible[:, None, None, :kv_len]
        for index, layer in enumerate(self.layers):
            attn = layer.self_attn
            residual = hidden
            hidden = _rms_norm(layer.input_layernorm, hidden)
            query = _linear(attn.q_proj, hidden).view(batch, 1, -1, attn.head_dim).transpose(1, 2)
            key = _linear(attn.k_proj, hidden).view(batch, 1, -1, attn.head_dim).transpose(1, 2)
            value = _linear(attn.v_proj, hidden).view(batch, 1, -1, attn.head_dim).transpose(1, 2)
            query = (query * cos) + (_rotate_half(query) * sin)
            key = (key * cos) + (_rotate_half(key) * sin)
            layer_keys, layer_values = keys[index], values[index]
            layer_keys.index_copy_(2, slot, key)
            layer_values.index_copy_(2, slot, value)
            # HF's pack_gqa: the query heads sharing a KV head become that head's query rows
            packed = query.reshape(batch, layer_keys.shape[1], -1, attn.head_dim)
            out = F.scaled_dot_product_attention(
                packed,
                layer_keys[:, :, :kv_len],
                layer_values[:, :, :kv_len],
                attn_mask=mask,
                scale=attn.scaling,
            )
            out = out.reshape(batch, -1, 1, attn.head_dim).transpose(1, 2).reshape(batch, 1, -1).contiguous()
            hidden = residual + _linear(attn.o_proj, out)
            residual = hidden
            hidden = _rms_norm(layer.post_attention_layernorm, hidden)
            mlp = layer.mlp
            hidden = residual + _linear(
                mlp.down_proj, mlp.act_fn(_linear(mlp.gate_proj, hidden)) * _linear(mlp.up_proj, hidden)
            )
        hidden = _rms_norm(self.base.norm, hidden)
        # the head's own forward: an FP32 LM head (models/precision.py) replaces it on the instance
        return self.model.lm_head(hidden[:, -1]).to(dtype=torch.float32, copy=True)
