"""One micro-batch's loss terms from LossInputs: correction → token filters → loss → aggregation (+ KL).

The same composition as steadyrl's own update stage (``PolicyUpdater._micro_batch_terms`` after its forward),
for hosts that run their own forward (TRL). Normaliser rule: ``den_mask`` holds the tokens that count in
every normaliser (``counts`` was summed from it over the whole optimizer step); rejections decided inside the
micro-batch (a correction at θ, a token filter, masks inside a loss) zero their tokens' loss but leave the
counts as they are, exactly as the update stage does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from steadyrl.ops.correction import mismatch_metrics
from steadyrl.ops.kl import kl_k3
from steadyrl.ops.masking import masked_fill_zero, masked_mean
from steadyrl.types import GlobalCounts, LossInputs, Metrics


def denominator_mask(inputs: LossInputs, correction_fn: Callable | None) -> Tensor:
    """Tokens that count in the normalisers: the correction's rejections known at θ_old leave them.

    As the update stage: only when π_old was computed (off-policy batches); on-policy the correction runs at
    θ = θ_old inside the micro-batch and its mask only zeroes the loss.
    """
    mask = inputs.response_mask
    if correction_fn is None or inputs.rollout_logprobs is None or inputs.old_logprobs is None:
        return mask
    at_old = LossInputs(**{**inputs.__dict__, "logprobs": inputs.old_logprobs.clone()})
    return mask & correction_fn(at_old).mask


def policy_terms(
    inputs: LossInputs,
    den_mask: Tensor,  # (B, T) bool
    counts: GlobalCounts,
    *,
    loss_fn: Callable,
    aggregation_fn: Callable,
    correction_fn: Callable | None = None,
    token_filters: Sequence = (),
    hidden: Tensor | None = None,
    lr: float = 0.0,
    kl_fn: Callable | None = None,
    kl_coef: float = 0.0,
) -> tuple[dict[str, Tensor], Metrics]:
    """({"policy": scalar, ["kl": scalar]}, metrics): this micro-batch's share of the step's objective."""
    mask = den_mask.clone()
    weights = torch.ones_like(inputs.logprobs.detach())
    metrics: Metrics = {}
    if correction_fn is not None:
        corr = correction_fn(inputs)
        mask &= corr.mask
        weights = weights * corr.weights
        metrics.update(corr.metrics)
    elif inputs.rollout_logprobs is not None:
        metrics.update(mismatch_metrics(inputs.old_logprobs, inputs.rollout_logprobs, inputs.response_mask))
    penalties = []
    for token_filter in token_filters:
        keep, w, m = token_filter(inputs, hidden, lr)
        mask &= keep
        weights = weights * w
        metrics.update(m)
        penalty_bt = token_filter.loss_penalty()
        if penalty_bt is not None:
            penalties.append(penalty_bt)
    loss_bt, loss_metrics = loss_fn(inputs)
    metrics.update(loss_metrics)
    policy_bt = masked_fill_zero(loss_bt * weights, mask)
    for penalty_bt in penalties:
        policy_bt = policy_bt + masked_fill_zero(penalty_bt, den_mask)
    terms = {"policy": aggregation_fn(policy_bt, den_mask if penalties else mask, counts)}
    if kl_fn is not None and kl_coef > 0:
        kl_bt = kl_fn(inputs.logprobs, inputs.ref_logprobs, inputs.response_mask)
        terms["kl"] = kl_coef * aggregation_fn(masked_fill_zero(kl_bt, mask), mask, counts)
        metrics["kl/ref_k3"] = masked_mean(kl_k3(inputs.logprobs.detach(), inputs.ref_logprobs, inputs.response_mask), inputs.response_mask)
    if inputs.entropy is not None:
        metrics["policy/entropy"] = masked_mean(inputs.entropy, inputs.response_mask)
    return terms, metrics
