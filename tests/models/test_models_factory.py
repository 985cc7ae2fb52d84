"""Tiny model factory: configs per arch, deterministic init, MoE settings, parameter counts.

Run: .venv/bin/python -m pytest -q tests/models/test_models_factory.py
"""

from __future__ import annotations

import pytest
import torch

from steadyrl.models import (
    MOE_ARCHS,
    build_char_tokenizer,
    build_tiny_model,
    count_parameters,
    tiny_model_config,
)

SMALL = dict(vocab_size=24, hidden_size=32, num_layers=2, num_heads=4, max_position_embeddings=64)


@pytest.mark.parametrize("arch", ["qwen2", "llama", "qwen2_moe", "qwen3_moe"])
def test_each_arch_builds_and_runs_forward_and_backward(arch):
    config = tiny_model_config(arch, **SMALL)
    assert config.model_type == arch
    model = build_tiny_model(config, seed=0)
    input_ids = torch.randint(0, 24, (2, 7), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=input_ids, labels=input_ids)
    assert out.logits.shape == (2, 7, 24)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert model.model.embed_tokens.weight.grad is not None


def test_config_fields():
    config = tiny_model_config("qwen2", **SMALL, num_kv_heads=2)
    assert config.num_hidden_layers == 2
    assert config.num_attention_heads == 4 and config.num_key_value_heads == 2
    assert config.head_dim == 8  # 32 / 4
    # ceil(8 * 32 / 3 / 32) * 32 = ceil(2.67) * 32 = 96
    assert config.intermediate_size == 96
    assert config.tie_word_embeddings is True
    tok = build_char_tokenizer("ab")
    assert (config.pad_token_id, config.eos_token_id, config.bos_token_id) == (
        tok.pad_token_id,
        tok.eos_token_id,
        tok.bos_token_id,
    )
    assert tiny_model_config("qwen2", vocab_size=10).intermediate_size == 352  # ceil(8*128/3/32)=11 -> 352
    assert tiny_model_config("llama", vocab_size=10, rms_norm_eps=1e-5).rms_norm_eps == 1e-5  # extra wins


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_moe_defaults(arch):
    config = tiny_model_config(arch, **SMALL)
    assert config.num_experts == 4 and config.num_experts_per_tok == 2
    assert config.moe_intermediate_size == 32
    assert config.router_aux_loss_coef == 0.0 and config.output_router_logits is False
    model = build_tiny_model(config)
    block = model.model.layers[0].mlp
    assert block.gate.top_k == 2 and block.gate.weight.shape == (4, 32)
    assert block.gate.weight.abs().sum() > 0  # router initialised, not left at zeros
    if arch == "qwen2_moe":
        assert config.shared_expert_intermediate_size == 0
        hidden = torch.randn(1, 3, 32)
        assert torch.equal(block.shared_expert(hidden), torch.zeros(1, 3, 32))  # zero-width shared expert


def test_qwen2_moe_shared_expert_can_be_enabled():
    config = tiny_model_config("qwen2_moe", **SMALL, shared_expert_intermediate_size=16)
    model = build_tiny_model(config)
    assert model.model.layers[0].mlp.shared_expert.down_proj.weight.shape == (32, 16)


def test_moe_args_rejected_for_dense_arch():
    with pytest.raises(ValueError, match="only apply to MoE"):
        tiny_model_config("qwen2", **SMALL, num_experts=8)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(arch="gpt2"), "unknown tiny-model arch"),
        (dict(num_heads=5), "divisible by num_heads"),
        (dict(num_kv_heads=3), "divisible by num_kv_heads"),
        (dict(arch="qwen3_moe", num_experts_per_tok=5), "num_experts_per_tok"),
    ],
)
def test_bad_configs(kwargs, match):
    args = {**SMALL, **kwargs}
    arch = args.pop("arch", "qwen2")
    with pytest.raises(ValueError, match=match):
        tiny_model_config(arch, **args)


def test_init_is_deterministic_per_seed_and_leaves_global_rng_alone():
    config = tiny_model_config("qwen2", **SMALL)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = build_tiny_model(config, seed=7).state_dict()
    assert torch.equal(torch.get_rng_state(), state)
    second = build_tiny_model(config, seed=7).state_dict()
    other = build_tiny_model(config, seed=8).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not torch.equal(
        first["model.layers.0.mlp.up_proj.weight"], other["model.layers.0.mlp.up_proj.weight"]
    )


def test_eager_and_sdpa_agree():
    config = tiny_model_config("llama", **SMALL)
    input_ids = torch.randint(0, 24, (2, 6), generator=torch.Generator().manual_seed(1))
    eager = build_tiny_model(config, seed=3, attn_implementation="eager")(input_ids).logits
    sdpa = build_tiny_model(config, seed=3, attn_implementation="sdpa")(input_ids).logits
    torch.testing.assert_close(eager, sdpa, atol=1e-5, rtol=1e-5)


def test_count_parameters_by_hand():
    config = tiny_model_config(
        "llama", vocab_size=10, hidden_size=8, num_layers=1, num_heads=2, intermediate_size=16
    )
    model = build_tiny_model(config)
    # embed 10*8=80 (tied with lm_head, counted once); attention q,k,v,o 4*8*8=256 (no bias in llama);
    # mlp gate,up,down 3*8*16=384; input + post-attention norms 2*8=16; final norm 8 -> 744
    assert count_parameters(model) == 80 + 256 + 384 + 16 + 8
    model.model.embed_tokens.weight.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == 744 - 80
    untied = build_tiny_model(
        tiny_model_config(
            "llama",
            vocab_size=10,
            hidden_size=8,
            num_layers=1,
            num_heads=2,
            intermediate_size=16,
            tie_word_embeddings=False,
        )
    )
    assert count_parameters(untied) == 744 + 80
