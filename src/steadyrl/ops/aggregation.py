"""Reductions of an unreduced per-token loss (B, T) to the scalar that is back-propagated.

Every mode has the same signature (registry family ``aggregation``)::

    fn(loss: Tensor,  # (B, T) per-token term; masked positions may hold garbage, NaN included
       mask: Tensor,  # (B, T) bool
       counts: GlobalCounts) -> Tensor  # 0-d

This is the only place where the GRPO / DAPO / Dr.GRPO normalisation question is decided.  Every mode is a
sum over rows divided by a number taken from ``counts``, and the per-row part only looks at that row's own
mask.  So when a batch is split into micro-batches (or data-parallel ranks) and each piece is aggregated
with the *same* ``GlobalCounts`` of the whole optimizer step, the pieces add up exactly to the whole-batch
value and gradient, and padding columns change nothing.  Build the counts with ``global_counts``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from steadyrl.ops.masking import masked_count, masked_sum
from steadyrl.types import GlobalCounts


def _identity(x: Tensor) -> Tensor:
    return x


def global_counts(
    response_mask: Tensor | Sequence[Tensor],  # (B, T) bool, or a list of micro-batch masks (B_k, T_k)
    max_len: float | Tensor,
    reduce_sum: Callable[[Tensor], Tensor] = _identity,
    *,
    count_empty_sequences: bool = False,
) -> GlobalCounts:
    """Normalisers of one optimizer step: local counts of this rank's micro-batches, summed over ranks.

        num_tokens = Σ_{i,t} M_{i,t}
        num_seqs   = #{i : Σ_t M_{i,t} > 0}   (every row if ``count_empty_sequences``)
        max_len    = ``max_len``, passed through (a constant such as max new tokens; not summed)

    A row without any valid token (e.g. the MC-GRPO pivot or a sample whose reward was NaN, once the trainer
    has cleared its mask) contributes nothing to any loss, so by default it is not counted either, as
    verl's ``seq-mean-*`` modes do.  ``count_empty_sequences=True`` counts every row, which makes
    ``constant_norm`` a true constant (G × L in Dr.GRPO's notation) [INF: the papers leave this open].

    ``reduce_sum`` sums a tensor over data-parallel ranks (e.g. an ``all_reduce``); it is called once, on a
    stacked (2,) tensor.  Counts are float64 tensors on the masks' device: exact, and no host sync.
    """
    masks = [response_mask] if isinstance(response_mask, Tensor) else list(response_mask)
    if not masks:
        raise ValueError("global_counts needs at least one response mask.")
    device = masks[0].device
    local = torch.zeros(2, dtype=torch.float64, device=device)
    for mask in masks:
        if mask.dim() != 2:
            raise ValueError(f"response_mask must be (B, T), got shape {tuple(mask.shape)}.")
        row_tokens = masked_count(mask, dim=1).to(torch.float64)
        if count_empty_sequences:
            seqs = torch.full((), float(mask.shape[0]), dtype=torch.float64, device=device)  # a fill, no copy
        else:
            seqs = (row_tokens > 0).sum().to(torch.float64)
        local = local + torch.stack([row_tokens.sum(), seqs])
    total = reduce_sum(local)
    constant_len = max_len if isinstance(max_len, Tensor) else float(max_len)
    return GlobalCounts(num_tokens=total[0], num_seqs=total[1], max_len=constant_len)


def _check(loss: Tensor, mask: Tensor) -> None:
    if loss.dim() != 2 or loss.shape != mask.shape:
        raise ValueError(f"loss and mask must both be (B, T); got {tuple(loss.shape)} and {tuple(mask.shape)}.")


def _as_denominator(value: Tensor | float, like: Tensor, floor: float = 1.0) -> Tensor | float:
    """A count in ``like``'s dtype and device, at least ``floor`` (an empty step gives 0, not NaN).

    A Python number stays a Python number: dividing by it needs no host-to-device copy.
    """
    if isinstance(value, Tensor):
        return value.to(dtype=like.dtype, device=like.device).clamp(min=floor)
    return max(float(value), floor)


def _total(loss: Tensor, mask: Tensor) -> Tensor:
    # Accumulate in at least float32 so a bf16 loss does not lose the small terms of a long sum.
    loss = loss.to(torch.promote_types(loss.dtype, torch.float32))
    return masked_sum(loss, mask)


def token_mean(
    loss: Tensor,  # (B, T)
    mask: Tensor,  # (B, T) bool
    counts: GlobalCounts,
) -> Tensor:  # ()
    """Token-level mean over the whole step (DAPO, arXiv 2503.14476; methods.md §6.3).

        L = Σ_{i,t} M_{i,t} ℓ_{i,t} / counts.num_tokens

    Every token weighs the same, so long completions are not down-weighted per token.
    """
    _check(loss, mask)
    total = _total(loss, mask)
    return total / _as_denominator(counts.num_tokens, total)


def seq_mean_token_mean(
    loss: Tensor,  # (B, T)
    mask: Tensor,  # (B, T) bool
    counts: GlobalCounts,
) -> Tensor:  # ()
    """Mean over sequences of each sequence's token mean (GRPO, arXiv 2402.03300; methods.md §6.1).

        L = Σ_i ( Σ_t M_{i,t} ℓ_{i,t} / |y_i| ) / counts.num_seqs,   |y_i| = Σ_t M_{i,t}

    |y_i| is the row's own mask count, so it is local to the micro-batch and exact.  A row without valid
    tokens contributes 0.  The 1/|y_i| is the response-length bias Dr.GRPO removes.
    """
    _check(loss, mask)
    wide = loss.to(torch.promote_types(loss.dtype, torch.float32))
    per_sequence = masked_sum(wide, mask, dim=1) / masked_count(mask, dim=1).to(wide.dtype).clamp(min=1.0)
    total = per_sequence.sum()
    return total / _as_denominator(counts.num_seqs, total)


def seq_mean_token_sum(
    loss: Tensor,  # (B, T)
    mask: Tensor,  # (B, T) bool
    counts: GlobalCounts,
) -> Tensor:  # ()
    """Sum over tokens, mean over sequences, no length normalisation (verl ``seq-mean-token-sum``).

        L = Σ_{i,t} M_{i,t} ℓ_{i,t} / counts.num_seqs

    The normaliser MiniRL's argument calls for (methods.md §5, arXiv 2512.01374): a constant that does not
    depend on the lengths, here the number of completions.
    """
    _check(loss, mask)
    total = _total(loss, mask)
    return total / _as_denominator(counts.num_seqs, total)


def constant_norm(
    loss: Tensor,  # (B, T)
    mask: Tensor,  # (B, T) bool
    counts: GlobalCounts,
) -> Tensor:  # ()
    """Dr.GRPO's constant normaliser (arXiv 2503.20783; methods.md §6.2; verl ``seq-mean-token-sum-norm``).

        L = Σ_{i,t} M_{i,t} ℓ_{i,t} / (counts.num_seqs · counts.max_len)

    ``max_len`` is a fixed length L (e.g. the maximum number of new tokens), never the padded T of a
    micro-batch, which would change with the split.
    """
    _check(loss, mask)
    total = _total(loss, mask)
    max_len = _as_denominator(counts.max_len, total, floor=0.0)
    return total / (_as_denominator(counts.num_seqs, total) * max_len)
