"""The sampling layer's math: dead groups, DAPO overlong punishment, the IQR fence, the Beta posterior.

    .venv/bin/python -m pytest -q tests/ops/test_sampling_ops.py
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reference_sampling import iqr_keep_reference, overlong_reference
from steadyrl.ops.sampling import (
    bernoulli_information,
    beta_decay,
    beta_update,
    iqr_keep,
    overlong_penalty,
    sequence_nll,
    zero_variance_groups,
)

T = torch.tensor
NAN = float("nan")


def test_zero_variance_groups_by_hand():
    # mixed; all 0; two valid equal members; one valid member
    rewards = T([1.0, 1, 0, 0, 0, 0, NAN, 1, 1, 1.0, NAN, NAN])
    assert zero_variance_groups(rewards, 3).tolist() == [False, True, True, True]


def test_overlong_penalty_by_hand():
    # L_max = 8, L_cache = 4: free up to 4 tokens, then −(|y| − 4)/4, −1 at 8; factor scales it
    lengths = T([3, 4, 6, 8])
    torch.testing.assert_close(overlong_penalty(lengths, max_len=8, buffer_len=4), T([0.0, 0.0, -0.5, -1.0]))
    torch.testing.assert_close(overlong_penalty(lengths, max_len=8, buffer_len=4, factor=2.0), T([0.0, 0.0, -1.0, -2.0]))
    with pytest.raises(ValueError, match="buffer_len <= max_len"):
        overlong_penalty(lengths, max_len=8, buffer_len=9)


@settings(max_examples=50, deadline=None)
@given(lengths=st.lists(st.integers(0, 64), min_size=1, max_size=20), buffer=st.integers(1, 64),
       factor=st.floats(0.1, 3.0))
def test_overlong_penalty_matches_verl_and_never_rewards(lengths, buffer, factor):
    out = overlong_penalty(T(lengths), max_len=64, buffer_len=buffer, factor=factor)
    expected = [overlong_reference(n, 64, buffer, factor) for n in lengths]
    torch.testing.assert_close(out, T(expected), rtol=1e-5, atol=1e-6)
    assert (out <= 0).all() and (out >= -factor - 1e-6).all()


def test_sequence_nll_is_the_mean_surprisal_of_the_counted_tokens():
    logp = T([[-1.0, -3.0, NAN], [-2.0, 0.0, 0.0]])
    mask = T([[True, True, False], [True, False, False]])
    torch.testing.assert_close(sequence_nll(logp, mask), T([2.0, 2.0]))


def test_iqr_keep_by_hand():
    # [1, 2, 3, 4, −10]: Q1 = 1, Q3 = 3, IQR = 2, fence = 1 − 1.5·2 = −2 → −10 goes
    assert iqr_keep(T([1.0, 2, 3, 4, -10]), 5).tolist() == [True, True, True, True, False]
    assert iqr_keep(T([1.0, 2, 3, 4, -10]), 5, k=10.0).all()  # fence 1 − 20 = −19
    # per group vs the whole batch: 0.9 is an outlier in its own group [5, 5, 5, 0.9] (IQR 0) ...
    values = T([5.0, 5, 5, 0.9, 1, 1, 1, 1])
    assert iqr_keep(values, 4).tolist() == [True, True, True, False, True, True, True, True]
    # ... but not in the batch (Q1 = 1, Q3 = 5, fence = −5)
    assert iqr_keep(values, 4, scope="batch").all()
    assert iqr_keep(T([NAN, 1.0, 1.0, 1.0]), 4).all()  # NaN rows (already filtered) are left alone


@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.floats(-5, 5), min_size=4, max_size=4), k=st.floats(0, 3))
def test_iqr_keep_matches_the_reference_and_keeps_the_upper_half(values, k):
    kept = iqr_keep(T(values), 4, k=k)
    assert kept.tolist() == iqr_keep_reference([float(v) for v in T(values)], k)
    median = sorted(values)[1]
    assert all(kept[i] for i, v in enumerate(values) if v >= median)  # only low-entropy outliers go


def test_beta_update_and_decay_by_hand():
    a, b = beta_update(T(1.0), T(1.0), T(3.0), T(1.0))
    assert (a.item(), b.item()) == (4.0, 2.0)
    # decay toward the prior (1, 1) by .5: 1 + .5·3 = 2.5, 1 + .5·1 = 1.5 (mean .625 from .667, mass 4 from 6)
    a, b = beta_decay(a, b, 0.5, (1.0, 1.0))
    assert (a.item(), b.item()) == (2.5, 1.5)
    assert bernoulli_information(T([0.0, 0.5, 1.0])).tolist() == [0.0, 0.25, 0.0]


@settings(max_examples=60, deadline=None)
@given(observations=st.lists(st.tuples(st.integers(0, 8), st.integers(0, 8)), min_size=1, max_size=10),
       prior=st.tuples(st.floats(0.5, 3), st.floats(0.5, 3)))
def test_without_decay_the_posterior_is_the_closed_form_beta(observations, prior):
    a, b = T(prior[0], dtype=torch.float64), T(prior[1], dtype=torch.float64)
    for s, f in observations:
        a, b = beta_decay(a, b, 1.0, prior)
        a, b = beta_update(a, b, T(float(s), dtype=torch.float64), T(float(f), dtype=torch.float64))
    assert a.item() == pytest.approx(prior[0] + sum(s for s, _ in observations))
    assert b.item() == pytest.approx(prior[1] + sum(f for _, f in observations))


@settings(max_examples=40, deadline=None)
@given(a=st.floats(0.5, 50), b=st.floats(0.5, 50), lam=st.floats(0.0, 1.0))
def test_decay_keeps_the_mean_between_the_prior_and_the_posterior_and_never_adds_mass(a, b, lam):
    da, db = beta_decay(T(a, dtype=torch.float64), T(b, dtype=torch.float64), lam, (1.0, 1.0))
    mean, decayed = a / (a + b), (da / (da + db)).item()
    assert min(mean, 0.5) - 1e-9 <= decayed <= max(mean, 0.5) + 1e-9
    assert (da + db).item() <= max(a + b, 2.0) + 1e-9
    assert math.isfinite(decayed)
