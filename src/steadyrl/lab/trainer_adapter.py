"""The lab's only calls into the trainer's update stage: its per-micro-batch loss, its π_old pass and its step.

Every training gradient the lab measures is the trainer's own: ``micro_batch_loss`` returns the loss
``PolicyUpdater._micro_batch_terms`` builds for a micro-batch (policy forward, correction, token filters,
per-token loss, aggregation with the counts it is given, KL term), under the same MoE routing replay context
the update loop uses; ``prepare_old`` is the score stage's π_old pass and ``optimizer_step`` is
``PolicyUpdater.update`` itself. When the trainer's stages are restructured, re-point the functions of this
module and nothing else in steadyrl.lab.
"""

from __future__ import annotations

import torch
from torch import Tensor

from steadyrl.train.batch import ScoredBatch
from steadyrl.train.update import PolicyUpdater
from steadyrl.types import GlobalCounts


def micro_batch_loss(updater: PolicyUpdater, micro: ScoredBatch, den_mask: Tensor, counts: GlobalCounts, lr: float) -> Tensor:
    """The scalar the trainer back-propagates for ``micro`` (the sum of its named loss terms)."""
    with updater._replaying(updater.model, micro.rollout, updater.replay):
        terms, _metrics, _weight = updater._micro_batch_terms(micro, den_mask, counts, lr)
        return sum(terms.values())


def denominator_mask(updater: PolicyUpdater, scored: ScoredBatch) -> Tensor:
    """The tokens the trainer counts in its normalisers (correction rejections known at θ_old removed)."""
    return updater._denominator_mask(scored)


def prepare_old(updater: PolicyUpdater, scored: ScoredBatch, *, compute_old: bool) -> dict[str, float]:
    """The trainer's π_old pass at θ_old (``prepare_old_logprobs``): sets ``scored.old_logprobs`` when
    ``compute_old`` (the trainer does when N > 1) and, under R2, the batch's replayed routing; returns the MoE
    routing diagnostics (agreement, mismatch KL without replay)."""
    return {k: float(v) for k, v in updater.prepare_old_logprobs(scored, compute_old).items()}


def optimizer_step(updater: PolicyUpdater, mini_batch: ScoredBatch) -> dict[str, float]:
    """One optimizer step of the trainer on ``mini_batch`` (the updater must be built with mini_batches = 1)."""
    if updater.settings.mini_batches != 1 or updater.settings.epochs != 1:
        raise ValueError("optimizer_step makes exactly one step: build the updater with mini_batches=1, epochs=1.")
    return updater.update(mini_batch)


def training_gradient(
    updater: PolicyUpdater,
    scored: ScoredBatch,
    *,
    num_seqs: float,
    lr: float,
    micro_batch_size: int = 512,
) -> Tensor:
    """Flat gradient (all trainable parameters, fp32) of the trainer's loss on ``scored``, with the sequence
    normaliser set to ``num_seqs`` (the lab passes the number of prompts for an exact expectation, the
    mini-batch size for a sampled mini-batch). No optimizer step, no state change in the model."""
    params = [p for p in updater.model.parameters() if p.requires_grad]
    den_mask = denominator_mask(updater, scored)
    counts = GlobalCounts(
        num_tokens=den_mask.sum().float().clamp(min=1.0),
        num_seqs=torch.tensor(float(num_seqs)),
        max_len=float(updater.settings.max_len),
    )
    total = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    index = torch.arange(scored.batch_size)
    for chunk in index.split(max(1, micro_batch_size)):
        loss = micro_batch_loss(updater, scored.select(chunk), den_mask[chunk], counts, lr)
        if not loss.requires_grad:
            continue
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        for acc, g in zip(total, grads):
            if g is not None:
                acc.add_(g.float())
    return torch.cat([g.reshape(-1) for g in total])
