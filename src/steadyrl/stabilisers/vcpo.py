"""VCPO in the update stage (Huang et al., arXiv 2602.17616; official code mit-han-lab/vcpo, read at c7f030f0):
an ESS-scaled learning rate and the off-policy optimal baseline (OPOB) in gradient space. The math is
``ops/vcpo.py``; this class decides, for one optimizer step (one mini-batch), what the update uses:

    s_i   = Σ_t log π_old(y_t) − log μ(y_t)                         sequence IS log-weight of trajectory i
    m     = min(1, ρ_ess / ρ_base)^½                                  the step's learning-rate multiplier
    ‖g_i‖² = ‖∇_θ Σ_t ℓ_t(Â = 1)‖²                                    per trajectory (``norms_fn``)
    c_i   = (R_i − b_g)/σ_g,  b_g = Σ W_i R_i / Σ W_i,  W_i = ‖g_i‖² w_i²   → the mini-batch's advantages

The official code accumulates two gradient buffers, Σ_i R_i g_i and Σ_i g_i, and steps on the first minus b
times the second. For a loss linear in Â that is the gradient of the loss with advantage c_i, so steadyrl
feeds c_i to the configured loss and needs no extra gradient buffer. For a clipped loss the two differ on
clipped tokens with c_i < 0 (the official buffers hold the Â = +1 branch); the official recipe turns the
clip off (clip_ratio_low = 1, clip_ratio_high = 1e9), where they agree [INF]. ‖g_i‖ is of the configured
loss at Â = 1 with the rollout correction and aggregated as a token sum, as the official code's per-
trajectory norm after undoing its seq-mean-token-mean scaling; token filters (stateful) and KL are left out
[INF]. The per-trajectory norms come from the memory-frugal route: one forward and backward per trajectory
(micro-batch of one, ``torch.autograd.grad``, gradients dropped once their norm is read), as the official
``update_policy_per_traj`` does; no per-trajectory gradient is kept, the cost is one more pass over the
mini-batch at micro-batch size one (benchmarks/overhead.py measures it). π_old is the score stage's (the
trainer runs that forward whenever VCPO is on), μ the sampler's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from steadyrl.config import ConfigError, VCPOConfig
from steadyrl.ops.masking import masked_count, masked_mean
from steadyrl.ops.vcpo import ess_lr_scale, ess_ratio, opob_advantages, sequence_log_weights
from steadyrl.types import Metrics

if TYPE_CHECKING:
    from steadyrl.train.batch import ScoredBatch

NormsFn = Callable[["ScoredBatch"], tuple[Tensor, Tensor]]
"""mini-batch -> ((B,) ‖g_i‖², (B, T) log π_θ(y_t) detached) at the step's starting parameters."""


class VCPO:
    def __init__(self, cfg: VCPOConfig, *, group_size: int, rows_per_step: int) -> None:
        if cfg.baseline and cfg.scope == "group" and rows_per_step % group_size:
            raise ConfigError(
                f"VCPO's group baseline needs whole groups in every mini-batch, but a mini-batch holds {rows_per_step} "
                f"completions for groups of {group_size}; make optim.mini_batches divide the prompts per rank, or "
                "set vcpo.scope=minibatch."
            )
        if cfg.is_threshold <= 0 or cfg.base_ess_ratio <= 0:
            raise ConfigError("vcpo.is_threshold and vcpo.base_ess_ratio must be > 0.")
        self.cfg, self.group_size = cfg, group_size

    def prepare(
        self, mb: ScoredBatch, norms_fn: NormsFn, reduce_sum: Callable[[Tensor], Tensor]
    ) -> tuple[ScoredBatch, float | None, Metrics]:
        """The mini-batch with OPOB advantages (when ``baseline``), the step's learning-rate multiplier (when
        ``ess_scaling``; one host sync), and metrics."""
        c = self.cfg
        mask = mb.rollout.response_mask
        valid = mb.sample_mask & torch.isfinite(mb.rewards)
        norms, own_logprobs = norms_fn(mb) if c.baseline else (None, None)
        old = mb.old_logprobs if mb.old_logprobs is not None else own_logprobs
        if old is None:
            raise ValueError("VCPO needs π_old: the trainer runs the π_old forward when vcpo is set.")
        log_w = sequence_log_weights(old, mb.rollout.rollout_logprobs, mask)
        clip = c.is_threshold
        ratio = ess_ratio(log_w, valid, clip=clip if c.use_clipped else None, reduce_sum=reduce_sum)
        metrics: Metrics = {"vcpo/ess_ratio": ratio.float()}
        lr_scale = None
        if c.ess_scaling:
            scale = ess_lr_scale(ratio, base_ess_ratio=c.base_ess_ratio, rule=c.scaling_rule)
            metrics["vcpo/lr_scale"] = scale.float()
            lr_scale = float(scale)
        if c.baseline:
            values = mb.rewards if c.scope == "group" else masked_mean(mb.advantages, mask, dim=1)
            lengths = masked_count(mask, dim=1) if c.normalize_by_length else None
            advantages, baseline = opob_advantages(
                values, norms, log_w, valid, self.group_size, scope=c.scope, use_is_weights=c.use_is_weights,
                clip=clip if c.use_clipped_is_ratios else None, lengths=lengths, norm_by_std=c.norm_by_std,
                reduce_sum=reduce_sum,
            )
            per_token = torch.where(mask, advantages[:, None].to(mb.advantages.dtype), torch.zeros_like(mb.advantages))
            mb = replace(mb, advantages=per_token.detach())
            metrics["vcpo/baseline_mean"] = masked_mean(baseline, valid).float()
            metrics["vcpo/grad_norm_mean"] = masked_mean(norms.sqrt(), valid).float()
        return mb, lr_scale, metrics
