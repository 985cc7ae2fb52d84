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

Options that reproduce the authors' research code (homzer/llama-rlhf, docs/methods/lco.md), all off by
default so the defaults above are unchanged:
    ``vocab_floor``      exp rule: the sampled token's shift is damped to (Â/β)(1 − p)(1 + p/max(1 − p, f)),
                         which is Â/β for p ≤ 1 − f (``estimate_vocab_adv``, f = 0.1)
    ``beta_neg``         exp rule: β for tokens with Â ≤ 0 (the last trainers use 100·β)
    ``min_target_prob``  ratio rule, ρ < 1: move the token only if ρ·p ≥ this (``min_rho_prob`` = 0.8)
    ``max_target_prob``  ratio rule, ρ > 1: cap ρ·p at this (``max_rho_prob`` = 0.99)
    ``sign_balanced``    weight tokens so that Â > 0 and Â ≤ 0 tokens are averaged separately and the two
                         means summed (the code's loss_pos + loss_neg)
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from steadyrl.ops.masking import masked_count, masked_fill_zero, masked_mean
from steadyrl.types import LossInputs, LossResult

PROB_CAP = 1.0 - 1e-4


class _Rule(NamedTuple):
    """The target rule and its options, as the three losses receive them."""

    target: str
    rho_pos: float
    rho_neg: float
    beta: float
    beta_neg: float | None
    vocab_floor: float | None
    min_target_prob: float | None
    max_target_prob: float | None


def ratio_rule_target(
    p_old: Tensor,
    advantages: Tensor,
    *,
    rho_pos: float = 1.8,
    rho_neg: float = 0.9,
    min_target_prob: float | None = None,
    max_target_prob: float | None = None,
) -> Tensor:
    """p' = ρ · p_old with ρ = ρ⁺ (Â > 0) or ρ⁻ (Â < 0); Â = 0 keeps p_old. Capped at 1 − 1e-4.  (B,T) -> (B,T).

    ``max_target_prob`` (ρ > 1): p' = min(ρ p, max).  ``min_target_prob`` (ρ < 1): p' = p_old (no move)
    where ρ p < min, so only confident tokens are pushed down (the research code's 0.99 / 0.8).
    """
    full = lambda v: torch.full_like(p_old, v)  # noqa: E731  (p_old's dtype: Python floats would give float32)
    rho = torch.where(advantages > 0, full(rho_pos), torch.where(advantages < 0, full(rho_neg), full(1.0)))
    target = rho * p_old
    if max_target_prob is not None:
        target = torch.where(rho > 1, target.clamp(max=max_target_prob), target)
    if min_target_prob is not None:
        target = torch.where((rho < 1) & (target < min_target_prob), p_old, target)
    return target.clamp(max=PROB_CAP)


def exp_rule_shift(
    p_old: Tensor, advantages: Tensor, *, beta: float = 1.0, beta_neg: float | None = None, vocab_floor: float | None = None
) -> Tensor:
    """Δz = Â/β_t (β_t = β for Â > 0, ``beta_neg`` (default β) otherwise), damped with ``vocab_floor`` f to
    Δz·(1 − p)(1 + p/max(1 − p, f)): the one-token case of the code's ``estimate_vocab_adv`` + log-softmax
    target, equal to Â/β for p ≤ 1 − f and A(1 − p)(1 + p/f)/β above.  (B,T) -> (B,T)."""
    if beta_neg is None:
        shift = advantages / beta
    else:
        per_token_beta = torch.where(advantages > 0, torch.full_like(advantages, beta), torch.full_like(advantages, beta_neg))
        shift = advantages / per_token_beta
    if vocab_floor is not None:
        p = p_old.clamp(0.0, 1.0)
        shift = shift * (1.0 - p) * (1.0 + p / (1.0 - p).clamp(min=vocab_floor))
    return shift


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


def _target(inputs: LossInputs, rule: _Rule) -> tuple[Tensor, Tensor]:
    """(p' (B,T), Δz (B,T)), both detached."""
    mask = inputs.response_mask
    p_old = torch.exp(masked_fill_zero(inputs.old_logprobs, mask)).detach()
    adv = masked_fill_zero(inputs.advantages, mask).detach()
    if rule.target == "ratio":
        p_target = ratio_rule_target(
            p_old, adv, rho_pos=rule.rho_pos, rho_neg=rule.rho_neg,
            min_target_prob=rule.min_target_prob, max_target_prob=rule.max_target_prob,
        )
        return p_target, logit_shift_for_target(p_old, p_target)
    if rule.target == "exp":
        shift = exp_rule_shift(p_old, adv, beta=rule.beta, beta_neg=rule.beta_neg, vocab_floor=rule.vocab_floor)
        return shifted_probability(p_old, shift), shift
    raise ValueError(f"LCO target={rule.target!r}; valid: 'ratio' (ρ± rule) or 'exp' (exp(Â/β) rule).")


def _weight(inputs: LossInputs, target: str, scale_by_abs_advantage: bool | None, sign_balanced: bool) -> Tensor:
    """|Â| for the ratio rule (its sign already picked ρ); 1 for the exp rule, whose shift carries Â.

    ``sign_balanced``: times N/N₊ on Â > 0 tokens and N/N₋ on the others (N = valid tokens of this call,
    summed over ranks), so that the ``token_mean`` aggregation of one micro-batch gives mean₊ + mean₋.
    """
    scale = (target == "ratio") if scale_by_abs_advantage is None else scale_by_abs_advantage
    mask = inputs.response_mask
    adv = masked_fill_zero(inputs.advantages, mask).detach()
    weight = adv.abs() if scale else torch.ones_like(adv)
    if sign_balanced:
        positive = mask & (adv > 0)
        counts = inputs.reduce_sum(torch.stack([masked_count(mask), masked_count(positive)]).to(adv.dtype))
        total, n_pos = counts[0], counts[1]
        balance = torch.where(positive, total / n_pos.clamp(min=1.0), total / (total - n_pos).clamp(min=1.0))
        weight = weight * balance
    return weight


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
    beta_neg: float | None = None,
    vocab_floor: float | None = None,
    min_target_prob: float | None = None,
    max_target_prob: float | None = None,
    sign_balanced: bool = False,
) -> LossResult:
    """LCO-KLD: w · KL(π' ‖ π_θ) per token, via the exact binary decomposition (module docstring).

    w = |Â| with the ratio rule (Version A, reported ρ⁺ = 1.8, ρ⁻ = 0.9) and 1 with the exp rule (Version B,
    whose β was not recoverable: a required choice [INF]). Exact on-policy; with several updates per batch the
    within-rest drift term is omitted [INF].  The research code's options: module docstring.
    """
    rule = _Rule(target, rho_pos, rho_neg, beta, beta_neg, vocab_floor, min_target_prob, max_target_prob)
    mask = inputs.response_mask
    p_target, _ = _target(inputs, rule)
    kl = binary_kl(p_target, masked_fill_zero(inputs.logprobs, mask))
    loss = masked_fill_zero(_weight(inputs, target, scale_by_abs_advantage, sign_balanced) * kl, mask)
    return LossResult(loss, _metrics(inputs, p_target, kl, "kl"))


def _logit_shift_loss(
    inputs: LossInputs, per_token_fn, name: str, rule: _Rule, scale_by_abs_advantage: bool | None, sign_balanced: bool
) -> LossResult:
    if inputs.token_logits is None or inputs.old_token_logits is None:
        raise ValueError("LCO-MSE / LCO-LCH need the sampled tokens' raw logits (LossInputs.token_logits).")
    mask = inputs.response_mask
    p_target, shift = _target(inputs, rule)
    moved = masked_fill_zero(inputs.token_logits, mask) - masked_fill_zero(inputs.old_token_logits, mask).detach()
    per_token = per_token_fn(masked_fill_zero(moved - shift, mask))
    loss = masked_fill_zero(_weight(inputs, rule.target, scale_by_abs_advantage, sign_balanced) * per_token, mask)
    return LossResult(loss, _metrics(inputs, p_target, per_token, name))


def lco_mse_loss(
    inputs: LossInputs,
    *,
    target: str = "exp",
    rho_pos: float = 1.8,
    rho_neg: float = 0.9,
    beta: float = 1.0,
    scale_by_abs_advantage: bool | None = None,
    beta_neg: float | None = None,
    vocab_floor: float | None = None,
    min_target_prob: float | None = None,
    max_target_prob: float | None = None,
    sign_balanced: bool = False,
) -> LossResult:
    """LCO-MSE: ½ ((z_θ,a − z_old,a) − Δz)² on the sampled token's raw logit (methods.md §3, reading [INF]).

    Only the sampled logit has a target; on-policy the other logits' regression terms are exactly 0 with 0
    gradient, off-policy they are omitted (their old values would need B×T×V memory) [INF].  The research
    code uses torch's MSELoss (no ½: twice this gradient) with its target on sg[z_θ] instead of z_old
    (the same on-policy).  The research code's options: module docstring.
    """
    rule = _Rule(target, rho_pos, rho_neg, beta, beta_neg, vocab_floor, min_target_prob, max_target_prob)
    return _logit_shift_loss(inputs, lambda r: 0.5 * r**2, "mse", rule, scale_by_abs_advantage, sign_balanced)


def lco_lch_loss(
    inputs: LossInputs,
    *,
    target: str = "exp",
    rho_pos: float = 1.8,
    rho_neg: float = 0.9,
    beta: float = 1.0,
    scale_by_abs_advantage: bool | None = None,
    beta_neg: float | None = None,
    vocab_floor: float | None = None,
    min_target_prob: float | None = None,
    max_target_prob: float | None = None,
    sign_balanced: bool = False,
) -> LossResult:
    """LCO-LCH: log cosh((z_θ,a − z_old,a) − Δz), robust to outlying shifts (computed stably).

    The research code's options: module docstring."""
    rule = _Rule(target, rho_pos, rho_neg, beta, beta_neg, vocab_floor, min_target_prob, max_target_prob)
    return _logit_shift_loss(inputs, _log_cosh, "lch", rule, scale_by_abs_advantage, sign_balanced)


def _log_cosh(x: Tensor) -> Tensor:
    """log cosh(x) = |x| + log(1 + e^{−2|x|}) − log 2, without overflow."""
    a = x.abs()
    return a + torch.log1p(torch.exp(-2 * a)) - math.log(2.0)
