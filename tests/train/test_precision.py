"""Precision switches (models/precision.py): the FP32 LM head (ScaleRL; TRL ``cast_lm_head_to_fp32``) in the
policy, its sampler copy and the trainer; fp16 training with dynamic loss scaling (Precision-RL). All on CPU:
bf16 and fp16 matmuls, CPU autocast to float16 and fp16 ``generate`` run there (slowly, at this size quickly).

    .venv/bin/python -m pytest -q tests/train/test_precision.py
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from sevens_task import SevensTask
from steadyrl import registry
from steadyrl.config import ConfigError
from steadyrl.models import build_char_tokenizer, build_tiny_model, tiny_model_config
from steadyrl.models.precision import DynamicLossScale, body_dtype, cast_lm_head_to_fp32
from steadyrl.models.tokenizer import ARITHMETIC_ALPHABET
from steadyrl.rollout.base import SamplingParams
from steadyrl.train.forward import model_inputs, policy_forward
from steadyrl.train.trainer import Trainer


def _tiny(tied: bool, dtype=torch.bfloat16):
    tok = build_char_tokenizer(ARITHMETIC_ALPHABET)
    cfg = tiny_model_config("qwen2", vocab_size=len(tok), hidden_size=32, num_layers=2, num_heads=2, tie_word_embeddings=tied)
    return build_tiny_model(cfg, seed=0).to(dtype), tok


@pytest.mark.parametrize("tied", [True, False])
def test_the_fp32_head_stores_and_computes_in_fp32_and_the_decoder_keeps_its_dtype(tied):
    model, _ = _tiny(tied)
    before = model.get_output_embeddings().weight.detach().clone()
    cast_lm_head_to_fp32(model)
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    assert head.weight.dtype == torch.float32 and model.lm_head_fp32
    torch.testing.assert_close(head.weight.detach(), before.float(), rtol=0, atol=0)  # bf16 → fp32 is exact
    assert (embedding.weight is head.weight) == tied
    ids = torch.tensor([[3, 4, 5]])
    assert embedding(ids).dtype == torch.bfloat16  # the decoder stays in bf16 (a tied embedding is cast back)
    assert body_dtype(model) == torch.bfloat16
    hidden = torch.randn(1, 3, 32, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast does not pull the head back to bf16
        logits = head(hidden)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, F.linear(hidden.float(), head.weight.float()), rtol=0, atol=0)
    out = model(input_ids=ids).logits
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_a_sampler_copy_gets_its_own_fp32_head():
    model, tok = _tiny(tied=True, dtype=torch.float32)
    cast_lm_head_to_fp32(model)
    backend = registry.build_backend("hf", model, tok, sampler_dtype=torch.bfloat16)
    sampler = backend.sampler
    assert backend.separate_sampler and sampler is not model
    assert sampler.get_output_embeddings().weight.dtype == torch.float32
    assert sampler.get_output_embeddings().forward.head is sampler.get_output_embeddings()  # rebound to the copy
    assert sampler.get_input_embeddings()(torch.tensor([[3]])).dtype == torch.bfloat16
    with torch.no_grad():
        model.get_output_embeddings().weight.add_(0.5)
    backend.sync_weights()
    torch.testing.assert_close(sampler.get_output_embeddings().weight, model.get_output_embeddings().weight, rtol=0, atol=0)
    ids, mask = torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.bool)
    batch = backend.generate(ids, mask, SamplingParams(max_new_tokens=3), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(batch.rollout_logprobs).all()


def test_with_bf16_weights_the_fp32_head_makes_the_models_logits_the_trainers(tiny_config, tmp_path):
    """bf16 weights: the model's own forward (what a sampler runs) and the trainer's chunked fp32 pass share one
    bf16 decoder; with the head in fp32 in both they agree to fp32 rounding, with a bf16 head they differ by
    the head's bf16 rounding."""
    gaps = {}
    for fp32_head in (False, True):
        trainer = Trainer(tiny_config("model.dtype=bfloat16", f"model.lm_head_fp32={str(fp32_head).lower()}",
                                      f"run.output_dir={tmp_path / str(fp32_head)}"), task=SevensTask())
        batch = trainer.collector.collect(1).batch
        rollout, mask = batch.rollout, batch.rollout.response_mask
        input_ids, attn, pos = model_inputs(rollout)
        with torch.no_grad():
            logits = trainer.model(input_ids=input_ids, attention_mask=attn, position_ids=pos).logits.float()
            chunked = policy_forward(trainer.model, rollout, compute_entropy=False).logprobs
        full = torch.log_softmax(logits[:, rollout.prompt_ids.shape[1] - 1 : -1], -1)
        full = full.gather(-1, rollout.completion_ids[..., None]).squeeze(-1)
        gaps[fp32_head] = (full - chunked)[mask].abs().max().item()
    assert gaps[True] < 1e-5 < gaps[False]


@pytest.mark.parametrize("backend", ["hf", "native"])
def test_with_bf16_weights_the_fp32_head_narrows_the_sampler_trainer_gap(tiny_config, backend, tmp_path):
    """The sampler's μ against the trainer's π_old on the same batch: what remains with an fp32 head is the
    bf16 decoder's own difference between cached decoding and the teacher-forced forward."""
    gaps = {}
    for fp32_head in (False, True):
        trainer = Trainer(tiny_config("model.dtype=bfloat16", f"model.lm_head_fp32={str(fp32_head).lower()}",
                                      f"rollout.backend={backend}", "optim.mini_batches=2",
                                      f"run.output_dir={tmp_path / str(fp32_head)}"), task=SevensTask())
        batch = trainer.collector.collect(1).batch
        trainer.scorer.score(batch)
        mask = batch.rollout.response_mask
        gaps[fp32_head] = (batch.old_logprobs - batch.rollout.rollout_logprobs)[mask].abs().mean().item()
    assert gaps[True] < 0.5 * gaps[False]  # seen: 5.2e-5 vs 2.5e-4 (hf), 6.9e-5 vs 2.7e-4 (native)


def test_the_dynamic_loss_scale_by_hand():
    scale = DynamicLossScale(init_scale=8.0, growth_interval=2)
    terms = scale.scaled({"policy": torch.tensor(1.5)})
    assert terms["policy"].item() == 12.0
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([16.0, -8.0])
    scale.unscale_([p])
    assert p.grad.tolist() == [2.0, -1.0]
    scale.update(finite=False)  # overflow: halve, restart the count
    assert scale.scale == 4.0 and scale.good_steps == 0
    scale.update(finite=True)
    scale.update(finite=True)  # two finite steps in a row: double
    assert scale.scale == 8.0 and scale.good_steps == 0
    fresh = DynamicLossScale()
    fresh.load_state_dict(scale.state_dict())
    assert fresh.state_dict() == {"scale": 8.0, "good_steps": 0}


def _gradient(trainer, batch) -> list[torch.Tensor]:
    seen = {}
    params = trainer.updater.params

    def capture(lr_scale=None):
        seen["grads"] = [p.grad.clone() for p in params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        skipped = not torch.isfinite(norm).item()
        if trainer.updater.loss_scale is not None:
            trainer.updater.loss_scale.update(finite=not skipped)
        trainer.optimizer.zero_grad(set_to_none=True)
        return norm, int(skipped)

    trainer.updater._apply_gradient = capture
    result = trainer.updater.update(batch)
    return seen["grads"], result


def test_loss_scaling_leaves_the_gradient_unchanged_and_an_overflow_skips(tiny_config):
    trainer = Trainer(tiny_config("optim.grad_clip=0"), task=SevensTask())
    batch = trainer.collector.collect(1).batch
    trainer.scorer.score(batch)
    state = copy.deepcopy(trainer.model.state_dict())
    plain, _ = _gradient(trainer, copy.copy(batch))
    trainer.model.load_state_dict(state)
    trainer.updater.loss_scale = DynamicLossScale()  # 2^16: scaling and unscaling are exact in fp32
    scaled, result = _gradient(trainer, copy.copy(batch))
    for a, b in zip(plain, scaled):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    assert result.metrics["train/loss_scale"] == 2.0**16
    trainer.updater.loss_scale = DynamicLossScale(init_scale=1e38)  # overflows to inf
    _, result = _gradient(trainer, copy.copy(batch))
    assert result.skipped_steps == 1 and trainer.updater.loss_scale.scale == 5e37
    assert trainer.updater.state_dict()["loss_scale"]["scale"] == 5e37


def test_fp16_training_and_sampling_runs_with_loss_scaling(tiny_config):
    trainer = Trainer(tiny_config("model.autocast=float16", "rollout.sampler_dtype=float16"), task=SevensTask())
    assert trainer.updater.loss_scale is not None and trainer.backend.sampler.dtype == torch.float16
    assert trainer.updater.settings.autocast_dtype == torch.float16
    summary = trainer.train()
    assert summary["skipped_steps"] == 0
    off = Trainer(tiny_config("model.autocast=float16", "optim.loss_scale=none", "run.resume=false",
                              f"run.output_dir={trainer.run_dir}_off"), task=SevensTask())
    assert off.updater.loss_scale is None


def test_conflicting_autocast_settings_name_the_fix(tiny_config):
    with pytest.raises(ConfigError, match="set only model.autocast"):
        Trainer(tiny_config("model.autocast_bf16=true", "model.autocast=float16"))
    with pytest.raises(ConfigError, match="valid: none, bfloat16, float16"):
        tiny_config("model.autocast=fp8")
    with pytest.raises(ConfigError, match="set model.autocast=float16"):
        Trainer(tiny_config("model.dtype=float16"))


def test_a_resumed_run_restores_the_loss_scale(tiny_config):
    cfg = tiny_config("model.autocast=float16", "checkpoint.every=1")
    first = Trainer(cfg, task=SevensTask())
    first.updater.loss_scale.scale = 1024.0
    first.train(stop_after=1)
    second = Trainer(cfg, task=SevensTask())
    assert second.start_step == 1 and second.updater.loss_scale.state_dict() == first.updater.loss_scale.state_dict()
