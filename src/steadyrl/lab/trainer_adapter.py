"""The lab's only calls into the trainer's stages: the update stage's per-micro-batch terms, the score stage's
π_old pass and the update itself.

Every training gradient the lab measures is the trainer's own: ``training_gradient`` runs, per micro-batch,
the policy forward under the MoE routing replay context (``train.forward.routing``) and the update stage's
``micro_batch_terms`` (correction, token filters, per-token loss, aggregation with the step's counts, KL term),
exactly as ``PolicyUpdater`` does, then applies the update stage's normaliser rule: the counts are taken before
any in-loop rejection and the gradient is rescaled by ``normaliser_scale`` to the counts after it (rejected
tokens leave every normaliser, docs/normalisation.md). ``prepare_old`` is the score stage (``Scorer.score``)
and ``optimizer_step`` is ``PolicyUpdater.update``. When the trainer's stages are restructured, re-point the
functions of this module and nothing else in steadyrl.lab.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from steadyrl.models.routing import supported_moe_layers
from steadyrl.ops.aggregation import global_counts
from steadyrl.train.batch import ScoredBatch
from steadyrl.train.forward import policy_forward, routing
from steadyrl.train.score import Scorer, ScoreSettings
from steadyrl.train.update import PolicyUpdater, micro_batch_terms, normaliser_scale


def prepare_old(updater: PolicyUpdater, scored: ScoredBatch, *, compute_old: bool) -> dict[str, float]:
    """The trainer's score stage at θ_old with the updater's settings: sets ``scored.old_logprobs`` when
    ``compute_old`` (the trainer does when N > 1) and, under R2, the batch's replayed routing; returns the MoE
    routing diagnostics (agreement, mismatch KL without replay) on an MoE model."""
    s = updater.settings
    settings = ScoreSettings(
        temperature=s.temperature, micro_batch_size=s.micro_batch_size, autocast_dtype=s.autocast_dtype,
        routing_replay=s.routing_replay, need_old=compute_old,
        routing_diagnostics=bool(supported_moe_layers(updater.model, strict=False)), support=s.support,
    )
    return {k: float(v) for k, v in Scorer(updater.model, None, settings).score(scored).items()}


def optimizer_step(updater: PolicyUpdater, mini_batch: ScoredBatch) -> dict[str, float]:
    """One optimizer step of the trainer on ``mini_batch`` (the updater must be built with mini_batches = 1)."""
    if updater.settings.mini_batches != 1 or updater.settings.epochs != 1:
        raise ValueError("optimizer_step makes exactly one step: build the updater with mini_batches=1, epochs=1.")
    return updater.update(mini_batch).metrics


def training_gradient(
    updater: PolicyUpdater,
    scored: ScoredBatch,
    *,
    num_seqs: float | None = None,
    lr: float,
    micro_batch_size: int = 512,
) -> Tensor:
    """Flat gradient (all trainable parameters, fp32) of the trainer's loss on ``scored``: the gradient
    ``PolicyUpdater`` steps on (before clipping and the combiner), with no optimizer step and no state change.

    ``num_seqs`` replaces the step's sequence count before rejections (the lab passes the number of prompts for
    the exact expectation over an enumerated batch, lab/fidelity.py); None keeps the trainer's own count. That
    expectation holds only while no row or token is rejected from the normaliser (the rescale would then be a
    ratio of sampled counts, not a constant), so with ``num_seqs`` set a rejection raises ValueError.
    """
    s = updater.settings
    extras = {"entropy bonus": updater.entropy_bonus, "VCPO": updater.vcpo, "fp16 loss scale": updater.loss_scale}
    if any(v is not None for v in extras.values()):
        on = ", ".join(k for k, v in extras.items() if v is not None)
        raise ValueError(f"training_gradient measures the loss's own gradient; build the updater without {on}.")
    params = [p for p in updater.model.parameters() if p.requires_grad]
    before = global_counts(scored.token_mask, s.max_len)
    counts = before if num_seqs is None else dataclasses.replace(
        before, num_seqs=torch.tensor(float(num_seqs), dtype=torch.float64)
    )
    total = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    counted = []
    for rows in torch.arange(scored.batch_size).split(max(1, micro_batch_size)):
        micro = scored.select(rows)
        with routing(updater.model, micro.rollout, updater.replay):
            fwd = policy_forward(
                updater.model, micro.rollout, temperature=s.temperature, compute_entropy=True,
                keep_hidden=updater.keep_hidden, autocast_dtype=s.autocast_dtype, support=s.support,
            )
            step = micro_batch_terms(
                micro.loss_inputs(fwd), loss=updater.loss, aggregation=updater.aggregation, counts=counts,
                correction=updater.correction, token_filters=updater.token_filters, hidden=fwd.hidden, lr=lr,
                kl=updater.kl, kl_coef=s.kl_coef,
            )
            counted.append(step.mask)
            loss = sum(step.terms.values())
            if not loss.requires_grad:
                continue
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        for acc, g in zip(total, grads):
            if g is not None:
                acc.add_(g.float())
    flat = torch.cat([g.reshape(-1) for g in total])
    if not updater.rejects_in_loop:
        return flat
    scale = normaliser_scale(updater.aggregation, before, global_counts(counted, s.max_len))
    if num_seqs is not None and float(scale) != 1.0:
        raise ValueError(
            "training_gradient(num_seqs=...) is an exact expectation only when nothing leaves the normaliser, but "
            "this method's correction or token filter rejected tokens (docs/normalisation.md); pass num_seqs=None "
            "for the trainer's own gradient on this batch."
        )
    return flat * scale.float()
