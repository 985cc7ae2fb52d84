"""Per-trajectory gradient norms for VCPO's optimal baseline (stabilisers/vcpo.py), the memory-frugal way.

    ‖g_i‖² = ‖∇_θ Σ_t ℓ_t(Â = 1)‖²       ℓ: the configured loss (with its rollout correction), trajectory i alone

One forward and one ``torch.autograd.grad`` per trajectory (micro-batch of one, MoE routing replayed as in
training): the memory of one trajectory's activations plus one transient gradient, never a per-trajectory
gradient buffer or a B-fold one (torch.func's per-sample gradients would keep B copies). The parameters'
``.grad`` is not touched, so this can run inside any gradient combiner's step. The cost is one more forward
and backward over the mini-batch at micro-batch size one (benchmarks/overhead.py).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from steadyrl.ops.masking import masked_sum
from steadyrl.train.batch import ScoredBatch
from steadyrl.train.forward import policy_forward, routing
from steadyrl.types import GlobalCounts

if TYPE_CHECKING:
    from steadyrl.train.update import PolicyUpdater

_UNIT = GlobalCounts(num_tokens=1.0, num_seqs=1.0)


def _token_sum(loss: Tensor, mask: Tensor, counts: GlobalCounts) -> Tensor:
    return masked_sum(loss, mask)


def trajectory_grad_sq_norms(updater: PolicyUpdater, mb: ScoredBatch) -> tuple[Tensor, Tensor]:
    """(B,) ‖g_i‖² in float64 and (B, T) log π_θ(y_t) detached, at the updater's current parameters."""
    from steadyrl.train.update import micro_batch_terms  # the update stage's own composition

    s = updater.settings
    unit = replace(mb, advantages=torch.where(mb.rollout.response_mask, 1.0, 0.0).to(mb.advantages.dtype))
    scale = updater.loss_scale.scale if updater.loss_scale is not None else 1.0
    norms, logprobs = [], []
    for i in range(mb.batch_size):
        one = unit.select(torch.tensor([i], device=mb.advantages.device))
        with routing(updater.model, one.rollout, updater.replay):
            fwd = policy_forward(
                updater.model, one.rollout, temperature=s.temperature, compute_entropy=True,
                autocast_dtype=s.autocast_dtype, support=s.support,
            )
            logprobs.append(fwd.logprobs.detach())
            if not bool(one.token_mask.any()):
                norms.append(torch.zeros((), dtype=torch.float64, device=fwd.logprobs.device))
                continue
            step = micro_batch_terms(
                one.loss_inputs(fwd), loss=updater.loss, aggregation=_token_sum, counts=_UNIT,
                correction=updater.correction,
            )
            grads = torch.autograd.grad(step.terms["policy"] * scale, updater.params, allow_unused=True)
        norms.append(sum(g.double().square().sum() for g in grads if g is not None) / scale**2)
    return torch.stack(norms), torch.cat(logprobs)
