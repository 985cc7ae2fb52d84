"""VCPO in the trainer (stabilisers/vcpo.py, train/trajectory.py): per-trajectory gradient norms, the gradient the
update applies against the official two-buffer arithmetic, and the ESS-scaled learning rate of one step.

    .venv/bin/python -m pytest -q tests/train/test_vcpo_trainer.py
"""

from __future__ import annotations

import math

import pytest
import torch

from reference_adopted import vcpo_official_coefficients
from sevens_task import SevensTask
from steadyrl.config import ConfigError
from steadyrl.train.forward import model_inputs
from steadyrl.train.trainer import Trainer
from steadyrl.train.trajectory import trajectory_grad_sq_norms


def _scored(trainer):
    batch = trainer.collector.collect(1).batch
    trainer.scorer.score(batch)
    return batch


def _sequence_logprob(model, rollout, i, temperature=1.0):
    """Σ_t log π(y_t) of trajectory i from the model's own full forward (an independent route)."""
    one = rollout.select(torch.tensor([i]))
    input_ids, attn, pos = model_inputs(one)
    logits = model(input_ids=input_ids, attention_mask=attn, position_ids=pos).logits.float()
    log_p = torch.log_softmax(logits[:, one.prompt_ids.shape[1] - 1 : -1] / temperature, dim=-1)
    token = log_p.gather(-1, one.completion_ids[..., None]).squeeze(-1)
    return token[one.response_mask].sum(), int(one.response_mask.sum())


def test_trajectory_norms_are_the_score_gradient_norms(tiny_config):
    trainer = Trainer(tiny_config("loss=reinforce", "vcpo.baseline=true"), task=SevensTask())
    batch = _scored(trainer)
    norms, logprobs = trajectory_grad_sq_norms(trainer.updater, batch)
    params = trainer.updater.params
    for i in range(batch.batch_size):  # reinforce at Â = 1: ℓ_t = −log π(y_t), so g_i = −∇ log π(y_i)
        seq, _ = _sequence_logprob(trainer.model, batch.rollout, i)
        grads = torch.autograd.grad(seq, params, allow_unused=True)
        want = sum(g.double().square().sum() for g in grads if g is not None)
        assert norms[i].item() == pytest.approx(want.item(), rel=1e-4)
    assert all(p.grad is None for p in params)  # the pass leaves .grad alone
    torch.testing.assert_close(logprobs[batch.rollout.response_mask], batch.old_logprobs[batch.rollout.response_mask], rtol=1e-5, atol=1e-5)


def _captured_step(trainer, batch):
    """The gradient and learning rate the optimizer steps with (a step pre-hook)."""
    seen = {}
    params = trainer.updater.params

    def capture(optimizer, args, kwargs):
        seen["grads"] = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]
        seen["lr"] = [g["lr"] for g in optimizer.param_groups]

    handle = trainer.optimizer.register_step_pre_hook(capture)
    result = trainer.updater.update(batch)
    handle.remove()
    return seen, result


def test_the_gradient_is_the_official_two_buffer_arithmetic(tiny_config):
    """Official: g_i = ∇ of trajectory i's seq-mean-token-mean loss at Â = 1 (micro-batch of one, 1/N), buffers
    Σ R_i/σ·g_i and Σ g_i/σ, step on the first minus b times the second; b from ‖g_i‖ = ‖∇Σ_t ℓ_t‖ and w_i."""
    trainer = Trainer(tiny_config(
        "loss=reinforce", "aggregation=seq_mean_token_mean", "optim.grad_clip=0", "rollout.sampler_dtype=bfloat16",
        "rollout.temperature=1.5", "vcpo.baseline=true", "vcpo.ess_scaling=false",
    ), task=SevensTask())
    batch = _scored(trainer)
    params, n = trainer.updater.params, batch.batch_size
    mask = batch.rollout.response_mask
    raw, norms, log_w = [], [], []
    for i in range(n):
        seq, length = _sequence_logprob(trainer.model, batch.rollout, i, temperature=1.5)
        grads = torch.autograd.grad(-seq / length / n, params, allow_unused=True)  # loss_i·(1/N) at Â = 1
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
        raw.append(grads)
        norms.append(sum(g.double().square().sum() for g in grads).item() * (length * n) ** 2)  # "unscaled"
        log_w.append((batch.old_logprobs[i] - batch.rollout.rollout_logprobs[i])[mask[i]].double().sum().item())
    assert max(abs(x) for x in log_w) > 0  # the bf16 sampler makes the weights differ from 1
    coefficient = vcpo_official_coefficients(
        batch.rewards.tolist(), None, norms, log_w, 4, scope="group", use_is_weights=True, clip=None, lengths=None,
        norm_by_std=True,
    )
    official = [sum(c * g[k] for c, g in zip(coefficient, raw)) for k in range(len(params))]
    seen, result = _captured_step(trainer, batch)
    for got, want in zip(seen["grads"], official):
        torch.testing.assert_close(got, want, rtol=2e-4, atol=1e-7)
    assert "vcpo/baseline_mean" in result.metrics


def test_the_learning_rate_of_one_step_is_scaled_by_the_ess(tiny_config):
    trainer = Trainer(tiny_config(
        "rollout.sampler_dtype=bfloat16", "rollout.temperature=1.5", "vcpo.baseline=false",
        "vcpo.base_ess_ratio=1.0", "optim.lr=0.01",
    ), task=SevensTask())
    batch = _scored(trainer)
    mask, valid = batch.rollout.response_mask, batch.sample_mask
    s = ((batch.old_logprobs - batch.rollout.rollout_logprobs) * mask).double().sum(1)[valid]
    w = s.exp()
    ratio = (w.sum() ** 2 / ((w * w).sum() + 1e-8) / w.numel()).item()
    assert ratio < 1.0
    seen, result = _captured_step(trainer, batch)
    assert seen["lr"][0] == pytest.approx(0.01 * math.sqrt(ratio), rel=1e-6)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.01)  # restored after the step
    assert result.metrics["vcpo/ess_ratio"] == pytest.approx(ratio, rel=1e-5)


def test_a_group_baseline_needs_whole_groups_per_mini_batch(tiny_config):
    with pytest.raises(ConfigError, match="whole groups in every mini-batch"):
        Trainer(tiny_config("vcpo.baseline=true", "optim.mini_batches=8"))  # 16 rows / 8 = 2 < group of 4
    Trainer(tiny_config("vcpo.scope=minibatch", "optim.mini_batches=8"))
