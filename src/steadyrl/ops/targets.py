"""LCO — Logits Convex Optimization (arXiv 2603.00963; ICLR'26 submission "Smooth Gradients, Stable Learning").

methods.md §3. Instead of a policy-gradient surrogate, regress π_θ onto a target distribution π' built from
π_old by shifting only the sampled token's logit by Δz; every other token keeps its old relative probability.
The loss is convex in the logits and its logit-gradient π_θ − π' vanishes at the target.

Two target rules (both from methods.md §3(b)):
    ratio rule (Version A):  p' = ρ · p_old,  ρ = ρ⁺ if Â > 0, ρ⁻ if Â < 0   (ρ⁺ = 1.8, ρ⁻ = 0.9)
                             e^{Δz} = ρ (1 − p_old) / (1 − ρ p_old)  (p' capped below 1)
    exp rule    (Version B): Δz = Â / β   (z* = z_old + Â/β on the sampled token; π* ∝ π_old · exp(A/β))
and p' = p e^{Δz} / (1 − p + p e^{Δz}) for a one-logit shift.

Losses per token (to minimise), scaled by |Â| for the ratio rule as in Version A (the sign of Â picks ρ):
    kld:  KL(π' ‖ π_θ)                       (soft-target cross-entropy minus the target's entropy)
    mse:  ½ ((z_θ,a − z_old,a) − Δz)²        (sampled-token logit shift)
    lch:  log cosh((z_θ,a − z_old,a) − Δz)

Computing KL(π' ‖ π_θ) without the B×T×V distributions. Because π' keeps π_old's shape inside the "rest"
(all tokens but the sampled one), the KL splits exactly into
    KL(π' ‖ π_θ) = KL_bin(p' ‖ p_θ) + (1 − p') · KL(π_old(·|rest) ‖ π_θ(·|rest)),
with KL_bin the KL between Bernoulli(p') and Bernoulli(p_θ(a)). On-policy (one update per batch, π_old = π_θ
at the point where the gradient is taken) the second term and its gradient are exactly 0, so the loss below is
exact and needs only log π_θ(a) and log π_old(a). With several updates per batch the within-rest drift term is
omitted [INF]: a documented approximation that keeps memory at O(B·T) instead of keeping old B×T×V
distributions. Gradient w.r.t. the logits of the binary part: π_θ − π'' where π'' is the target built from
π_θ's own rest distribution.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from steadyrl.ops.masking import masked_fill_zero, masked_mean
from steadyrl.types import LossInputs, LossResult

PROB_CAP = 1.0 - 1e-4


def ratio_rule_target(p_old: Tensor, advantages: Tensor, *, rho_pos: float = 1.8, rho_neg: float = 0.9) -> Tensor:
    """p' = ρ · p_old with ρ = ρ⁺ (Â > 0) or ρ⁻ (Â < 0); Â = 0 keeps p_old. Capped at 1 − 1e-4.  (B,T) -> (B,T)."""
    rho = torch.where(advantages > 0, rho_pos, torch.where(advantages < 0, rho_neg, 1.0))
    return (rho * p_old).clamp(max=PROB_CAP)


def shifted_probability(p_old: Tensor, logit_shift: Tensor) -> Tensor:
    """p' = p e^{Δz} / (1 − p + p e^{Δz}): the sampled token's probability after shifting its logit by Δz.

    Computed as sigmoid(logit(p) + Δz) so that large |Δz| saturates instead of overflowing.
    """
    p = p_old.clamp(1e-12, PROB_CAP)
    return torch.sigmoid(torch.log(p) - torch.log1p(-p) + logit_shift).clamp(max=PROB_CAP)


def logit_shift_for_target(p_old: Tensor, p_target: Tensor) -> Tensor:
    """Δz such that shifting the sampled logit turns p_old into p_target: e^{Δz} = p'(1−p) / (p(1−p'))."""
    p = p_old.clamp(1e-12, PROB_CAP)
    q = p_target.clamp(1e-12, PROB_CAP)
    return torch.log(q) - torch.log1p(-q) - torch.log(p) + torch.log1p(-p)


def binary_kl(p_target: Tensor, logprobs: Tensor) -> Tensor:
    """KL(Bernoulli(p') ‖ Bernoulli(p_θ)) from p' (detached) and log p_θ (with gradient).  (B,T) -> (B,T)."""
    q = p_target.clamp(1e-12, PROB_CAP)
    logp = logprobs.clamp(max=-1e-7)  # log p_θ < 0 so that log(1 − p_θ) is finite
    log1m_p = torch.log(-torch.expm1(logp))
    return q * (torch.log(q) - logp) + (1 - q) * (torch.log1p(-q) - log1m_p)


def _target(inputs: LossInputs, target: str, rho_pos: float, rho_neg: float, beta: float) -> tuple[Tensor, Tensor]:
    """(p' (B,T), Δz (B,T)), both detached."""
    mask = inputs.response_mask
    p_old = torch.exp(masked_fill_zero(inputs.old_logprobs, mask)).detach()
    adv = masked_fill_zero(inputs.advantages, mask).detach()
    if target == "ratio":
        p_target = ratio_rule_target(p_old, adv, rho_pos=rho_pos, rho_neg=rho_neg)
        return p_target, logit_shift_for_target(p_old, p_target)
    if target == "exp":
        shift = adv / beta
        return shifted_probability(p_old, shift), shift
    raise ValueError(f"LCO target={target!r}; valid: 'ratio' (ρ± rule) or 'exp' (exp(Â/β) rule).")


def _weight(inputs: LossInputs, target: str, scale_by_abs_advantage: bool | None) -> Tensor:
    """|Â| for the ratio rule (its sign already picked ρ); 1 for the exp rule, whose shift carries Â."""
    scale = (target == "ratio") if scale_by_abs_advantage is None else scale_by_abs_advantage
    adv = masked_fill_zero(inputs.advantages, inputs.response_mask).detach()
    return adv.abs() if scale else torch.ones_like(adv)


def _metrics(inputs: LossInputs, p_target: Tensor, per_token: Tensor, name: str) -> dict[str, Tensor]:
    mask = inputs.response_mask
    p_now = torch.exp(masked_fill_zero(inputs.logprobs.detach(), mask))
    return {
        "lco/target_prob": masked_mean(p_target, mask),
        "lco/policy_prob": masked_mean(p_now, mask),
        "lco/target_gap": masked_mean((p_target - p_now).abs(), mask),
        f"lco/{name}": masked_mean(per_token.detach(), mask),
    }


def lco_kld_loss(
    inputs: LossInputs,
    *,
    target: str = "ratio",
    rho_pos: float = 1.8,
    rho_neg: float = 0.9,
    beta: float = 1.0,
    scale_by_abs_advantage: bool | None = None,
) -> LossResult:
    """LCO-KLD: w · KL(π' ‖ π_θ) per token, via the exact binary decomposition (module docstring).

    w = |Â| with the ratio rule (Version A, reported ρ⁺ = 1.8, ρ⁻ = 0.9) and 1 with the exp rule (Version B,
    whose β was not recoverable: a required choice [INF]). Exact on-policy; with several updates per batch the
    within-rest drift term is omitted [INF].
    """
    mask = inputs.response_mask
    p_target, _ = _target(inputs, target, rho_pos, rho_neg, beta)
    kl = binary_kl(p_target, masked_fill_zero(inputs.logprobs, mask))
    loss = masked_fill_zero(_weight(inputs, target, scale_by_abs_advantage) * kl, mask)
    return LossResult(loss, _metrics(inputs, p_target, kl, "kl"))


def _logit_shift_residual(inputs: LossInputs, target: str, rho_pos: float, rho_neg: float, beta: float) -> tuple[Tensor, Tensor]:
    if inputs.token_logits is None or inputs.old_token_logits is None:
        raise ValueError("LCO-MSE / LCO-LCH need the sampled tokens' raw logits (LossInputs.token_logits).")
    mask = inputs.response_mask
    p_target, shift = _target(inputs, target, rho_pos, rho_neg, beta)
    moved = masked_fill_zero(inputs.token_logits, mask) - masked_fill_zero(inputs.old_token_logits, mask).detach()
    return masked_fill_zero(moved - shift, mask), p_target


def _logit_shift_loss(
    inputs: LossInputs,
    per_token_fn,
    name: str,
    target: str,
    rho_pos: float,
    rho_neg: float,
    beta: float,
    scale_by_abs_advantage: bool | None,
) -> LossResult:
    residual, p_target = _logit_shift_residual(inputs, target, rho_pos, rho_neg, beta)
    per_token = per_token_fn(residual)
    loss = masked_fill_zero(_weight(inputs, target, scale_by_abs_advantage) * per_token, inputs.response_mask)
    return LossResult(loss, _metrics(inputs, p_target, per_token, name))


def lco_mse_loss(
    inputs: LossInputs,
    *,
    target: str = "exp",
    rho_pos: float = 1.8,
    rho_neg: float = 0.9,
    beta: float = 1.0,
    scale_by_abs_advantage: bool | None = None,
) -> LossResult:
    """LCO-MSE: ½ ((z_θ,a − z_old,a) − Δz)² on the sampled token's raw logit (methods.md §3, reading [INF]).

    Only the sampled logit has a target; on-policy the other logits' regression terms are exactly 0 with 0
    gradient, off-policy they are omitted (their old values would need B×T×V memory) [INF].
    """
    return _logit_shift_loss(inputs, lambda r: 0.5 * r**2, "mse", target, rho_pos, rho_neg, beta, scale_by_abs_advantage)


def lco_lch_loss(
    inputs: LossInputs,
    *,
    target: str = "exp",
    rho_pos: float = 1.8,
    rho_neg: float = 0.9,
    beta: float = 1.0,
    scale_by_abs_advantage: bool | None = None,
) -> LossResult:
    """LCO-LCH: log cosh((z_θ,a − z_old,a) − Δz), robust to outlying shifts (computed stably)."""
    return _logit_shift_loss(inputs, _log_cosh, "lch", target, rho_pos, rho_neg, beta, scale_by_abs_advantage)


def _log_cosh(x: Tensor) -> Tensor:
    """log cosh(x) = |x| + log(1 + e^{−2|x|}) − log 2, without overflow."""
    a = x.abs()
    return a + torch.log1p(torch.exp(-2 * a)) - math.log(2.0)
