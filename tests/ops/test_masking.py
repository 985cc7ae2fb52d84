"""Tests for steadyrl.ops.masking: hand values, loop references, masked garbage, padding.

Run: .venv/bin/python -m pytest -q tests/ops/test_masking.py
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import reference as ref
from steadyrl.ops import masking as mk

NAN, INF = float("nan"), float("inf")
SETTINGS = settings(max_examples=40, deadline=None)

# x = [[1, 2, NaN], [4, inf, -inf]] with mask [[T, T, F], [T, F, F]]: valid values 1, 2, 4
X = torch.tensor([[1.0, 2.0, NAN], [4.0, INF, -INF]])
M = torch.tensor([[True, True, False], [True, False, False]])


# ----------------------------------------------------------------------------- hand-computed values


def test_masked_fill_zero():
    assert mk.masked_fill_zero(X, M).tolist() == [[1.0, 2.0, 0.0], [4.0, 0.0, 0.0]]


def test_masked_sum_and_count():
    assert mk.masked_sum(X, M).item() == 7.0  # 1 + 2 + 4
    assert mk.masked_sum(X, M, dim=1).tolist() == [3.0, 4.0]
    assert mk.masked_sum(X, M, dim=0).tolist() == [5.0, 2.0, 0.0]
    assert mk.masked_count(M).item() == 3.0
    assert mk.masked_count(M, dim=1).tolist() == [2.0, 1.0]
    assert mk.masked_count(M).dtype == torch.float32


def test_masked_mean():
    assert mk.masked_mean(X, M).item() == pytest.approx(7 / 3)  # (1 + 2 + 4) / 3
    assert mk.masked_mean(X, M, dim=1).tolist() == [1.5, 4.0]  # 3/2, 4/1
    # an all-masked row gives 0, not NaN: column 2 has no valid entry
    assert mk.masked_mean(X, M, dim=0).tolist() == [2.5, 2.0, 0.0]


def test_masked_var():
    # values 1, 2, 4: mean 7/3; Σ(x − m)² = 16/9 + 1/9 + 25/9 = 42/9 = 14/3
    # unbiased: (14/3)/2 = 7/3 ; population: (14/3)/3 = 14/9
    assert mk.masked_var(X, M).item() == pytest.approx(7 / 3)
    assert mk.masked_var(X, M, unbiased=False).item() == pytest.approx(14 / 9)
    # per row: [1, 2] -> unbiased 0.5 ; [4] -> a single value has no unbiased variance: 0
    torch.testing.assert_close(mk.masked_var(X, M, dim=1), torch.tensor([0.5, 0.0]))
    torch.testing.assert_close(mk.masked_var(X, M, dim=-1, unbiased=False), torch.tensor([0.25, 0.0]))


def test_masked_whiten():
    # values 1, 2, 4: mean 7/3, unbiased var 7/3 -> std 1.5275252
    # (1 − 7/3)/1.5275252 = −0.8728716 ; (2 − 7/3)/1.5275252 = −0.2182179 ; (4 − 7/3)/1.5275252 = 1.0910895
    out = mk.masked_whiten(X, M)
    torch.testing.assert_close(out, torch.tensor([[-0.8728716, -0.2182179, 0.0], [1.0910895, 0.0, 0.0]]))
    # without the shift: x / std = [0.6546537, 1.3093073, 2.6186147]
    out = mk.masked_whiten(X, M, shift_mean=False)
    torch.testing.assert_close(out, torch.tensor([[0.6546537, 1.3093073, 0.0], [2.6186147, 0.0, 0.0]]))


def test_response_mask_from_eos():
    # EOS = 2: row 0 ends at index 1 (kept); row 1 never ends (truncated); row 2 ends at index 0
    ids = torch.tensor([[5, 2, 7, 2], [1, 1, 1, 1], [2, 0, 0, 0]])
    mask, truncated = mk.response_mask_from_eos(ids, 2)
    assert mask.tolist() == [[True, True, False, False], [True] * 4, [True, False, False, False]]
    assert truncated.tolist() == [False, True, False]
    # several EOS ids: 7 also ends row 0 — but 2 comes first, so nothing changes; row 1 ends at 1
    mask, truncated = mk.response_mask_from_eos(ids, [7, 1])
    assert mask.tolist() == [[True, True, True, False], [True, False, False, False], [True] * 4]
    assert truncated.tolist() == [False, False, True]
    assert mask.dtype == torch.bool


def test_response_mask_from_eos_int32_ids():
    mask, truncated = mk.response_mask_from_eos(torch.tensor([[3, 9, 9]], dtype=torch.int32), 9)
    assert mask.tolist() == [[True, True, False]] and truncated.tolist() == [False]


# ----------------------------------------------------------------------------- loop references


def random_masked(gen: torch.Generator, batch: int, width: int):
    x = torch.randn(batch, width, generator=gen, dtype=torch.float64) * 3
    mask = torch.rand(batch, width, generator=gen) < 0.6
    garbage = torch.tensor([NAN, INF, -INF], dtype=torch.float64)[torch.randint(0, 3, (batch, width), generator=gen)]
    return torch.where(mask, x, garbage), mask


@pytest.mark.parametrize("seed", range(8))
def test_reductions_match_loop_reference(seed):
    gen = torch.Generator().manual_seed(seed)
    batch, width = int(torch.randint(1, 7, (1,), generator=gen)), int(torch.randint(1, 9, (1,), generator=gen))
    x, mask = random_masked(gen, batch, width)
    xl, ml = x.tolist(), mask.tolist()
    values = ref.masked_values(xl, ml)
    assert mk.masked_sum(x, mask).item() == pytest.approx(sum(values), abs=1e-12)
    assert mk.masked_count(mask).item() == len(values)
    assert mk.masked_mean(x, mask).item() == pytest.approx(sum(values) / max(len(values), 1), abs=1e-12)
    for unbiased in (True, False):
        assert mk.masked_var(x, mask, unbiased=unbiased).item() == pytest.approx(
            ref.masked_var(values, unbiased), rel=1e-12, abs=1e-12
        )
        row_vars = [ref.masked_var(ref.masked_values([row], [m]), unbiased) for row, m in zip(xl, ml)]
        torch.testing.assert_close(mk.masked_var(x, mask, dim=1, unbiased=unbiased), torch.tensor(row_vars, dtype=x.dtype))
    row_means = [sum(v) / max(len(v), 1) for v in (ref.masked_values([row], [m]) for row, m in zip(xl, ml))]
    torch.testing.assert_close(mk.masked_mean(x, mask, dim=1), torch.tensor(row_means, dtype=x.dtype))
    for shift in (True, False):
        expected = torch.tensor(ref.masked_whiten(xl, ml, shift_mean=shift), dtype=x.dtype)
        torch.testing.assert_close(mk.masked_whiten(x, mask, shift_mean=shift), expected)


@pytest.mark.parametrize("seed", range(6))
def test_response_mask_matches_loop_reference(seed):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 6, (5, 7), generator=gen)
    eos = [0] if seed % 2 else [0, 3]
    mask, truncated = mk.response_mask_from_eos(ids, eos if len(eos) > 1 else eos[0])
    expected_mask, expected_truncated = ref.response_mask_from_eos(ids.tolist(), set(eos))
    assert mask.tolist() == expected_mask
    assert truncated.tolist() == expected_truncated


# ----------------------------------------------------------------------------- properties


@SETTINGS
@given(
    seed=st.integers(0, 2**16),
    garbage=st.sampled_from([NAN, INF, -INF, 1e300, -3.0]),
    dim=st.sampled_from([None, 0, 1, -1, (0, 1)]),
)
def test_masked_garbage_changes_nothing(seed, garbage, dim):
    gen = torch.Generator().manual_seed(seed)
    x, mask = random_masked(gen, 4, 5)
    clean, dirty = torch.where(mask, x, 0.0), torch.where(mask, x, garbage)
    for fn in (mk.masked_sum, mk.masked_mean, mk.masked_var):
        assert torch.equal(fn(clean, mask, dim), fn(dirty, mask, dim)), fn.__name__
    assert torch.equal(mk.masked_whiten(clean, mask), mk.masked_whiten(dirty, mask))
    assert torch.equal(mk.masked_fill_zero(dirty, mask), clean)


@SETTINGS
@given(seed=st.integers(0, 2**16), extra=st.integers(1, 4))
def test_padding_columns_change_nothing(seed, extra):
    gen = torch.Generator().manual_seed(seed)
    x, mask = random_masked(gen, 3, 5)
    px = torch.cat([x, torch.full((3, extra), NAN, dtype=x.dtype)], dim=1)
    pm = torch.cat([mask, torch.zeros(3, extra, dtype=torch.bool)], dim=1)
    for fn in (mk.masked_sum, mk.masked_mean, mk.masked_var):
        torch.testing.assert_close(fn(px, pm, 1), fn(x, mask, 1), rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(fn(px, pm), fn(x, mask), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(mk.masked_whiten(px, pm)[:, :5], mk.masked_whiten(x, mask), rtol=1e-12, atol=1e-12)
    assert (mk.masked_whiten(px, pm)[:, 5:] == 0).all()


@SETTINGS
@given(values=st.lists(st.floats(-1e3, 1e3), min_size=2, max_size=20))
def test_whitened_values_have_zero_mean_and_unit_variance(values):
    x = torch.tensor([values], dtype=torch.float64)
    mask = torch.ones_like(x, dtype=torch.bool)
    assume(mk.masked_var(x, mask).item() > 0.1)  # below that, eps = 1e-8 visibly shrinks the variance
    out = mk.masked_whiten(x, mask)
    assert abs(mk.masked_mean(out, mask).item()) < 1e-9
    assert mk.masked_var(out, mask).item() == pytest.approx(1.0, rel=1e-6)


@SETTINGS
@given(ids=st.lists(st.lists(st.integers(0, 4), min_size=1, max_size=8), min_size=1, max_size=5), eos=st.integers(0, 4))
def test_response_mask_is_a_prefix_ending_at_the_first_eos(ids, eos):
    width = max(len(r) for r in ids)
    rows = torch.tensor([r + [eos + 1] * (width - len(r)) for r in ids])  # pad with a non-EOS id
    mask, truncated = mk.response_mask_from_eos(rows, eos)
    for row, m, trunc in zip(rows.tolist(), mask.tolist(), truncated.tolist()):
        length = sum(m)
        assert m == [True] * length + [False] * (len(m) - length)  # a prefix
        assert trunc == (eos not in row)
        if not trunc:
            assert length == row.index(eos) + 1  # up to and including the first EOS


def test_all_masked_gives_zero_not_nan():
    x = torch.full((2, 3), NAN)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    assert mk.masked_mean(x, mask).item() == 0.0
    assert mk.masked_var(x, mask).item() == 0.0
    assert mk.masked_whiten(x, mask).abs().sum().item() == 0.0
    assert not math.isnan(mk.masked_mean(x, mask, dim=1).sum().item())


# ----------------------------------------------------------------------------- broadcast masks


def test_masked_mean_with_a_broadcast_mask():
    # masked_sum documents broadcastable masks, and broadcasts: a (B, 1) mask selects whole rows.
    # Row 0 of [[0, 1, 2], [3, 4, 5]] is selected: mean over its 3 values = 3 / 3 = 1 (the count must be
    # taken after broadcasting, not from the (B, 1) mask itself, which would give 3 / 1).
    x = torch.arange(6.0).reshape(2, 3)
    rows = torch.tensor([[True], [False]])
    assert mk.masked_mean(x, rows, dim=1).tolist() == [1.0, 0.0]
