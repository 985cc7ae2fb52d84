"""Tests for ops/ratios.py (token, GSPO sequence / token, MinPRO prefix-min log-ratios).

.venv/bin/python -m pytest -q tests/ops/test_ratios.py
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import reference_correction as ref
from steadyrl.ops.ratios import (
    LOG_RATIO_CLAMP,
    gspo_token_log_ratio,
    prefix_min_log_ratio,
    sequence_log_ratio,
    token_log_ratio,
    token_ratio,
)

F64 = torch.float64
NAN = float("nan")


def t(rows):
    return torch.tensor(rows, dtype=F64)


# ------------------------------------------------------------------ hand-computed values


def test_token_log_ratio_and_ratio_hand_values():
    logp = t([[-1.0, -2.0, 5.0, 30.0]])
    base = t([[-2.0, -2.0, NAN, 0.0]])
    mask = torch.tensor([[True, True, False, True]])
    # −1 − (−2) = 1; 0; masked → 0 (NaN base ignored); 30 → clamped to 20
    assert token_log_ratio(logp, base, mask).tolist() == [[1.0, 0.0, 0.0, LOG_RATIO_CLAMP]]
    torch.testing.assert_close(token_ratio(logp, base, mask), t([[math.e, 1.0, 1.0, math.exp(20.0)]]))
    assert token_log_ratio(logp, base, mask, clamp=0.5).tolist() == [[0.5, 0.0, 0.0, 0.5]]


def test_sequence_log_ratio_hand_values():
    logp = t([[-1.0, -2.0, 9.0], [0.0, 0.0, 0.0], [50.0, 50.0, 0.0]])
    base = t([[-2.0, -2.0, NAN], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False], [False, False, False], [True, True, False]])
    # row 0: (1 + 0) / 2 = 0.5; row 1: empty → 0; row 2: mean 50 → clamped to 20 after averaging
    assert sequence_log_ratio(logp, base, mask).tolist() == [0.5, 0.0, 20.0]


def test_gspo_token_value_is_the_sequence_ratio_and_gradient_is_per_token():
    logp = t([[-1.0, -2.0, 0.0]]).requires_grad_(True)
    base = t([[-2.0, -2.0, 0.0]])
    mask = torch.tensor([[True, True, False]])
    out = gspo_token_log_ratio(logp, base, mask)
    # value: sg[log s_i] = 0.5 at every token
    torch.testing.assert_close(out.detach(), t([[0.5, 0.5, 0.5]]))
    # gradient: ∂ log s_{i,t} / ∂ log π(y_t) = 1 for the token itself, 0 elsewhere and at padding
    upstream = t([[2.0, 3.0, 7.0]])
    (grad,) = torch.autograd.grad((out * upstream).sum(), logp)
    assert grad.tolist() == [[2.0, 3.0, 0.0]]


def test_prefix_min_log_ratio_hand_values():
    log_r = t([[-0.5, 0.3, -1.0, 0.2]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    # strictly earlier tokens: t0 none → 0; t1 min(−0.5) → −0.5; t2 min(−0.5, 0.3) → −0.5; t3 → −1.0
    assert prefix_min_log_ratio(log_r, mask).tolist() == [[0.0, -0.5, -0.5, -1.0]]
    # including token t: min(log ρ_0..t, 0)
    assert prefix_min_log_ratio(log_r, mask, include_current=True).tolist() == [[-0.5, -0.5, -1.0, -1.0]]
    # a masked token (garbage −9) never enters the min, and its own output is 0
    masked = torch.tensor([[True, False, True, True]])
    garbage = t([[-0.5, -9.0, -1.0, 0.2]])
    assert prefix_min_log_ratio(garbage, masked).tolist() == [[0.0, 0.0, -0.5, -1.0]]
    # all-positive prefix: capped at 0 (weight ≤ 1)
    assert prefix_min_log_ratio(t([[0.4, 0.7]]), torch.ones(1, 2, dtype=torch.bool)).tolist() == [[0.0, 0.0]]


# ------------------------------------------------------------------ loop references


def random_case(seed, batch, length, spread=1.0):
    gen = torch.Generator().manual_seed(seed)
    base = -3 * torch.rand(batch, length, generator=gen, dtype=F64)
    logp = base + spread * torch.randn(batch, length, generator=gen, dtype=F64)
    mask = torch.rand(batch, length, generator=gen) < 0.7
    return logp, base, mask


CASES = [(0, 1, 1), (1, 3, 7), (2, 6, 12), (3, 4, 30)]


@pytest.mark.parametrize("seed,batch,length", CASES)
def test_token_and_sequence_log_ratio_match_loop_reference(seed, batch, length):
    logp, base, mask = random_case(seed, batch, length, spread=8.0)  # large spread exercises the clamps
    args = (logp.tolist(), base.tolist(), mask.tolist())
    torch.testing.assert_close(token_log_ratio(logp, base, mask), t(ref.token_log_ratio(*args)))
    torch.testing.assert_close(
        token_log_ratio(logp, base, mask, clamp=2.0), t(ref.token_log_ratio(*args, c=2.0))
    )
    torch.testing.assert_close(sequence_log_ratio(logp, base, mask), t(ref.sequence_log_ratio(*args)))
    torch.testing.assert_close(
        sequence_log_ratio(logp, base, mask, clamp=1.0), t(ref.sequence_log_ratio(*args, c=1.0))
    )


@pytest.mark.parametrize("seed,batch,length", CASES)
@pytest.mark.parametrize("include_current", [False, True])
def test_prefix_min_matches_loop_reference(seed, batch, length, include_current):
    logp, base, mask = random_case(seed, batch, length)
    log_r = logp - base
    out = prefix_min_log_ratio(log_r, mask, include_current=include_current)
    expected = ref.prefix_min_log_ratio(log_r.tolist(), mask.tolist(), include_current)
    torch.testing.assert_close(out, t(expected))


# ------------------------------------------------------------------ properties

cases = st.tuples(st.integers(0, 10_000), st.integers(1, 5), st.integers(1, 10))
garbage_values = st.sampled_from([NAN, float("inf"), -float("inf"), 1e30])


@settings(max_examples=40, deadline=None)
@given(case=cases, garbage=garbage_values)
def test_masked_garbage_changes_nothing(case, garbage):
    logp, base, mask = random_case(*case)
    dirty_logp = torch.where(mask, logp, torch.full_like(logp, garbage))
    dirty_base = torch.where(mask, base, torch.full_like(base, garbage))
    for fn in (token_log_ratio, token_ratio, sequence_log_ratio, gspo_token_log_ratio):
        torch.testing.assert_close(fn(dirty_logp, dirty_base, mask), fn(logp, base, mask), rtol=0, atol=0)
    torch.testing.assert_close(
        prefix_min_log_ratio(dirty_logp - dirty_base, mask),
        prefix_min_log_ratio(logp - base, mask),
        rtol=0,
        atol=0,
    )


@settings(max_examples=40, deadline=None)
@given(case=cases, extra=st.integers(1, 4), garbage=garbage_values)
def test_appended_padding_changes_nothing(case, extra, garbage):
    logp, base, mask = random_case(*case)
    batch, length = mask.shape

    def pad(x, value):
        return torch.cat([x, torch.full((batch, extra), value, dtype=x.dtype)], dim=1)

    plogp, pbase, pmask = pad(logp, garbage), pad(base, 0.0), pad(mask, False)
    torch.testing.assert_close(sequence_log_ratio(plogp, pbase, pmask), sequence_log_ratio(logp, base, mask))
    torch.testing.assert_close(
        token_log_ratio(plogp, pbase, pmask)[:, :length], token_log_ratio(logp, base, mask)
    )
    assert token_log_ratio(plogp, pbase, pmask)[:, length:].eq(0).all()
    torch.testing.assert_close(
        prefix_min_log_ratio(plogp - pbase, pmask)[:, :length], prefix_min_log_ratio(logp - base, mask)
    )


@settings(max_examples=40, deadline=None)
@given(case=cases)
def test_identities_between_ratios(case):
    logp, base, mask = random_case(*case)
    log_r = token_log_ratio(logp, base, mask)
    torch.testing.assert_close(token_ratio(logp, base, mask), torch.exp(log_r))
    # sequence log-ratio = mean of the token log-ratios (no clamp is active at this spread)
    counts = mask.sum(dim=1).clamp(min=1).to(F64)
    torch.testing.assert_close(sequence_log_ratio(logp, base, mask), log_r.sum(dim=1) / counts)
    # the GSPO-token value is the sequence value at every token
    torch.testing.assert_close(
        gspo_token_log_ratio(logp, base, mask), sequence_log_ratio(logp, base, mask)[:, None].expand_as(logp)
    )
    # a prefix-min weight never exceeds 1, and equal policies give exactly 0 everywhere
    assert (prefix_min_log_ratio(logp - base, mask) <= 0).all()
    assert token_log_ratio(logp, logp, mask).eq(0).all() and sequence_log_ratio(logp, logp, mask).eq(0).all()


@settings(max_examples=30, deadline=None)
@given(case=cases)
def test_sequence_log_ratio_gradient_is_mean_of_token_gradients(case):
    logp, base, mask = random_case(*case)
    logp.requires_grad_(True)
    (grad,) = torch.autograd.grad(sequence_log_ratio(logp, base, mask).sum(), logp)
    # ∂/∂ log π(y_t) of (1/|y|) Σ_t log r_t = 1/|y| at valid tokens, 0 at padding
    counts = mask.sum(dim=1, keepdim=True).clamp(min=1).to(F64)
    torch.testing.assert_close(grad, torch.where(mask, 1.0 / counts, torch.zeros_like(grad)))
