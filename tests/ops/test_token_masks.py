"""Tests for steadyrl.ops.token_masks: the 80/20 high-entropy mask and M2PO's second-moment mask.

Run: .venv/bin/python -m pytest -q tests/ops/test_token_masks.py
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import reference_adopted as ref
from reference_losses import NAN, close, make, poison, random_inputs
from steadyrl.ops.token_masks import high_entropy_mask, m2po_mask

SHAPES = [(1, 1, 0), (2, 5, 1), (4, 7, 2), (3, 16, 3), (8, 4, 4), (5, 9, 5)]


def test_high_entropy_hand():
    # valid entropies 0.1, 0.5, 0.9, 1.3, 2.0 (one masked NaN): ρ = 0.2 → the 0.8-quantile:
    # position 0.8·(5 − 1) = 3.2 → 1.3 + 0.2·(2.0 − 1.3) = 1.44: only 2.0 is kept
    inputs = make([[-1.0] * 6], adv=[[1.0] * 6], entropy=[[0.1, 2.0, 0.5, NAN, 1.3, 0.9]],
                  mask=[[True, True, True, False, True, True]])
    out = high_entropy_mask(inputs)
    assert out.mask.tolist() == [[False, True, False, True, False, False]]  # True at padding: rejects nothing
    assert out.weights.eq(1).all()
    close(out.metrics["entropy_mask/kept_frac"], 0.2)
    close(out.metrics["entropy_mask/threshold"], 1.44)
    # ρ = 0.5: median position 2 → 0.9; ties count as kept (≥)
    assert high_entropy_mask(inputs, top_entropy_quantile=0.5).mask.tolist() == [[False, True, False, True, True, True]]


def test_high_entropy_keeps_everything_at_one_and_nothing_without_tokens():
    x = random_inputs(3, 5, 2)
    assert high_entropy_mask(x, top_entropy_quantile=1.0).mask.all()
    empty = dataclasses.replace(x, response_mask=torch.zeros_like(x.response_mask))
    out = high_entropy_mask(empty)
    assert out.mask.all()  # nothing valid, nothing rejected
    close(out.metrics["entropy_mask/kept_frac"], 0.0)
    close(out.metrics["entropy_mask/threshold"], 0.0)


@pytest.mark.parametrize("B,T,seed", SHAPES)
@pytest.mark.parametrize("rho", [0.05, 0.2, 0.5, 0.9])
def test_high_entropy_matches_loop(B, T, seed, rho):
    x = random_inputs(B, T, seed)
    keep = high_entropy_mask(x, top_entropy_quantile=rho).mask & x.response_mask
    assert torch.equal(keep, ref.high_entropy_keep(x.entropy, x.response_mask, rho))


def test_m2po_hand():
    # log π_old − log μ = [0.1, 1.0, −0.3, 0.05] → M₂ = [0.01, 1.0, 0.09, 0.0025]; τ = 0.04
    # mean of all 1.1025/4 = 0.2756 ≥ τ; drop 1.0 → 0.1025/3 = 0.0342 < τ: one token dropped
    inputs = make([[-1.0] * 4], old=[[-1.0, -1.0, -1.0, -1.0]], rollout=[[-1.1, -2.0, -0.7, -1.05]], adv=[[1.0] * 4])
    out = m2po_mask(inputs)
    assert out.mask.tolist() == [[True, False, True, True]]
    close(out.metrics["m2po/masked_frac"], 0.25)
    close(out.metrics["m2po/m2_mean"], 1.1025 / 4)
    close(out.metrics["m2po/m2_kept_mean"], 0.1025 / 3)
    # τ = 0.005: dropping 1.0 and 0.09 leaves (0.01 + 0.0025)/2 = 0.00625 ≥ τ, dropping 0.01 too leaves 0.0025
    assert m2po_mask(inputs, m2_threshold=0.005).mask.tolist() == [[False, False, False, True]]


def test_m2po_keeps_one_token_when_nothing_reaches_the_threshold():
    # AReaL: no suffix mean below τ → mask all but one (the smallest M₂)
    inputs = make([[0.0, 0.0]], old=[[-1.0, -1.0]], rollout=[[-2.0, -3.0]], adv=[[1.0, 1.0]], mask=[[True, True]])
    assert m2po_mask(inputs, m2_threshold=0.5, anchor="old").mask.tolist() == [[True, False]]


@pytest.mark.parametrize("B,T,seed", SHAPES)
@pytest.mark.parametrize("threshold", [0.01, 0.04, 0.2])
@pytest.mark.parametrize("anchor", ["old", "current"])
def test_m2po_matches_loop(B, T, seed, threshold, anchor):
    x = random_inputs(B, T, seed)
    keep = m2po_mask(x, m2_threshold=threshold, anchor=anchor).mask & x.response_mask
    side = x.old_logprobs if anchor == "old" else x.logprobs.detach()
    assert torch.equal(keep, ref.m2po_keep(side, x.rollout_logprobs, x.response_mask, threshold))


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 10_000), threshold=st.floats(1e-3, 1.0))
def test_m2po_kept_second_moment_is_below_the_threshold(seed, threshold):
    x = random_inputs(4, 6, seed, spread=0.5)
    out = m2po_mask(x, m2_threshold=threshold)
    kept = out.mask & x.response_mask
    if int(x.response_mask.sum()) > 0:
        assert int(kept.sum()) >= 1  # never empties the batch
    if int(kept.sum()) > 1:
        assert out.metrics["m2po/m2_kept_mean"].item() < threshold


@pytest.mark.parametrize("fn,kw", [(high_entropy_mask, {}), (m2po_mask, {})])
@pytest.mark.parametrize("seed", range(5))
def test_masks_reject_nothing_at_padding_and_ignore_garbage(fn, kw, seed):
    x = random_inputs(4, 6, seed)
    a = fn(poison(x, 0.0), **kw)
    b = fn(poison(x, NAN), **kw)
    assert torch.equal(a.mask, b.mask)
    assert a.mask[~x.response_mask].all()  # padding: True ("rejects nothing"), so `response_mask & mask` stays False
    for k in a.metrics:
        torch.testing.assert_close(a.metrics[k], b.metrics[k], msg=k)
        assert math.isfinite(a.metrics[k].item())


def test_missing_inputs_name_the_fix():
    x = random_inputs(2, 3, 0)
    with pytest.raises(ValueError, match="entropy"):
        high_entropy_mask(dataclasses.replace(x, entropy=None))
    with pytest.raises(ValueError, match="rollout_logprobs"):
        m2po_mask(dataclasses.replace(x, rollout_logprobs=None))
    with pytest.raises(ValueError, match="top_entropy_quantile"):
        high_entropy_mask(x, top_entropy_quantile=0.0)
    with pytest.raises(ValueError, match="anchor"):
        m2po_mask(x, anchor="rollout")
