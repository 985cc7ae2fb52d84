"""Per-token log-probabilities (and entropy) of the sampled tokens without full-batch fp32 logits.

The LM head turns (B, T, H) hidden states into (B, T, V) logits; with V ≈ 150k and B·T ≈ 16k tokens one fp32
copy is ≈ 10 GB, and autograd would keep it (plus the log-softmax) for backward. ``logprobs_from_hidden``
instead walks the B·T tokens in chunks: each chunk's logits are computed in fp32, reduced to one log-prob
(and, optionally, one entropy) per token, and dropped; the chunk runs under
``torch.utils.checkpoint(use_reentrant=False)``, so backward recomputes the chunk's logits rather than
keeping them. Peak extra memory is O(chunk_size · V) (plus one fp32 copy of the LM-head weight when it is
stored in lower precision), not O(B · T · V).

Precision: logits are z = (h W^T + b) / τ computed from fp32 upcasts of h and W ("FP32 LM head",
methods.md §8.13: a bf16 LM head is itself a source of training–inference mismatch). On GPUs, whether that
fp32 matmul uses TF32 follows ``torch.backends.cuda.matmul.allow_tf32``, the caller's global choice.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from steadyrl.ops.diagnostics import entropy_fp32
from steadyrl.ops.support import truncate

__all__ = ["logprobs_from_hidden", "selective_log_softmax"]


def selective_log_softmax(
    logits: Tensor,  # (N, V) any float dtype
    ids: Tensor,  # (N,) long, indices into V
    *,
    chunk_size: int = 1024,
) -> Tensor:  # (N,) fp32 (fp64 for fp64 logits)
    """log softmax(z)[id] = z_id − logsumexp(z), row by row, in fp32 (or fp64 when given fp64).

    Stable (logsumexp subtracts the row max), and never builds the (N, V) log-softmax: only the gathered
    logit and the row's normaliser are kept. Rows are upcast to fp32 ``chunk_size`` at a time, so a bf16
    input never has a full fp32 copy. Differentiable w.r.t. ``logits``.
    """
    if logits.dim() != 2 or ids.shape != logits.shape[:1]:
        raise ValueError(
            f"expected logits (N, V) and ids (N,), got {tuple(logits.shape)} and {tuple(ids.shape)}."
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
    ids = ids.long().unsqueeze(-1)
    if logits.shape[0] <= chunk_size:
        return _selective_fp32(_upcast(logits), ids)
    pieces = [
        _selective_fp32(_upcast(logits[start : start + chunk_size]), ids[start : start + chunk_size])
        for start in range(0, logits.shape[0], chunk_size)
    ]
    return torch.cat(pieces)


def _upcast(x: Tensor) -> Tensor:
    """fp32 for bf16 / fp16 inputs (differentiably); fp32 and fp64 pass through."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _selective_fp32(logits: Tensor, ids: Tensor) -> Tensor:
    return logits.gather(-1, ids).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def _chunk_logprobs(
    hidden: Tensor,  # (n, H)
    weight: Tensor,  # (V, H) fp32
    bias: Tensor | None,  # (V,) fp32
    ids: Tensor,  # (n, 1) long
    temperature: float,
    compute_entropy: bool,
    compute_sum_pi_squared: bool = False,
    top_k: int = 0,
    top_p: float = 1.0,
    entropy_grad: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # (n,) log-probs, entropy, logits, Σπ² (the last two empty when not asked)
    logits = torch.nn.functional.linear(_upcast(hidden).to(weight.dtype), weight, bias)
    if temperature != 1.0:
        logits = logits / temperature
    token_logits = logits.gather(-1, ids).squeeze(-1)  # the raw logit, before any truncation
    logits = truncate(logits, top_k, top_p)
    log_normaliser = torch.logsumexp(logits, dim=-1)
    logprobs = token_logits - log_normaliser
    # An entropy with gradient (an entropy bonus) is part of the graph, so backward recomputes it too.
    entropy = entropy_fp32(logits) if compute_entropy and entropy_grad else logits.new_empty(0)
    # After the log-prob on purpose: non-reentrant checkpoint stops its recomputation once every saved
    # tensor is back, so backward never redoes these no-grad statistics.
    with torch.no_grad():
        if compute_entropy and not entropy_grad:
            entropy = entropy_fp32(logits.detach())
        if compute_sum_pi_squared:
            # Σ_v π_v² = exp(logsumexp(2z) − 2 logsumexp(z)): one more (n, V) pass, nothing kept
            sum_pi_squared = torch.exp(torch.logsumexp(2.0 * logits.detach(), dim=-1) - 2.0 * log_normaliser.detach())
        else:
            sum_pi_squared = logits.new_empty(0)
    return logprobs, entropy, token_logits, sum_pi_squared


def logprobs_from_hidden(
    hidden: Tensor,  # (B, T, H) final hidden states at the positions that predict target_ids
    lm_head_weight: Tensor,  # (V, H)
    target_ids: Tensor,  # (B, T) long, the sampled tokens
    *,
    lm_head_bias: Tensor | None = None,  # (V,)
    temperature: float = 1.0,
    chunk_size: int = 1024,
    compute_entropy: bool = False,
    return_token_logits: bool = False,
    compute_sum_pi_squared: bool = False,
    top_k: int = 0,
    top_p: float = 1.0,
    entropy_grad: bool = False,
) -> tuple[Tensor, ...]:  # log π(y_t) (B, T) fp32; entropy (B, T) fp32 detached, or None; [token logits]; [Σπ²]
    """log π(y_t) = log softmax((W h_t + b) / τ)[y_t] for every position, chunked over the B·T tokens.

    ``hidden[b, t]`` must be the state that predicts ``target_ids[b, t]`` (i.e. already shifted by one).
    τ = ``temperature`` must match the sampler's so that π and μ describe the same distribution.
    Gradients flow to ``hidden``, ``lm_head_weight`` and ``lm_head_bias`` and equal those of the unchunked
    computation; each chunk of ``chunk_size`` tokens is checkpointed, so its (chunk_size, V) logits are
    recomputed in backward instead of stored. With ``compute_entropy`` the full-vocabulary entropy
    H_t = −Σ_v π_v log π_v of the same temperature-scaled distribution is returned too, detached.
    Masked positions are computed like any other (ids must be valid indices there, e.g. the pad id).
    With ``return_token_logits`` a third output holds the sampled tokens' raw (temperature-scaled) logits
    z_t[y_t], with gradient (LCO's logit regression needs them).
    With ``compute_sum_pi_squared`` a last output holds Σ_v π_v² per position (B, T), detached, of the same
    temperature-scaled distribution: the statistic of the optimal token baseline (verl
    ``calculate_sum_pi_squared``; ‖∇_z log π(y_t)‖² = 1 − 2π(y_t) + Σ_v π_v²).  It is formed inside each
    chunk like the entropy, so no (B·T, V) tensor exists or is kept.
    With ``entropy_grad`` the entropy keeps its gradient (an entropy bonus in the loss; TRL ``entropy_coef``),
    recomputed chunk by chunk in backward like the log-probs.
    ``top_k`` / ``top_p`` score on the sampler's support instead of the full vocabulary: the temperature-scaled
    logits are filtered as the sampler filters them (ops/support.py) and renormalised, so π is the very
    distribution μ sampled from; 0 / 1 (the default) is the full softmax.
    Outputs, in order: (logprobs, entropy[, token_logits][, sum_pi_squared]).
    """
    if hidden.dim() != 3 or target_ids.shape != hidden.shape[:2]:
        raise ValueError(
            f"expected hidden (B, T, H) and target_ids (B, T), got {tuple(hidden.shape)} and {tuple(target_ids.shape)}."
        )
    if lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != hidden.shape[2]:
        raise ValueError(
            f"lm_head_weight must be (V, H={hidden.shape[2]}), got {tuple(lm_head_weight.shape)}."
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}.")
    batch, length, width = hidden.shape
    flat_hidden = hidden.reshape(batch * length, width)
    flat_ids = target_ids.reshape(batch * length, 1).long()
    # One fp32 copy of the weight for all chunks (a no-op when it is already fp32); its gradient is
    # accumulated in fp32 across chunks and cast back once.
    weight = _upcast(lm_head_weight)
    bias = None if lm_head_bias is None else _upcast(lm_head_bias).to(weight.dtype)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, lm_head_weight, lm_head_bias)
    )
    logprob_chunks, entropy_chunks, logit_chunks, sum_sq_chunks = [], [], [], []
    for start in range(0, batch * length, chunk_size):
        args = (flat_hidden[start : start + chunk_size], weight, bias, flat_ids[start : start + chunk_size])
        stats = (temperature, compute_entropy, compute_sum_pi_squared, top_k, top_p, entropy_grad)
        if needs_grad:
            logprobs, entropy, token_logits, sum_sq = checkpoint(_chunk_logprobs, *args, *stats, use_reentrant=False)
        else:
            logprobs, entropy, token_logits, sum_sq = _chunk_logprobs(*args, *stats)
        logprob_chunks.append(logprobs)
        entropy_chunks.append(entropy)
        logit_chunks.append(token_logits)
        sum_sq_chunks.append(sum_sq)
    logprobs = _cat(logprob_chunks, hidden).reshape(batch, length)
    entropy = _cat(entropy_chunks, hidden).reshape(batch, length) if compute_entropy else None
    outputs: tuple[Tensor | None, ...] = (logprobs, entropy)
    if return_token_logits:
        outputs += (_cat(logit_chunks, hidden).reshape(batch, length),)
    if compute_sum_pi_squared:
        outputs += (_cat(sum_sq_chunks, hidden).reshape(batch, length),)
    return outputs


def _cat(chunks: list[Tensor], like: Tensor) -> Tensor:
    if not chunks:  # B·T = 0
        return torch.empty(0, dtype=_upcast(like).dtype, device=like.device)
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks)
