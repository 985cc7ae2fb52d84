"""The optimal token baseline wired through the trainer (registry fact ``reads_old_statistics``): the score
stage's π_old forward forms Σπ² chunk by chunk and its (B, T) advantages equal the op on the same tensors.

    .venv/bin/python -m pytest -q tests/train/test_token_advantage.py
"""

from __future__ import annotations

import functools

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import steadyrl.train.score as score_module
from sevens_task import SevensTask
from steadyrl.ops.advantages_multi import optimal_token_baseline_advantages
from steadyrl.ops.masking import masked_fill_zero
from steadyrl.train.forward import model_inputs, policy_forward
from steadyrl.train.trainer import Trainer


def _full_softmax_statistics(model, rollout, temperature):
    """log π_old(y_t) and Σ_v π_v² from the model's own full (B, T, V) logits (the reference)."""
    input_ids, attn, pos = model_inputs(rollout)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attn, position_ids=pos).logits.double()
    prompt_len = rollout.prompt_ids.shape[1]
    log_p = torch.log_softmax(logits[:, prompt_len - 1 : -1] / temperature, dim=-1)
    token = log_p.gather(-1, rollout.completion_ids[..., None]).squeeze(-1)
    return token, log_p.exp().square().sum(-1)


def test_the_trainers_token_advantages_equal_the_op(tiny_config):
    trainer = Trainer(tiny_config("advantage=optimal_token_baseline", "rollout.temperature=0.7"), task=SevensTask())
    assert trainer.scorer.advantage is not None
    batch = trainer.collector.collect(1).batch
    assert torch.count_nonzero(batch.advantages) == 0  # left to the score stage
    metrics = trainer.scorer.score(batch)
    assert "otb/baseline_mean" in metrics
    old, sum_sq = _full_softmax_statistics(trainer.model, batch.rollout, 0.7)
    mask = batch.rollout.response_mask
    torch.testing.assert_close(batch.old_logprobs.double()[mask], old[mask], rtol=1e-5, atol=1e-5)
    expected = optimal_token_baseline_advantages(
        batch.rewards.double(), 4, old_logprobs=old, sum_pi_squared=sum_sq, response_mask=mask
    )
    torch.testing.assert_close(batch.advantages.double(), masked_fill_zero(expected.advantages, mask), rtol=1e-4, atol=1e-5)
    assert torch.count_nonzero(batch.advantages) > 0  # the sevens reward varies within groups


class _Shapes(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


def test_no_batch_by_vocabulary_tensor_is_built_or_kept(tiny_config, monkeypatch):
    trainer = Trainer(tiny_config("advantage=optimal_token_baseline"))
    chunk = 4
    monkeypatch.setattr(score_module, "policy_forward", functools.partial(policy_forward, chunk_size=chunk))
    batch = trainer.collector.collect(1).batch
    vocab = trainer.model.get_output_embeddings().weight.shape[0]
    with _Shapes() as probe:
        trainer.scorer.score(batch)
    hidden = trainer.model.config.hidden_size
    by_vocab = [s for s in probe.shapes if s and s[-1] == vocab and s != (hidden, vocab)]  # (H, V): the head's Wᵀ
    assert by_vocab, "the probe saw no LM-head chunk"
    assert max(torch.Size(s).numel() for s in by_vocab) <= chunk * vocab < batch.advantages.numel() * vocab
    # what the batch keeps is per token
    for t in (batch.advantages, batch.old_logprobs, batch.old_token_logits):
        assert t.shape == batch.rollout.completion_ids.shape
