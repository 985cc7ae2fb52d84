"""Tests for steadyrl.ops.aggregation: hand values, loop references, masked garbage, padding, and the
micro-batch / data-parallel split invariance of value and gradient.

Run: .venv/bin/python -m pytest -q tests/ops/test_aggregation.py
"""

from __future__ import annotations

import inspect

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import reference as ref
from steadyrl.ops import aggregation as agg
from steadyrl.types import GlobalCounts

MODES = [agg.token_mean, agg.seq_mean_token_mean, agg.seq_mean_token_sum, agg.constant_norm]
SETTINGS = settings(max_examples=30, deadline=None)
NAN, INF = float("nan"), float("inf")


def reference_value(mode, loss: torch.Tensor, mask: torch.Tensor, counts: GlobalCounts) -> float:
    loss_l, mask_l = loss.tolist(), mask.tolist()
    num_tokens, num_seqs, max_len = float(counts.num_tokens), float(counts.num_seqs), float(counts.max_len)
    if mode is agg.token_mean:
        return ref.token_mean(loss_l, mask_l, num_tokens)
    if mode is agg.seq_mean_token_mean:
        return ref.seq_mean_token_mean(loss_l, mask_l, num_seqs)
    if mode is agg.seq_mean_token_sum:
        return ref.seq_mean_token_sum(loss_l, mask_l, num_seqs)
    return ref.constant_norm(loss_l, mask_l, num_seqs, max_len)


def same_counts(a: GlobalCounts, b: GlobalCounts) -> bool:
    return bool(a.num_tokens == b.num_tokens) and bool(a.num_seqs == b.num_seqs) and a.max_len == b.max_len


# ----------------------------------------------------------------------------- hand-computed values

HAND_LOSS = torch.tensor([[1.0, 2.0, NAN], [3.0, INF, -INF]])
HAND_MASK = torch.tensor([[True, True, False], [True, False, False]])
HAND_COUNTS = GlobalCounts(num_tokens=3, num_seqs=2, max_len=4)


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        (agg.token_mean, 2.0),  # (1 + 2 + 3) / 3 tokens
        (agg.seq_mean_token_mean, 2.25),  # ((1 + 2)/2 + 3/1) / 2 sequences = (1.5 + 3) / 2
        (agg.seq_mean_token_sum, 3.0),  # (1 + 2 + 3) / 2 sequences
        (agg.constant_norm, 0.75),  # (1 + 2 + 3) / (2 sequences · L = 4)
    ],
)
def test_hand_values(mode, expected):
    # masked positions hold NaN and ±inf: none of it may leak
    out = mode(HAND_LOSS, HAND_MASK, HAND_COUNTS)
    assert out.dim() == 0
    assert out.item() == pytest.approx(expected)


def test_global_counts_hand_values():
    # rows: 2 tokens, 0 tokens (empty), 1 token -> 3 tokens; 2 non-empty sequences (3 rows)
    mask = torch.tensor([[True, True, False], [False, False, False], [True, False, False]])
    counts = agg.global_counts(mask, max_len=8)
    assert (counts.num_tokens.item(), counts.num_seqs.item(), counts.max_len) == (3.0, 2.0, 8.0)
    assert agg.global_counts(mask, 8, count_empty_sequences=True).num_seqs.item() == 3.0
    # a list of micro-batches with different padded widths sums the same way: (3 + 1) tokens, (2 + 1) seqs
    counts = agg.global_counts([mask, torch.tensor([[True, False]])], max_len=8)
    assert (counts.num_tokens.item(), counts.num_seqs.item()) == (4.0, 3.0)
    assert counts.num_tokens.dtype == torch.float64


def test_global_counts_reduce_sum_is_called_once_over_ranks():
    calls = []

    def two_identical_ranks(x):
        calls.append(x.clone())
        return 2 * x

    counts = agg.global_counts(torch.tensor([[True, True], [True, False]]), 5, two_identical_ranks)
    assert len(calls) == 1 and calls[0].tolist() == [3.0, 2.0]  # local: 3 tokens, 2 sequences
    assert (counts.num_tokens.item(), counts.num_seqs.item(), counts.max_len) == (6.0, 4.0, 5.0)


def test_global_counts_errors():
    with pytest.raises(ValueError, match="at least one"):
        agg.global_counts([], 4)
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        agg.global_counts(torch.ones(3, dtype=torch.bool), 4)


@pytest.mark.parametrize("mode", MODES)
def test_shape_errors_and_signature(mode):
    assert list(inspect.signature(mode).parameters) == ["loss", "mask", "counts"]
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        mode(torch.zeros(2, 3), torch.ones(2, 4, dtype=torch.bool), HAND_COUNTS)
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        mode(torch.zeros(3), torch.ones(3, dtype=torch.bool), HAND_COUNTS)


@pytest.mark.parametrize("mode", MODES)
def test_empty_step_gives_zero_not_nan(mode):
    mask = torch.zeros(2, 3, dtype=torch.bool)
    out = mode(torch.full((2, 3), NAN), mask, agg.global_counts(mask, 4))
    assert out.item() == 0.0
    # the same with counts given as plain Python numbers
    assert mode(torch.full((2, 3), NAN), mask, GlobalCounts(num_tokens=0, num_seqs=0, max_len=4)).item() == 0.0


@pytest.mark.parametrize("mode", MODES)
def test_dtypes(mode):
    mask = torch.ones(2, 3, dtype=torch.bool)
    counts = agg.global_counts(mask, 4)
    assert mode(torch.ones(2, 3), mask, counts).dtype == torch.float32
    assert mode(torch.ones(2, 3, dtype=torch.float64), mask, counts).dtype == torch.float64
    assert mode(torch.ones(2, 3, dtype=torch.bfloat16), mask, counts).dtype == torch.float32  # accumulated wide


# ----------------------------------------------------------------------------- loop references


def random_batch(gen: torch.Generator, batch: int, width: int, dtype=torch.float64):
    loss = torch.randn(batch, width, generator=gen, dtype=dtype)
    lengths = torch.randint(0, width + 1, (batch,), generator=gen)
    mask = torch.arange(width) < lengths[:, None]
    garbage = torch.tensor([NAN, INF, -INF, 1e30], dtype=dtype)[torch.randint(0, 4, (batch, width), generator=gen)]
    return torch.where(mask, loss, garbage), mask


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("mode", MODES)
def test_matches_loop_reference(mode, seed):
    gen = torch.Generator().manual_seed(seed)
    batch, width = int(torch.randint(1, 9, (1,), generator=gen)), int(torch.randint(1, 12, (1,), generator=gen))
    loss, mask = random_batch(gen, batch, width)
    counts = agg.global_counts(mask, max_len=16)
    expected = reference_value(mode, loss, mask, counts) if counts.num_seqs > 0 else 0.0
    assert mode(loss, mask, counts).item() == pytest.approx(expected, rel=1e-12, abs=1e-12)


# ----------------------------------------------------------------------------- masked garbage and padding


@SETTINGS
@given(
    mode=st.sampled_from(MODES),
    seed=st.integers(0, 2**16),
    batch=st.integers(1, 6),
    width=st.integers(1, 8),
    garbage=st.sampled_from([NAN, INF, -INF, 1e38, -7.0]),
)
def test_masked_garbage_changes_neither_value_nor_gradient(mode, seed, batch, width, garbage):
    gen = torch.Generator().manual_seed(seed)
    clean, mask = random_batch(gen, batch, width)
    clean = torch.where(mask, clean, 0.0)
    dirty = torch.where(mask, clean, garbage)
    counts = agg.global_counts(mask, 16)
    grads = []
    for loss in (clean, dirty):
        leaf = loss.clone().requires_grad_(True)
        out = mode(leaf, mask, counts)
        out.backward()
        grads.append((out.detach(), leaf.grad))
    assert torch.equal(grads[0][0], grads[1][0])
    assert torch.equal(grads[0][1], grads[1][1])
    assert (grads[1][1][~mask] == 0).all()


@SETTINGS
@given(mode=st.sampled_from(MODES), seed=st.integers(0, 2**16), extra=st.integers(1, 5))
def test_padding_columns_change_nothing(mode, seed, extra):
    gen = torch.Generator().manual_seed(seed)
    loss, mask = random_batch(gen, 4, 6)
    padded_loss = torch.cat([loss, torch.full((4, extra), NAN, dtype=loss.dtype)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(4, extra, dtype=torch.bool)], dim=1)
    counts = agg.global_counts(mask, 16)
    assert same_counts(agg.global_counts(padded_mask, 16), counts)
    # equal up to summation order (a wider tensor is summed in a different order)
    torch.testing.assert_close(mode(padded_loss, padded_mask, counts), mode(loss, mask, counts), rtol=1e-13, atol=1e-15)


# ----------------------------------------------------------------------------- micro-batch split invariance


class TinyPolicy(torch.nn.Module):
    """Hidden states (B, T, H) -> logits (B, T, V) -> log π of the sampled tokens (B, T)."""

    def __init__(self, hidden: int = 6, vocab: int = 5):
        super().__init__()
        self.head = torch.nn.Linear(hidden, vocab, dtype=torch.float64)

    def forward(self, hidden_states: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        logprobs = torch.log_softmax(self.head(hidden_states), dim=-1)
        return logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def make_rollouts(gen: torch.Generator, batch: int, width: int):
    hidden = torch.randn(batch, width, 6, generator=gen, dtype=torch.float64)
    tokens = torch.randint(0, 5, (batch, width), generator=gen)
    lengths = torch.randint(0, width + 1, (batch,), generator=gen)
    mask = torch.arange(width) < lengths[:, None]
    advantages = torch.randn(batch, generator=gen, dtype=torch.float64)
    return hidden, tokens, mask, advantages


def reinforce_step_gradient(policy, mode, pieces, counts):
    """Σ over micro-batches of ∇ aggregate(−Â · log π); each piece is trimmed to its own longest row."""
    policy.zero_grad()
    total = torch.zeros((), dtype=torch.float64)
    for hidden, tokens, mask, advantages in pieces:
        width = max(int(mask.sum(dim=1).max()), 1) if mask.numel() else 1
        hidden, tokens, mask = hidden[:, :width], tokens[:, :width], mask[:, :width]
        loss_bt = -advantages[:, None] * policy(hidden, tokens)
        value = mode(loss_bt, mask, counts)
        value.backward()
        total = total + value.detach()
    return total, [p.grad.clone() for p in policy.parameters()]


def split_rows(rollouts, boundaries):
    cuts = [0, *boundaries, rollouts[0].shape[0]]
    return [tuple(x[a:b] for x in rollouts) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]


@pytest.mark.parametrize("mode", MODES)
def test_micro_batches_give_the_whole_batch_gradient(mode):
    # 8 completions split 3 + 1 + 4, each micro-batch padded to its own width, counts of the whole step
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    policy = TinyPolicy()
    rollouts = make_rollouts(gen, 8, 7)
    counts = agg.global_counts(rollouts[2], max_len=7)
    whole_value, whole_grad = reinforce_step_gradient(policy, mode, [rollouts], counts)
    split_value, split_grad = reinforce_step_gradient(policy, mode, split_rows(rollouts, [3, 4]), counts)
    torch.testing.assert_close(split_value, whole_value, rtol=1e-12, atol=1e-14)
    for a, b in zip(split_grad, whole_grad):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
    assert all(g.abs().sum() > 0 for g in whole_grad)  # a test with zero gradient could not fail


def test_per_micro_batch_counts_would_change_the_gradient():
    # the reason global counts exist: normalising each micro-batch by its own token count is not the same
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(0)
    policy = TinyPolicy()
    rollouts = make_rollouts(gen, 8, 7)
    counts = agg.global_counts(rollouts[2], max_len=7)
    _, whole_grad = reinforce_step_gradient(policy, agg.token_mean, [rollouts], counts)
    policy.zero_grad()
    for piece in split_rows(rollouts, [2]):
        hidden, tokens, mask, advantages = piece
        loss_bt = -advantages[:, None] * policy(hidden, tokens)
        agg.token_mean(loss_bt, mask, agg.global_counts(mask, 7)).backward()
    assert not torch.allclose(policy.head.weight.grad, whole_grad[0])


@SETTINGS
@given(
    mode=st.sampled_from(MODES),
    seed=st.integers(0, 2**16),
    batch=st.integers(1, 9),
    width=st.integers(1, 6),
    data=st.data(),
)
def test_random_splits_and_ranks_give_the_same_gradient(mode, seed, batch, width, data):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    policy = TinyPolicy()
    rollouts = make_rollouts(gen, batch, width)
    boundaries = sorted(set(data.draw(st.lists(st.integers(1, batch), max_size=4)))) if batch > 1 else []
    pieces = split_rows(rollouts, [b for b in boundaries if b < batch])
    # data parallel: each "rank" counts its own pieces, reduce_sum adds the other ranks' counts
    rank_of = [data.draw(st.integers(0, 1)) for _ in pieces]
    local = [[p[2] for p, r in zip(pieces, rank_of) if r == rank] for rank in (0, 1)]
    rank_counts = []
    for rank in (0, 1):
        other = local[1 - rank]
        others = torch.tensor(
            [sum(float(m.sum()) for m in other), sum(float((m.sum(dim=1) > 0).sum()) for m in other)],
            dtype=torch.float64,
        )
        if local[rank]:
            rank_counts.append(agg.global_counts(local[rank], 9, lambda x, o=others: x + o))
    whole_counts = agg.global_counts(rollouts[2], 9)
    assert all(same_counts(counts, whole_counts) for counts in rank_counts)
    whole_value, whole_grad = reinforce_step_gradient(policy, mode, [rollouts], whole_counts)
    split_value, split_grad = reinforce_step_gradient(policy, mode, pieces, whole_counts)
    torch.testing.assert_close(split_value, whole_value, rtol=1e-10, atol=1e-12)
    for a, b in zip(split_grad, whole_grad):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
