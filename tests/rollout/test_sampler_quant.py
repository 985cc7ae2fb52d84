"""FP8 fake quantisation of the sampler copy (rollout/quant.py, rollout.sampler_quant).

Run: .venv/bin/python -m pytest -q tests/rollout/test_sampler_quant.py
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from extras import requires_extra
from steadyrl.config import ConfigError
from steadyrl.models import build_tiny_model, tiny_model_config
from steadyrl.rollout import HFRolloutBackend, NativeRolloutBackend, SamplingParams, left_pad
from steadyrl.rollout.quant import FP8_MAX, fake_quant_fp8, quantised_linears, quantize_weights
from steadyrl.train.forward import policy_forward

PAD, EOS, VOCAB = 0, 1, 12


def _model(seed: int = 0):
    cfg = tiny_model_config("qwen2", vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, initializer_range=0.5)
    return build_tiny_model(cfg, seed=seed)


def test_fake_quant_hits_the_e4m3_grid():
    # One row [448, 1, 0.3, -0.3]: scale = 448 / 448 = 1, so the values are rounded to E4M3 directly.
    # E4M3 has 3 mantissa bits: 0.3 = 1.2 × 2^-2 lies between 1.125 × 2^-2 = 0.28125 and 1.25 × 2^-2 = 0.3125,
    # nearer 0.3125 (0.0125 vs 0.01875 away); 448 and 1 are exact.
    x = torch.tensor([[448.0, 1.0, 0.3, -0.3]])
    assert torch.equal(fake_quant_fp8(x), torch.tensor([[448.0, 1.0, 0.3125, -0.3125]]))


def test_fake_quant_of_zeros_is_zero_and_of_nothing_is_nothing():
    assert torch.equal(fake_quant_fp8(torch.zeros(2, 3)), torch.zeros(2, 3))
    assert fake_quant_fp8(torch.zeros(4, 0)).shape == (4, 0)  # e.g. a zero-width shared expert of a tiny MoE


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.floats(1e-3, 1e3))
def test_fake_quant_relative_error_bound(seed, magnitude):
    # Round-to-nearest with 3 mantissa bits: |q − x| ≤ 2^-4 |x| for normal numbers; idempotent; per-row scale.
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(seed)) * magnitude
    q = fake_quant_fp8(x)
    scale = x.abs().amax(-1, keepdim=True) / FP8_MAX
    normal = (x / scale).abs() >= 2.0**-6  # below that E4M3 is subnormal: the absolute error bound applies
    assert torch.all((q - x).abs()[normal] <= x.abs()[normal] * 2.0**-4 + 1e-6)
    assert torch.allclose(fake_quant_fp8(q), q, rtol=1e-6, atol=0)
    assert torch.allclose(q.abs().amax(-1), x.abs().amax(-1), rtol=1e-6)


@pytest.mark.parametrize("backend_cls", [HFRolloutBackend, NativeRolloutBackend])
def test_fp8_sampler_is_a_quantised_copy_resynced_after_every_step(backend_cls):
    model = _model()
    backend = backend_cls(model, pad_token_id=PAD, eos_token_id=EOS, sampler_quant="fp8")
    assert backend.sampler is not model and backend.separate_sampler
    head = backend.sampler.get_output_embeddings()
    linears = quantised_linears(backend.sampler)
    assert linears and all(m is not head for m in linears)
    for linear in linears:  # weights sit on the grid: quantising again changes nothing
        assert torch.equal(fake_quant_fp8(linear.weight, dim=-1), linear.weight)
    with torch.no_grad():  # an optimizer step on the policy, then a sync: the copy follows, re-quantised
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    backend.sync_weights()
    for mine, theirs in zip(quantised_linears(backend.sampler), quantised_linears(model)):
        assert torch.equal(mine.weight, fake_quant_fp8(theirs.weight, dim=-1))
    assert torch.equal(head.weight, model.get_output_embeddings().weight)


def test_fp8_sampler_logprobs_are_its_own_and_differ_from_the_policy():
    model = _model()
    backend = HFRolloutBackend(model, pad_token_id=PAD, eos_token_id=EOS, sampler_quant="fp8")
    ids, mask = left_pad([[3, 4, 5], [6, 7]], PAD)
    out = backend.generate(ids, mask, SamplingParams(max_new_tokens=4), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sampler_lp = policy_forward(backend.sampler, out, compute_entropy=False).logprobs
        policy_lp = policy_forward(model, out, compute_entropy=False).logprobs
    m = out.response_mask
    # μ returned by the backend is the quantised copy's, teacher-forced; the fp32 policy differs (this random
    # model is sharp, initializer_range 0.5, so the gap is larger than the embedded model's k3 ≈ 1e-3).
    assert torch.allclose(out.rollout_logprobs[m], sampler_lp[m], atol=1e-4)
    gap = (policy_lp - sampler_lp)[m].abs()
    assert gap.max() > 1e-3


def test_quantize_weights_leaves_head_and_embeddings():
    model = _model()
    before = {n: p.clone() for n, p in model.named_parameters()}
    quantize_weights(model)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and not any("embed" in n or "lm_head" in n or "norm" in n for n in changed)


def test_unknown_sampler_quant_is_a_config_error(tiny_config):
    with pytest.raises(ConfigError, match="sampler_quant"):
        HFRolloutBackend(_model(), pad_token_id=PAD, eos_token_id=EOS, sampler_quant="int4")
    from steadyrl.train.trainer import Trainer

    with pytest.raises(ConfigError, match="valid: fp8"):
        Trainer(tiny_config("rollout.sampler_quant=fp4"))


def test_trainer_runs_with_an_fp8_sampler(tiny_config):
    from steadyrl.train.trainer import Trainer

    trainer = Trainer(tiny_config("rollout.sampler_quant=fp8", "optim.steps=1"))
    assert trainer.backend.sampler_quant == "fp8"
    summary = trainer.train()
    assert summary["steps"] == 1


class _Ids:
    pad_token_id, eos_token_id = PAD, EOS


@pytest.mark.parametrize("name", ["hf", "native"])
def test_registry_passes_sampler_quant_to_both_backends(name):
    from steadyrl import registry

    backend = registry.build_backend(name, _model(), _Ids(), sampler_quant="fp8")
    assert backend.sampler_quant == "fp8" and backend.separate_sampler
    assert all(torch.equal(fake_quant_fp8(m.weight, dim=-1), m.weight) for m in quantised_linears(backend.sampler))
    plain = registry.build_backend(name, _model(), _Ids())
    assert plain.sampler_quant is None and not plain.separate_sampler


def test_sampler_quant_is_set_on_rollout_not_on_the_backend_spec():
    # One place for it, as for sampler_dtype: rollout.sampler_quant, which the trainer hands to the registry.
    from steadyrl import registry
    from steadyrl.config import MethodSpec

    with pytest.raises(ConfigError, match="unknown setting.*'sampler_quant'"):
        registry.check("rollout_backend", MethodSpec("hf", {"sampler_quant": "fp8"}))


def test_fp8_copy_in_bf16_is_quantised_in_its_own_dtype():
    model = _model()
    backend = HFRolloutBackend(model, pad_token_id=PAD, eos_token_id=EOS, sampler_dtype=torch.bfloat16, sampler_quant="fp8")
    for mine, theirs in zip(quantised_linears(backend.sampler), quantised_linears(model)):
        assert mine.weight.dtype == torch.bfloat16
        assert torch.equal(mine.weight, fake_quant_fp8(theirs.weight.to(torch.bfloat16), dim=-1))


@requires_extra("lora", "peft")
def test_fp8_sampler_of_a_lora_policy_is_its_merged_copy_quantised_after_every_sync():
    from steadyrl.config import LoraConfig
    from steadyrl.models.lora import apply_lora, merged_state_dict

    model = apply_lora(_model(), LoraConfig(r=4, alpha=8.0, target_modules=("all-linear",)))
    with torch.no_grad():  # non-zero B factors, so the merged weights differ from the base ones
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(3))
    backend = HFRolloutBackend(model, pad_token_id=PAD, eos_token_id=EOS, sampler_quant="fp8")
    head = backend.sampler.get_output_embeddings()

    def check() -> None:
        merged = merged_state_dict(model)
        linears = [(n, m) for n, m in backend.sampler.named_modules() if isinstance(m, torch.nn.Linear) and m is not head]
        assert linears and len(linears) == len(quantised_linears(backend.sampler))
        for name, linear in linears:
            assert torch.equal(linear.weight, fake_quant_fp8(merged[f"{name}.weight"], dim=-1)), name
        assert torch.equal(head.weight, merged[next(n for n, m in backend.sampler.named_modules() if m is head) + ".weight"])

    check()
    with torch.no_grad():  # a training step moves only the adapters; the sync merges, then quantises again
        for name, p in model.named_parameters():
            if "lora_A" in name:
                p.add_(0.1)
    backend.sync_weights()
    check()
