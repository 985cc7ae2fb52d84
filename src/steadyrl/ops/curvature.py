"""CAPO: curvature scores of the update each token would cause, and the masks built from them.

Curvature-Aware Policy Optimization (Melo, Abate, Gal; arXiv 2510.00819, ICLR 2026; methods.md §4), read
against the official code (github.com/luckeciano/stable-pg-llm: ``grpo_entropy_trainer.py``,
``sparse_optim_models/``). The "last-layer linear model" treats the final hidden state h_t ∈ R^H as a fixed
feature and the LM head W ∈ R^{V×H} as the only moving parameter, with the softmax restricted to the K
largest logits of each position:

    π_t   = softmax(top-K(W h_t + b))          v_t = e_a − π_t   (e_a = 0 if the sampled a is not in the top-K)
    g_t   = Â_t v_t ⊗ h_t ∈ R^{K×H}            ∇ of Â_t log π_t(a) w.r.t. the K rows of W
    u_t   = the optimizer model's direction for g_t (sgd: g_t; adam / adamw: ``adam_direction``)
    δz_t  = U_t h_t ∈ R^K                      change of the top-K logits per unit learning rate
    s_t   = v_tᵀ δz_t,  and ⟨g_t, u_t⟩ = Â_t s_t because g_t has rank one
    F_t   = diag(π_t) − π_t π_tᵀ,    H_t = Â_t [ s_t² − δz_tᵀ F_t δz_t ]
    m_F   = ½ η² s_t²                          predicted KL(π_old ‖ π_new) of the token (Fisher score)
            or ½ η² δz_tᵀ F_t δz_t             with ``fisher_form="full"`` (see below)
    m_H   = η Â_t s_t + ½ η² H_t               second-order prediction of the token's objective change

η is the current learning rate. For sgd everything factors through h exactly: δz_t = Â_t ‖h_t‖² v_t. For
adam the element-wise √v̂ prevents factoring, so U_t is built explicitly, ``chunk_size`` tokens at a time:
memory O(chunk_size · K · H), never O(B · T · K · H) (the official code builds the whole B×T×K×H tensor).

Sequence and global levels follow the code, which scores the *averaged update* of a group rather than
averaging token scores: the group's gradient row of vocabulary id j is the mean of Â_t v_t[k] h_t over the
group's valid (t, k) with top-K id j; the optimizer model turns it into ū; then δz_t[k] = ū[id]·h_t and
    m_F(group) = ½ η² mean_t s_t²,   m_H(group) = η Σ_j ⟨ḡ_j, ū_j⟩ + ½ η² mean_t H_t
(global: the token means are taken per sequence, then averaged over the sequences of every rank).

Fisher form. The code's m_F uses the *sampled-token* (empirical) Fisher v_t v_tᵀ, whose quadratic form
s_t² = (v_tᵀ δz_t)² is a one-sample estimate of the true Fisher's δz_tᵀ F_t δz_t = E_{a∼π_t}[(e_a − π_t)ᵀ δz_t]².
The second-order expansion of KL(softmax(z) ‖ softmax(z + η δz)) is ½ η² δzᵀ F δz, so ``fisher_form="full"``
predicts the token's KL exactly to second order, while the sampled form over-predicts it for improbable
sampled tokens and under-predicts it for confident ones (tests/ops/test_curvature.py checks both against the
exact KL). ``"sampled"`` (default) is the official code's [CODE]; ``"full"`` (the true Fisher) is an option of steadyrl [INF].

Masks (the code's rule, ``_compute_{fisher,hessian}_token_mask``): keep iff m_F < τ_F and −τ_H < m_H < τ_H
(symmetric) or 0 ≤ m_H < τ_H (not symmetric); τ = 0 switches a criterion off. Theorem 5.1 of the paper instead
*accepts* updates with m_H ≥ δ_H (a lower bound); the released code and its configs bound |m_H| from above
(methods.md §10.4). We implement the code's rule.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

OPTIMIZER_MODELS = ("sgd", "adam", "adamw")
FISHER_FORMS = ("sampled", "full")


def _identity(x: Tensor) -> Tensor:
    return x


class TopKPolicy(NamedTuple):
    ids: Tensor  # (B, T, K) long, vocabulary ids of the K largest logits
    probs: Tensor  # (B, T, K) fp32, π_t: softmax over those K logits
    direction: Tensor  # (B, T, K) fp32, v_t = e_a − π_t
    sampled_in_topk: Tensor  # (B, T) bool


class AdamMoments(NamedTuple):
    """CAPO's own model of the optimizer state, one row per vocabulary id that has been updated."""

    row_of: Tensor  # (V,) long, row of each vocabulary id in the tables, −1 = no state yet
    exp_avg: Tensor  # (M, H) fp32, m
    exp_avg_sq: Tensor  # (M, H) fp32, v
    step: int  # moment updates so far (t; the prospective step uses t + 1)


class CurvatureScores(NamedTuple):
    fisher: Tensor  # m_F: (B, T) token level, (B,) sequence level, () global
    hessian: Tensor  # m_H, same shape


def topk_policy(
    hidden: Tensor,  # (B, T, H) final hidden states predicting token_ids
    lm_head_weight: Tensor,  # (V, H)
    token_ids: Tensor,  # (B, T) long, the sampled tokens
    *,
    top_k: int = 50,
    lm_head_bias: Tensor | None = None,  # (V,)
    chunk_size: int = 1024,
) -> TopKPolicy:
    """π_t = softmax of the K largest logits z = W h + b, and v_t = e_a − π_t, in fp32, chunked over tokens.

    Only ``chunk_size`` × V logits exist at a time. K = min(top_k, V) (the code uses the sampler's top_k,
    50). The sampled token may fall outside the top-K when sampling without top-k; then e_a = 0 and
    v_t = −π_t, as in the code. Differentiable w.r.t. ``hidden`` and the head when grad is enabled.
    """
    batch, length, width = hidden.shape
    k = min(top_k, lm_head_weight.shape[0])
    weight = lm_head_weight if lm_head_weight.dtype == torch.float32 else lm_head_weight.float()
    bias = None if lm_head_bias is None else lm_head_bias.float()
    flat = hidden.reshape(-1, width)
    values, ids = [], []
    for start in range(0, flat.shape[0], max(1, chunk_size)):
        logits = torch.nn.functional.linear(flat[start : start + chunk_size].float(), weight, bias)
        top = logits.topk(k, dim=-1)
        values.append(top.values)
        ids.append(top.indices)
    top_values = torch.cat(values) if values else flat.new_zeros((0, k), dtype=torch.float32)
    top_ids = torch.cat(ids) if ids else torch.zeros((0, k), dtype=torch.long, device=flat.device)
    probs = torch.softmax(top_values, dim=-1)
    hit = top_ids == token_ids.reshape(-1, 1)
    direction = hit.to(probs.dtype) - probs
    shape = (batch, length, k)
    return TopKPolicy(
        top_ids.view(shape), probs.view(shape), direction.view(shape), hit.any(-1).view(batch, length)
    )


def adam_direction(
    grad: Tensor,  # (..., H) gradient rows
    exp_avg: Tensor,  # (..., H) m of the same rows (0 where an id has no state)
    exp_avg_sq: Tensor,  # (..., H) v
    step: int,
    *,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
) -> Tensor:  # (..., H)
    """Prospective Adam direction, read-only (``SparseAdamModel.batch_compute_effective_token_gradients``).

    m' = β₁ m + (1 − β₁) g,  v' = β₂ v + (1 − β₂) g²,  u = (m' / (1 − β₁^{t+1})) / (√(v' / (1 − β₂^{t+1})) + ε)
    """
    t = step + 1
    first = (beta1 * exp_avg + (1.0 - beta1) * grad) / (1.0 - beta1**t)
    second = (beta2 * exp_avg_sq + (1.0 - beta2) * grad * grad) / (1.0 - beta2**t)
    return first / (second.sqrt() + eps)


def adam_moment_update(
    exp_avg: Tensor,  # (n, H)
    exp_avg_sq: Tensor,  # (n, H)
    grad: Tensor,  # (n, H) mean LM-head gradient rows of the step
    *,
    beta1: float = 0.9,
    beta2: float = 0.999,
) -> tuple[Tensor, Tensor]:
    """m ← β₁ m + (1 − β₁) g,  v ← β₂ v + (1 − β₂) g²  (``update_effective_gradient_moments``; rows not in
    the step's gradient are left alone, not decayed)."""
    return beta1 * exp_avg + (1.0 - beta1) * grad, beta2 * exp_avg_sq + (1.0 - beta2) * grad * grad


def curvature_keep(
    fisher: Tensor,  # m_F, any shape
    hessian: Tensor,  # m_H, same shape
    *,
    fisher_tau: float,
    hessian_tau: float,
    hessian_symmetric: bool = True,
) -> tuple[Tensor, Tensor]:  # (keep by m_F, keep by m_H), bool
    """keep_F = m_F < τ_F;  keep_H = −τ_H < m_H < τ_H (symmetric) or 0 ≤ m_H < τ_H.  τ = 0: criterion off.

    NaN scores are rejected (comparisons with NaN are false)."""
    keep_fisher = fisher < fisher_tau if fisher_tau != 0.0 else torch.ones_like(fisher, dtype=torch.bool)
    if hessian_tau == 0.0:
        keep_hessian = torch.ones_like(hessian, dtype=torch.bool)
    elif hessian_symmetric:
        keep_hessian = (hessian < hessian_tau) & (hessian > -hessian_tau)
    else:
        keep_hessian = (hessian < hessian_tau) & (hessian >= 0.0)
    return keep_fisher, keep_hessian


# ----------------------------------------------------------------------------- shared pieces


def _valid_advantages(advantages: Tensor, mask: Tensor | None) -> Tensor:
    adv = advantages.float()
    return adv if mask is None else torch.where(mask, adv, torch.zeros_like(adv))


def _valid_rows(hidden: Tensor, direction: Tensor, advantages: Tensor, mask: Tensor):
    """(N, H) hidden, (N, K) Â_t v_t, (N,) valid with masked tokens zeroed by selection (they may hold NaN)."""
    width, k = hidden.shape[-1], direction.shape[-1]
    valid = mask.reshape(-1)
    h = hidden.reshape(-1, width).float()
    h = torch.where(valid.unsqueeze(-1), h, torch.zeros_like(h))
    coef = advantages.float().reshape(-1, 1) * direction.reshape(-1, k)
    return h, torch.where(valid.unsqueeze(-1), coef, torch.zeros_like(coef)), valid


def _gather_rows(table: Tensor, rows: Tensor) -> Tensor:  # rows (...) long, −1 = zero row
    picked = table[rows.clamp(min=0)]
    return torch.where((rows >= 0).unsqueeze(-1), picked, torch.zeros_like(picked))


def _has_moments(moments: AdamMoments | None) -> bool:
    # The code falls back to u = g while its moment dict is empty (densify returns None).
    return moments is not None and moments.exp_avg.shape[0] > 0


class _Model(NamedTuple):
    kind: str  # sgd | adam | adamw
    moments: AdamMoments | None
    weight: Tensor | None  # (V, H) fp32, adamw's decay
    beta1: float
    beta2: float
    eps: float
    weight_decay: float


def _make_model(kind, moments, lm_head_weight, beta1, beta2, eps, weight_decay) -> _Model:
    if kind not in OPTIMIZER_MODELS:
        raise ValueError(f"optimizer_model must be one of {', '.join(OPTIMIZER_MODELS)}, got {kind!r}.")
    decays = kind == "adamw" and weight_decay != 0.0
    if decays and lm_head_weight is None:
        raise ValueError("optimizer_model='adamw' with weight decay needs lm_head_weight.")
    weight = lm_head_weight.float() if decays else None
    return _Model(kind, moments, weight, beta1, beta2, eps, weight_decay if decays else 0.0)


def _direction(grad: Tensor, vocab_ids: Tensor, model: _Model) -> Tensor:  # (..., H), (...) -> (..., H)
    if model.kind == "sgd":
        return grad
    if _has_moments(model.moments):
        rows = model.moments.row_of[vocab_ids]
        m = _gather_rows(model.moments.exp_avg, rows).to(grad.dtype)
        v = _gather_rows(model.moments.exp_avg_sq, rows).to(grad.dtype)
        grad = adam_direction(
            grad, m, v, model.moments.step, beta1=model.beta1, beta2=model.beta2, eps=model.eps
        )
    if model.weight_decay != 0.0:
        # [INF] The official SparseAdamWModel raises NotImplementedError. Decoupled decay W ← W − ηλW adds
        # −λ W (on the K rows) to the ascent direction.
        grad = grad - model.weight_decay * model.weight[vocab_ids]
    return grad


def _logit_change_terms(
    delta_logits: Tensor,  # (N, K) δz
    probs: Tensor,  # (N, K)
    direction: Tensor,  # (N, K)
    advantages: Tensor,  # (N,)
) -> tuple[Tensor, Tensor, Tensor]:  # s_t (N,), H_t (N,), δz_tᵀ F_t δz_t (N,)
    s = (direction * delta_logits).sum(-1)
    mean_shift = (probs * delta_logits).sum(-1)
    fisher_form = (probs * delta_logits * delta_logits).sum(-1) - mean_shift * mean_shift  # δzᵀ F δz
    return s, advantages * (s * s - fisher_form), fisher_form


def _fisher_quadratic(s: Tensor, true_form: Tensor, fisher_form: str) -> Tensor:
    """s² (the sampled-token Fisher, the code's) or δzᵀ F δz (the true Fisher), per token."""
    if fisher_form not in FISHER_FORMS:
        raise ValueError(f"fisher_form must be one of {', '.join(FISHER_FORMS)}, got {fisher_form!r}.")
    return s * s if fisher_form == "sampled" else true_form


# ----------------------------------------------------------------------------- token level


def _chunk_logit_change(h: Tensor, ids: Tensor, direction: Tensor, adv: Tensor, model: _Model) -> Tensor:
    grad = (adv.unsqueeze(-1) * direction).unsqueeze(-1) * h.unsqueeze(1)  # (c, K, H) = Â v ⊗ h
    return torch.einsum("ckh,ch->ck", _direction(grad, ids, model), h)  # δz = U h


def _chunk_logit_change_in_place(h: Tensor, ids: Tensor, direction: Tensor, adv: Tensor, model: _Model) -> Tensor:
    """``_chunk_logit_change`` for adam / adamw with moments, without autograd: the same formula
    (``adam_direction``, then −λ W), computed in place in three (c, K, H) buffers instead of about twenty
    temporaries; several times faster on CPU (benchmarks/overhead.py)."""
    moments = model.moments
    t = moments.step + 1
    bias1, bias2 = 1.0 - model.beta1**t, 1.0 - model.beta2**t
    rows = moments.row_of[ids]  # (c, K)
    no_state = (rows < 0).unsqueeze(-1)
    rows = rows.clamp(min=0)
    grad = (adv.unsqueeze(-1) * direction).unsqueeze(-1) * h.unsqueeze(1)  # (c, K, H) = Â v ⊗ h
    first = moments.exp_avg[rows].to(grad.dtype).masked_fill_(no_state, 0.0)
    second = moments.exp_avg_sq[rows].to(grad.dtype).masked_fill_(no_state, 0.0)
    # u = ((β₁ m + (1 − β₁) g) / (1 − β₁ᵗ)) / (√((β₂ v + (1 − β₂) g²) / (1 − β₂ᵗ)) + ε)
    second.mul_(model.beta2 / bias2).addcmul_(grad, grad, value=(1.0 - model.beta2) / bias2).sqrt_().add_(model.eps)
    first.mul_(model.beta1 / bias1).add_(grad, alpha=(1.0 - model.beta1) / bias1).div_(second)
    if model.weight_decay != 0.0:
        first.sub_(model.weight[ids], alpha=model.weight_decay)  # see _direction
    return torch.einsum("ckh,ch->ck", first, h)  # δz = U h


def token_curvature_scores(
    hidden: Tensor,  # (B, T, H)
    topk: TopKPolicy,
    advantages: Tensor,  # (B, T) Â_t
    lr: float,
    *,
    mask: Tensor | None = None,  # (B, T) bool; masked advantages count as 0 (they may hold NaN)
    optimizer_model: str = "sgd",
    moments: AdamMoments | None = None,
    lm_head_weight: Tensor | None = None,  # (V, H), adamw's decay only
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    chunk_size: int = 128,
    fisher_form: str = "sampled",
) -> CurvatureScores:  # (B, T) each
    """Per-token m_F and m_H (module docstring) under the optimizer model ``sgd`` | ``adam`` | ``adamw``;
    ``fisher_form`` "sampled" (the code's s_t²) or "full" (δz_tᵀ F_t δz_t) for m_F.

    sgd (and adam before any moment exists, where u_t = g_t): exact factoring, δz_t = Â_t ‖h_t‖² v_t.
    adam / adamw: U_t is formed ``chunk_size`` tokens at a time from the moment rows of the token's K ids
    (ids without state use m = v = 0, as the code). With grad enabled each chunk is checkpointed, so a
    differentiable soft penalty costs O(chunk_size · K · H) memory too.
    """
    model = _make_model(optimizer_model, moments, lm_head_weight, beta1, beta2, eps, weight_decay)
    batch, length, width = hidden.shape
    k = topk.ids.shape[-1]
    h = hidden.reshape(-1, width).float()
    adv = _valid_advantages(advantages, mask).reshape(-1)
    direction, probs, ids = topk.direction.reshape(-1, k), topk.probs.reshape(-1, k), topk.ids.reshape(-1, k)
    if model.kind == "sgd" or (not _has_moments(moments) and model.weight_decay == 0.0):
        delta = (adv * (h * h).sum(-1)).unsqueeze(-1) * direction  # u = g: δz = Â ‖h‖² v exactly
    else:
        grad_on = torch.is_grad_enabled() and (h.requires_grad or direction.requires_grad)
        in_place = not grad_on and _has_moments(moments)
        pieces = []
        for start in range(0, h.shape[0], max(1, chunk_size)):
            sl = slice(start, start + chunk_size)
            args = (h[sl], ids[sl], direction[sl], adv[sl], model)
            if grad_on:
                pieces.append(checkpoint(_chunk_logit_change, *args, use_reentrant=False))
            elif in_place:
                pieces.append(_chunk_logit_change_in_place(*args))
            else:
                pieces.append(_chunk_logit_change(*args))
        delta = torch.cat(pieces) if pieces else direction.new_zeros(direction.shape)
    s, hess, true_form = _logit_change_terms(delta, probs, direction, adv)
    fisher = 0.5 * lr**2 * _fisher_quadratic(s, true_form, fisher_form)
    hessian = lr * adv * s + 0.5 * lr**2 * hess
    return CurvatureScores(fisher.view(batch, length), hessian.view(batch, length))


# ----------------------------------------------------------------------------- group levels


def vocab_gradient_sums(
    hidden: Tensor,  # (B, T, H)
    topk: TopKPolicy,
    advantages: Tensor,  # (B, T)
    mask: Tensor,  # (B, T) bool, the tokens that count
    vocab_size: int,
    *,
    chunk_size: int = 128,
    out: tuple[Tensor, Tensor] | None = None,  # (V, H) sums and (V,) counts to accumulate into, in place
) -> tuple[Tensor, Tensor]:  # sums (V, H) fp32, counts (V,) fp32
    """Σ over valid (t, k) with ids[t, k] = j of Â_t v_t[k] h_t, and the number of such (t, k), per id j.

    sums / counts is the code's batch-mean LM-head gradient per vocabulary id (``_sparsify_global_gradients``
    → ``update_effective_gradient_moments``): a mean over the tokens whose top-K holds j, not over all tokens.
    """
    width = hidden.shape[-1]
    k = topk.ids.shape[-1]
    if out is None:
        sums = torch.zeros(vocab_size, width, dtype=torch.float32, device=hidden.device)
        counts = torch.zeros(vocab_size, dtype=torch.float32, device=hidden.device)
    else:
        sums, counts = out
    h, coef, valid = _valid_rows(hidden, topk.direction, advantages, mask)  # coef (N, K) = Â_t v_t
    ids = topk.ids.reshape(-1, k)
    for start in range(0, h.shape[0], max(1, chunk_size)):
        sl = slice(start, start + chunk_size)
        rows = coef[sl].unsqueeze(-1) * h[sl].unsqueeze(1)  # (c, K, H)
        sums.index_add_(0, ids[sl].reshape(-1), rows.reshape(-1, width))
    counts.index_add_(0, ids.reshape(-1), valid.unsqueeze(-1).expand(-1, k).reshape(-1).float())
    return sums, counts


def _shared_update_terms(h, topk, adv, valid, update, row_index, chunk_size):
    """s_t and H_t when every token of a group moves by the group's update rows (U, H); row_index (N, K)."""
    k = topk.ids.shape[-1]
    pieces = []
    for start in range(0, h.shape[0], max(1, chunk_size)):
        sl = slice(start, start + chunk_size)
        pieces.append(torch.einsum("ckh,ch->ck", update[row_index[sl]], h[sl]))
    delta = torch.cat(pieces) if pieces else h.new_zeros((0, k))
    delta = torch.where(valid.unsqueeze(-1), delta, torch.zeros_like(delta))
    return _logit_change_terms(delta, topk.probs.reshape(-1, k), topk.direction.reshape(-1, k), adv)


def group_curvature_scores(
    hidden: Tensor,  # (B, T, H)
    topk: TopKPolicy,
    advantages: Tensor,  # (B, T)
    mask: Tensor,  # (B, T) bool
    lr: float,
    *,
    level: str,  # "sequence" | "global"
    optimizer_model: str = "sgd",
    moments: AdamMoments | None = None,
    lm_head_weight: Tensor | None = None,  # (V, H); its row count is V
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    chunk_size: int = 128,
    reduce_sum: Callable[[Tensor], Tensor] = _identity,
    fisher_form: str = "sampled",
) -> CurvatureScores:  # (B,) for "sequence", () for "global"
    """Scores of a group's averaged update (module docstring), per sequence or for the whole batch.

    ``sequence`` groups by (sequence, id) with ``torch.unique`` (one host sync; memory O(#pairs · H)).
    ``global`` accumulates dense (V, H) sums and sums them over ranks with ``reduce_sum`` (an LM-head-sized
    all-reduce), so every rank takes the same decision. A sequence without valid tokens scores 0 and does not
    count in the global mean (the code averages it in as 0) [INF].
    """
    if level not in ("sequence", "global"):
        raise ValueError(f"level must be 'sequence' or 'global', got {level!r}.")
    if lm_head_weight is None:
        raise ValueError("group_curvature_scores needs lm_head_weight (for V and adamw's decay).")
    model = _make_model(optimizer_model, moments, lm_head_weight, beta1, beta2, eps, weight_decay)
    batch, length, width = hidden.shape
    vocab = lm_head_weight.shape[0]
    k = topk.ids.shape[-1]
    h, coef, valid = _valid_rows(hidden, topk.direction, advantages, mask)
    adv = _valid_advantages(advantages, mask).reshape(-1)
    ids = topk.ids.reshape(-1, k)
    if level == "global":
        sums, counts = vocab_gradient_sums(hidden, topk, advantages, mask, vocab, chunk_size=chunk_size)
        sums, counts = reduce_sum(sums), reduce_sum(counts)
        mean = sums / counts.clamp(min=1.0).unsqueeze(-1)
        update = _direction(mean, torch.arange(vocab, device=h.device), model)
        update = torch.where((counts > 0).unsqueeze(-1), update, torch.zeros_like(update))
        grad_dot = (mean * update).sum()
        row_index = ids
    else:
        seq = torch.arange(batch, device=h.device).repeat_interleave(length)
        keys = torch.where(
            valid.unsqueeze(-1), seq.unsqueeze(-1) * vocab + ids, batch * vocab
        )  # invalid: sentinel
        unique, inverse = torch.unique(keys, return_inverse=True)
        sums = torch.zeros(unique.numel(), width, dtype=torch.float32, device=h.device)
        for start in range(0, h.shape[0], max(1, chunk_size)):
            sl = slice(start, start + chunk_size)
            rows = coef[sl].unsqueeze(-1) * h[sl].unsqueeze(1)
            sums.index_add_(0, inverse[sl].reshape(-1), rows.reshape(-1, width))
        counts = torch.bincount(inverse.reshape(-1), minlength=unique.numel()).float()
        mean = sums / counts.clamp(min=1.0).unsqueeze(-1)
        update = _direction(mean, unique.remainder(vocab), model)
        per_key = torch.where(unique < batch * vocab, (mean * update).sum(-1), torch.zeros_like(counts))
        grad_dot = torch.zeros(batch + 1, dtype=torch.float32, device=h.device)
        grad_dot = grad_dot.index_add_(0, torch.div(unique, vocab, rounding_mode="floor"), per_key)[:batch]
        row_index = inverse
    s, hess, true_form = _shared_update_terms(h, topk, adv, valid, update, row_index, chunk_size)
    quad = _fisher_quadratic(s, true_form, fisher_form)
    n = valid.view(batch, length).sum(-1).float()
    seq_fisher = torch.where(valid, quad, torch.zeros_like(s)).view(batch, length).sum(-1) / n.clamp(min=1.0)
    seq_hess = torch.where(valid, hess, torch.zeros_like(hess)).view(batch, length).sum(-1) / n.clamp(min=1.0)
    if level == "sequence":
        return CurvatureScores(0.5 * lr**2 * seq_fisher, lr * grad_dot + 0.5 * lr**2 * seq_hess)
    totals = reduce_sum(torch.stack([seq_fisher.sum(), seq_hess.sum(), (n > 0).sum().float()]))
    num_seqs = totals[2].clamp(min=1.0)
    return CurvatureScores(
        0.5 * lr**2 * totals[0] / num_seqs, lr * grad_dot + 0.5 * lr**2 * totals[1] / num_seqs
    )
