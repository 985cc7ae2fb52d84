"""VCPO's two variance controls as pure math (Huang et al., "Stable Asynchrony: Variance-Controlled Off-Policy RL
for LLMs", arXiv 2602.17616; official code mit-han-lab/vcpo, ``recipe/fully_async_policy/staleness_utils.py``
and ``verl/workers/actor/megatron_actor.py``). The trainer part (per-trajectory gradient norms, the learning
rate of one optimizer step) is ``stabilisers/vcpo.py``.

Sequence importance weights of the rollout (π_old over the sampler μ), one per trajectory:

    w_i = exp(s_i),   s_i = Σ_t (log π_old(y_t) − log μ(y_t))        (clipped: min(w_i, C))

All functions take (B,) per-trajectory tensors and a ``valid`` mask (B,) bool; float64 inside. The official
code exponentiates s_i in fp32 (inf beyond s ≈ 88); here s is clamped to ±``_LOG_CAP`` in float64 first
[INF: an overflow guard that changes nothing while the official value is finite].
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from steadyrl.ops.masking import masked_sum

_LOG_CAP = 300.0  # exp(2·300) is still finite in float64


def _identity(x: Tensor) -> Tensor:
    return x


def sequence_log_weights(
    old_logprobs: Tensor,  # (B, T) log π_old(y_t)
    rollout_logprobs: Tensor,  # (B, T) log μ(y_t)
    response_mask: Tensor,  # (B, T) bool
) -> Tensor:  # (B,) float64
    """s_i = Σ_t (log π_old − log μ) over the response tokens (the official ``rollout_seq_is`` is exp(s_i))."""
    diff = old_logprobs.detach().double() - rollout_logprobs.detach().double()
    return masked_sum(diff, response_mask, dim=1).clamp(-_LOG_CAP, _LOG_CAP)


def ess_ratio(
    log_weights: Tensor,  # (B,) s_i
    valid: Tensor,  # (B,) bool
    *,
    clip: float | None = None,
    eps: float = 1e-8,
    reduce_sum: Callable[[Tensor], Tensor] = _identity,
) -> Tensor:  # 0-d float64
    """Normalised effective sample size of the sequence weights, over every rank's valid trajectories:

        ρ_ess = ESS / N,   ESS = (Σ_i w_i)² / (Σ_i w_i² + ε)        (official ``compute_ess_info``; ε = 1e-8)

    with w_i = min(exp(s_i), ``clip``) when ``clip`` is given (``ess_scaling.use_clipped``). 0 with no trajectory.
    """
    w = torch.exp(log_weights.double())
    if clip is not None:
        w = w.clamp(max=clip)
    w = torch.where(valid, w, torch.zeros_like(w))
    sums = reduce_sum(torch.stack([w.sum(), (w * w).sum(), valid.double().sum()]))
    ess = sums[0] ** 2 / (sums[1] + eps)
    return torch.where(sums[2] > 0, ess / sums[2].clamp(min=1.0), torch.zeros_like(ess))


def ess_lr_scale(ratio: Tensor, *, base_ess_ratio: float = 1.0, rule: str = "sqrt") -> Tensor:
    """The learning-rate multiplier of one optimizer step (official ``_optimizer_step_with_buffer``):

        m = min(1, ρ_ess / ρ_base)^{1/2}  ("sqrt", for Adam-type optimisers)   or   min(1, ρ_ess / ρ_base)  ("linear")

    ρ_base is floored at 1e-8, as the official code does.
    """
    if rule not in ("sqrt", "linear"):
        raise ValueError(f"VCPO scaling_rule must be 'sqrt' or 'linear', got {rule!r}.")
    m = torch.clamp(ratio / max(float(base_ess_ratio), 1e-8), max=1.0)
    return m.sqrt() if rule == "sqrt" else m


def opob_advantages(
    values: Tensor,  # (B,) R_i (group scope) or the estimator's per-trajectory advantage (mini-batch scope)
    grad_sq_norms: Tensor,  # (B,) ‖g_i‖², g_i = ∇_θ Σ_t ℓ_t(Â = 1) of trajectory i
    log_weights: Tensor,  # (B,) s_i
    valid: Tensor,  # (B,) bool
    group_size: int,
    *,
    scope: str = "group",
    use_is_weights: bool = True,
    clip: float | None = None,
    lengths: Tensor | None = None,  # (B,) response lengths, for ``normalize_by_length``
    norm_by_std: bool = True,
    eps: float = 1e-8,
    reduce_sum: Callable[[Tensor], Tensor] = _identity,
) -> tuple[Tensor, Tensor]:  # (B,) advantages c_i, (B,) baseline b_i
    """Off-policy optimal baseline (OPOB), the per-trajectory coefficients of VCPO's gradient:

        W_i = ‖g_i‖² · w_i² [· 1/L_i²]                        (w_i = exp(s_i), or min(exp(s_i), C))
        b   = Σ_i W_i v_i / (Σ_i W_i + ε)                     over the group of i ("group") or the mini-batch
        c_i = (v_i − b) / σ_g   ("group" with norm_by_std and σ_g > 1e-8),   else  c_i = v_i − b

    v_i is R_i in group scope and the estimator's advantage in mini-batch scope (official
    ``compute_opob_baseline`` / ``_update_grad_buffers``); σ_g is the population std of the group's rewards.
    The gradient Σ_i c_i g_i is then the gradient of the loss with advantage c_i (exactly, for losses linear
    in Â; see stabilisers/vcpo.py). Invalid trajectories get c = 0 and do not enter b.
    """
    if scope not in ("group", "minibatch"):
        raise ValueError(f"VCPO scope must be 'group' or 'minibatch', got {scope!r}.")
    v = torch.where(valid, values.double(), torch.zeros_like(values, dtype=torch.float64))
    weight = grad_sq_norms.double()
    if use_is_weights:
        w = torch.exp(log_weights.double())
        weight = weight * (w.clamp(max=clip) if clip is not None else w) ** 2
    if lengths is not None:
        weight = weight / lengths.double().clamp(min=1.0) ** 2
    weight = torch.where(valid, weight, torch.zeros_like(weight))
    if scope == "minibatch":
        sums = reduce_sum(torch.stack([(weight * v).sum(), weight.sum()]))
        baseline = (sums[0] / (sums[1] + eps)).expand_as(v)
        return torch.where(valid, v - baseline, torch.zeros_like(v)), baseline
    if v.shape[0] % group_size:
        raise ValueError(f"{v.shape[0]} trajectories do not form whole groups of {group_size}.")
    grouped_w, grouped_v, grouped_valid = (x.reshape(-1, group_size) for x in (weight, v, valid))
    baseline = (grouped_w * grouped_v).sum(1, keepdim=True) / (grouped_w.sum(1, keepdim=True) + eps)
    advantages = grouped_v - baseline
    if norm_by_std:
        count = grouped_valid.sum(1, keepdim=True).clamp(min=1)
        mean = grouped_v.sum(1, keepdim=True) / count
        std = torch.sqrt(torch.where(grouped_valid, (grouped_v - mean) ** 2, 0.0).sum(1, keepdim=True) / count)
        advantages = torch.where(std > 1e-8, advantages / std, advantages)
    advantages = torch.where(grouped_valid, advantages, torch.zeros_like(advantages))
    return advantages.reshape(-1), baseline.expand_as(grouped_v).reshape(-1)
