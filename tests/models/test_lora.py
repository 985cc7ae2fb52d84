"""LoRA (models/lora.py): the chunked forward through the wrapper, the reference with adapters disabled, merged
weights, exports, adapter-only state, the samplers, PCR blocks and CAPO's refusal.

Run: .venv/bin/python -m pytest -q tests/models/test_lora.py
"""

from __future__ import annotations

import copy

import pytest
import torch

from extras import requires_extra
from steadyrl.config import ConfigError, LoraConfig, MethodSpec
from steadyrl.models import build_tiny_model, tiny_model_config
from steadyrl.models.lora import (
    AdapterState,
    LoraError,
    adapted_module_name,
    adapters_disabled,
    apply_lora,
    export_adapter,
    export_merged,
    merged_state_dict,
    unwrap_peft,
)
from steadyrl.rollout.base import SamplingParams
from steadyrl.rollout.fused_decode import LlamaFamilyDecodeStep
from steadyrl.rollout.hf import HFRolloutBackend
from steadyrl.rollout.native import NativeRolloutBackend
from steadyrl.stabilisers.pcr import ParameterBlocks
from steadyrl.train.forward import policy_forward
from steadyrl.types import RolloutBatch

pytestmark = requires_extra("lora", "peft")
VOCAB = 32
SETTINGS = LoraConfig(r=4, alpha=8.0, target_modules=("all-linear",))


def base_model(seed: int = 0):
    return build_tiny_model(tiny_model_config(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=2), seed=seed)


def lora_model(seed: int = 0, settings: LoraConfig = SETTINGS, perturb: bool = True):
    """A LoRA-wrapped tiny model whose B factors are non-zero (so the adapters change the output)."""
    torch.manual_seed(seed)
    model = apply_lora(base_model(), settings)
    if perturb:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.2)
    return model


def batch(seed: int = 0) -> RolloutBatch:
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(4, VOCAB, (3, 5), generator=g)
    prompt_mask = torch.ones(3, 5, dtype=torch.bool)
    prompt_mask[0, :2] = False
    completion = torch.randint(4, VOCAB, (3, 4), generator=g)
    response_mask = torch.ones(3, 4, dtype=torch.bool)
    return RolloutBatch(prompt_ids, prompt_mask, completion, response_mask, torch.zeros(3, 4), torch.zeros(3, dtype=torch.bool))


def reference_logprobs(model, rollout: RolloutBatch) -> torch.Tensor:
    """Plain-loop reference: the model's own full forward, log-softmax, the completion tokens gathered."""
    ids = torch.cat([rollout.prompt_ids, rollout.completion_ids], 1)
    attn = torch.cat([rollout.prompt_mask, torch.ones_like(rollout.completion_ids, dtype=torch.bool)], 1).long()
    positions = (attn.cumsum(-1) - 1).clamp(min=0)
    positions = positions.masked_fill(attn == 0, 1)
    logits = model(input_ids=ids, attention_mask=attn, position_ids=positions).logits.float()
    tp = rollout.prompt_ids.shape[1]
    logp = torch.log_softmax(logits[:, tp - 1 : -1], -1)
    return logp.gather(-1, rollout.completion_ids[..., None]).squeeze(-1)


def test_only_adapters_train_and_the_start_equals_the_base():
    base = base_model()
    model = apply_lora(copy.deepcopy(base), SETTINGS)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    rollout = batch()
    # B = 0 at the start: exactly the base model
    torch.testing.assert_close(policy_forward(model, rollout).logprobs, policy_forward(base, rollout).logprobs, rtol=0, atol=0)


def test_chunked_forward_through_the_wrapper_equals_the_full_forward():
    model = lora_model()
    rollout = batch()
    out = policy_forward(model, rollout, chunk_size=2)
    with torch.no_grad():
        torch.testing.assert_close(out.logprobs, reference_logprobs(model, rollout), rtol=1e-5, atol=1e-5)
    out.logprobs.sum().backward()  # gradients reach the adapters
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)


def test_reference_forward_with_adapters_disabled_is_the_base_model():
    base = base_model()
    model = lora_model()
    rollout = batch()
    with torch.no_grad():
        adapted = policy_forward(model, rollout).logprobs
        with adapters_disabled(model):
            reference = policy_forward(model, rollout).logprobs
        assert torch.equal(policy_forward(model, rollout).logprobs, adapted)  # enabled again after the block
    torch.testing.assert_close(reference, policy_forward(base, rollout).logprobs.detach(), rtol=0, atol=0)
    assert not torch.allclose(adapted, reference, atol=1e-3)
    with pytest.raises(LoraError, match="has no LoRA adapters to disable"), adapters_disabled(base):
        pass


def test_merged_weights_give_the_same_model():
    model = lora_model()
    merged = merged_state_dict(model)
    assert not any("lora_" in k or "base_layer" in k for k in merged)
    plain = base_model(seed=5)  # other weights, overwritten
    plain.load_state_dict(merged)
    rollout = batch()
    with torch.no_grad():
        torch.testing.assert_close(policy_forward(plain, rollout).logprobs, policy_forward(model, rollout).logprobs, rtol=1e-5, atol=1e-5)
        q = unwrap_peft(model).model.layers[0].self_attn.q_proj
        # W + (α/r)·B·A by hand
        expected = q.base_layer.weight + (8.0 / 4) * q.lora_B["default"].weight @ q.lora_A["default"].weight
        torch.testing.assert_close(merged["model.layers.0.self_attn.q_proj.weight"], expected)


def test_exports_load_with_and_without_peft(tmp_path):
    import peft
    from transformers import AutoModelForCausalLM

    model = lora_model()
    before = {n: p.clone() for n, p in model.named_parameters()}
    export_merged(model, None, tmp_path / "merged")
    export_adapter(model, None, tmp_path / "adapter")
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # the live model is untouched
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    rollout = batch()
    with torch.no_grad():
        expected = policy_forward(model, rollout).logprobs
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
        torch.testing.assert_close(policy_forward(loaded, rollout).logprobs, expected, rtol=1e-5, atol=1e-5)
        adapter = peft.PeftModel.from_pretrained(base_model(), tmp_path / "adapter")
        torch.testing.assert_close(policy_forward(adapter, rollout).logprobs, expected, rtol=1e-6, atol=1e-6)


def test_adapter_state_round_trips_and_is_strict():
    source, target = lora_model(seed=0), lora_model(seed=1)
    state = AdapterState(source).state_dict()
    assert state and all("lora_" in k for k in state)
    AdapterState(target).load_state_dict({k: v.clone() for k, v in state.items()})
    rollout = batch()
    with torch.no_grad():
        assert torch.equal(policy_forward(target, rollout).logprobs, policy_forward(source, rollout).logprobs)
    narrow = lora_model(settings=LoraConfig(r=4, alpha=8.0, target_modules=("q_proj", "v_proj")))
    with pytest.raises(LoraError, match="do not match this model's adapters"):
        AdapterState(narrow).load_state_dict(state)


def test_bad_settings_name_the_fix():
    with pytest.raises(LoraError, match="includes the LM head"):
        apply_lora(base_model(), LoraConfig(target_modules=("q_proj", "lm_head")))
    with pytest.raises(LoraError, match=r"linear layers are named \[.*'q_proj'.*\]"):
        apply_lora(base_model(), LoraConfig(target_modules=("attention",)))
    with pytest.raises(LoraError, match="r must be >= 1"):
        apply_lora(base_model(), LoraConfig(r=0))


def test_samplers_run_the_adapters():
    model = lora_model()
    prompt_ids, prompt_mask = batch().prompt_ids, batch().prompt_mask
    params = SamplingParams(max_new_tokens=5, temperature=0.0)
    plain = base_model(seed=5)
    plain.load_state_dict(merged_state_dict(model))
    expected = HFRolloutBackend(plain, pad_token_id=0, eos_token_id=1).generate(prompt_ids, prompt_mask, params)
    hf = HFRolloutBackend(model, pad_token_id=0, eos_token_id=1)
    native = NativeRolloutBackend(model, pad_token_id=0, eos_token_id=1)
    assert hf.sampler is unwrap_peft(model) and not native.fused  # LoRA layers: the HF forward, not the fused step
    for backend in (hf, native):
        out = backend.generate(prompt_ids, prompt_mask, params)
        assert torch.equal(out.completion_ids, expected.completion_ids)
        torch.testing.assert_close(out.rollout_logprobs, expected.rollout_logprobs, rtol=1e-4, atol=1e-4)


def test_a_separate_sampler_is_a_merged_plain_copy_kept_in_sync():
    model = lora_model()
    backend = NativeRolloutBackend(model, pad_token_id=0, eos_token_id=1, sampler_dtype=torch.bfloat16)
    assert LlamaFamilyDecodeStep.supports(backend.sampler) and backend.fused  # merged: the fused path applies
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name:
                p.add_(0.1)
    backend.sync_weights()
    merged = merged_state_dict(model)
    for name, p in backend.sampler.named_parameters():
        assert p.dtype == torch.bfloat16 and torch.equal(p, merged[name].to(torch.bfloat16)), name


def test_pcr_blocks_are_the_adapted_layers():
    assert adapted_module_name("m.layers.0.mlp.up_proj.lora_A.default") == "m.layers.0.mlp.up_proj"
    assert adapted_module_name("m.layers.0.mlp.up_proj") == "m.layers.0.mlp.up_proj"
    model = lora_model()
    params = [p for p in model.parameters() if p.requires_grad]
    blocks = ParameterBlocks(model, params, modules="mlp", blocks="module")
    assert len(blocks.names) == 2 * 3  # 2 layers × (gate, up, down), each one block of its A and B
    assert all(name.endswith(("gate_proj", "up_proj", "down_proj")) for name in blocks.names)
    assert len(blocks.tracked) == 2 * len(blocks.names)


def test_capo_refuses_a_frozen_lm_head():
    from steadyrl import registry

    with pytest.raises(ConfigError, match="the LM head is frozen here .*train without model.lora"):
        registry.build("token_filter", MethodSpec("capo"), model=lora_model(), distributed=False)
