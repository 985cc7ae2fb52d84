"""The native sampler's pure pieces: top-k / top-p filters, μ over the vocabulary, the categorical draw.

Run: .venv/bin/python -m pytest -q tests/rollout/test_native_sampling.py
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from steadyrl.rollout.base import SamplingParams
from steadyrl.rollout.sampling import sample_categorical, sampling_logprobs, top_k_filter, top_p_filter

# ------------------------------------------------------------------ plain-loop references (definitions)


def top_k_reference(row: list[float], k: int) -> list[bool]:
    """Keep z_v iff z_v ≥ the k-th largest value (ties at the k-th value all kept)."""
    kth = sorted(row, reverse=True)[min(k, len(row)) - 1]
    return [z >= kth for z in row]


def top_p_reference(row: list[float], p: float) -> list[bool]:
    """Ascending by probability, c_i = running sum; drop c_i ≤ 1 − p; the largest token is always kept."""
    finite = [z for z in row if z != -math.inf]
    top = max(finite)
    weights = [math.exp(z - top) if z != -math.inf else 0.0 for z in row]
    total = sum(weights)
    order = sorted(range(len(row)), key=lambda v: weights[v])
    keep = [True] * len(row)
    running = 0.0
    for position, v in enumerate(order):
        running += weights[v] / total
        if running <= 1 - p and position != len(order) - 1:
            keep[v] = False
    return keep


def categorical_reference(probs: list[float], u: float) -> int:
    """The first v whose cumulative mass exceeds u · Σ probs."""
    total = sum(probs)
    running = 0.0
    for v, q in enumerate(probs):
        running += q
        if running > u * total:
            return v
    return max(v for v, q in enumerate(probs) if q > 0)


# ------------------------------------------------------------------ hand-computed values


def test_top_k_hand_values():
    z = torch.tensor([[1.0, 3.0, 2.0, 3.0]])
    # k = 2: the 2nd largest is 3 → both 3s kept, the 2 and the 1 dropped
    assert torch.equal(torch.isfinite(top_k_filter(z, 2)), torch.tensor([[False, True, False, True]]))
    # k = 3: the 3rd largest is 2 → only the 1 dropped; kept scores are returned unchanged
    out = top_k_filter(z, 3)
    assert torch.equal(torch.isfinite(out), torch.tensor([[False, True, True, True]]))
    assert torch.equal(out[:, 1:], z[:, 1:])
    # k larger than V keeps everything
    assert torch.equal(top_k_filter(z, 10), z)


def test_top_p_hand_values():
    z = torch.tensor([[0.1, 0.2, 0.3, 0.4]]).log()
    # ascending running mass 0.1, 0.3, 0.6, 1.0; p = 0.5 drops c ≤ 0.5 → the 0.1 and 0.2 tokens
    assert torch.equal(torch.isfinite(top_p_filter(z, 0.5)), torch.tensor([[False, False, True, True]]))
    # p = 0.35: 0.6 > 0.65 is false → the 0.3 token is dropped too, only the 0.4 token is left
    assert torch.equal(torch.isfinite(top_p_filter(z, 0.35)), torch.tensor([[False, False, False, True]]))
    # the boundary c = 1 − p is dropped: four equal logits have exact running masses 0.25, 0.5, 0.75, 1;
    # p = 0.5 drops the two tokens with c ≤ 0.5 and keeps two
    assert torch.isfinite(top_p_filter(torch.zeros(1, 4), 0.5)).sum() == 2
    # p tiny: the largest token is always kept
    assert torch.equal(torch.isfinite(top_p_filter(z, 1e-6)), torch.tensor([[False, False, False, True]]))


def test_sampling_logprobs_hand_values():
    z = torch.tensor([[0.1, 0.2, 0.3, 0.4]]).log()
    # top_p = 0.5 keeps {0.3, 0.4}: μ = (0, 0, 3/7, 4/7)
    mu = sampling_logprobs(z, SamplingParams(temperature=1.0, top_p=0.5)).exp()
    torch.testing.assert_close(mu, torch.tensor([[0.0, 0.0, 3 / 7, 4 / 7]]))
    # temperature 0.5 squares the probabilities: μ ∝ (0.01, 0.04, 0.09, 0.16) / 0.30
    mu = sampling_logprobs(z, SamplingParams(temperature=0.5)).exp()
    torch.testing.assert_close(mu, torch.tensor([[0.01, 0.04, 0.09, 0.16]]) / 0.30)
    # greedy: μ is the temperature-1 distribution, whatever top-k / top-p say
    mu = sampling_logprobs(z, SamplingParams(temperature=0.0, top_k=1, top_p=0.1)).exp()
    torch.testing.assert_close(mu, torch.tensor([[0.1, 0.2, 0.3, 0.4]]))


def test_sample_categorical_hand_values():
    g = torch.Generator().manual_seed(0)
    one_hot = torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 5.0]])  # unnormalised rows are fine
    for _ in range(20):
        assert sample_categorical(one_hot, g).tolist() == [2, 3]
    # zero-mass tokens are never drawn, even where the uniform lands exactly on a boundary
    two_point = torch.tensor([[0.5, 0.0, 0.5]]).expand(5000, 3)
    assert set(sample_categorical(two_point, g).tolist()) == {0, 2}


# ------------------------------------------------------------------ against transformers and the loop references


@pytest.mark.parametrize("seed", range(4))
def test_filters_equal_transformers_warpers(seed):
    g = torch.Generator().manual_seed(seed)
    rows, vocab = 16, 50
    logits = torch.randn(rows, vocab, generator=g) * 3
    logits[: rows // 2] = logits[: rows // 2].round()  # many ties, at the k-th value too
    logits[0, :10] = -math.inf  # already-filtered scores
    for k in (1, 2, 5, 49, 50, 80):
        expected = TopKLogitsWarper(top_k=k)(None, logits)
        assert torch.equal(top_k_filter(logits, k), expected)
    for p in (0.05, 0.3, 0.9, 0.99, 1.0):
        expected = TopPLogitsWarper(top_p=p)(None, logits)
        assert torch.equal(top_p_filter(logits, p), expected)


@pytest.mark.parametrize("seed", range(3))
def test_sampling_logprobs_equal_the_hf_processor_chain(seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(8, 40, generator=g) * 2
    for temperature, top_k, top_p in [
        (1.0, 0, 1.0),
        (0.7, 0, 1.0),
        (1.3, 7, 1.0),
        (0.8, 0, 0.9),
        (0.6, 12, 0.8),
    ]:
        scores = logits.clone()
        if temperature != 1.0:
            scores = TemperatureLogitsWarper(temperature)(None, scores)
        if top_k:
            scores = TopKLogitsWarper(top_k=top_k)(None, scores)
        if top_p < 1.0:
            scores = TopPLogitsWarper(top_p=top_p)(None, scores)
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
        assert torch.equal(sampling_logprobs(logits, params), torch.log_softmax(scores, dim=-1))


@pytest.mark.parametrize("seed", range(4))
def test_filters_equal_loop_references(seed):
    g = torch.Generator().manual_seed(100 + seed)
    rows = int(torch.randint(1, 6, (1,), generator=g))
    vocab = int(torch.randint(2, 30, (1,), generator=g))
    logits = torch.randn(rows, vocab, generator=g) * 2  # continuous: no ties, so the sort order cannot matter
    for k in range(1, vocab + 2):
        got = torch.isfinite(top_k_filter(logits, k)).tolist()
        assert got == [top_k_reference(row, k) for row in logits.tolist()]
    for p in (0.1, 0.5, 0.75, 0.95):
        got = torch.isfinite(top_p_filter(logits, p)).tolist()
        assert got == [top_p_reference(row, p) for row in logits.tolist()]


@pytest.mark.parametrize("seed", range(4))
def test_sample_categorical_equals_loop_reference(seed):
    g = torch.Generator().manual_seed(200 + seed)
    probs = torch.rand(32, 9, generator=g) * (torch.rand(32, 9, generator=g) > 0.4)
    probs[:, 4] += 1e-3  # every row has some mass
    state = g.get_state()
    drawn = sample_categorical(probs, g).tolist()
    uniforms = (
        torch.rand(32, 1, generator=torch.Generator().set_state(state), dtype=torch.float64)
        .squeeze(1)
        .tolist()
    )
    assert drawn == [categorical_reference(row, u) for row, u in zip(probs.tolist(), uniforms)]


def test_sample_categorical_empirical_frequencies():
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.0]).expand(40_000, 5)
    counts = torch.bincount(sample_categorical(probs, torch.Generator().manual_seed(3)), minlength=5)
    freq = counts.float() / 40_000
    # σ = √(p(1−p)/n) ≤ 0.0025; 5σ = 0.0125
    assert (freq - probs[0]).abs().max() < 0.0125
    assert counts[4] == 0


def test_sample_categorical_is_reproducible():
    probs = torch.rand(64, 30, generator=torch.Generator().manual_seed(0))
    first = sample_categorical(probs, torch.Generator().manual_seed(7))
    assert torch.equal(first, sample_categorical(probs, torch.Generator().manual_seed(7)))
    assert not torch.equal(first, sample_categorical(probs, torch.Generator().manual_seed(8)))


# ------------------------------------------------------------------ properties

_logit_rows = st.lists(
    st.lists(st.floats(-8, 8, allow_nan=False, width=32), min_size=2, max_size=24), min_size=1, max_size=4
).filter(lambda rows: len({len(r) for r in rows}) == 1)


@settings(deadline=None, max_examples=60)
@given(rows=_logit_rows, k=st.integers(1, 30))
def test_top_k_keeps_the_k_largest_and_nothing_below(rows, k):
    logits = torch.tensor(rows)
    kept = torch.isfinite(top_k_filter(logits, k))
    assert (kept.sum(-1) >= min(k, logits.shape[1])).all()
    for row, keep in zip(logits, kept):
        if (~keep).any():
            assert row[keep].min() > row[~keep].max()


@settings(deadline=None, max_examples=60)
@given(rows=_logit_rows, p=st.floats(0.01, 0.99))
def test_top_p_keeps_at_least_p_mass_and_the_most_likely_token(rows, p):
    logits = torch.tensor(rows, dtype=torch.float64)
    kept = torch.isfinite(top_p_filter(logits, p))
    probs = logits.softmax(-1)
    assert (probs.where(kept, 0).sum(-1) >= p - 1e-9).all()
    assert torch.equal(probs.where(kept, -1.0).amax(-1), probs.amax(-1))  # a most likely token is kept
    for row, keep in zip(probs, kept):
        if (~keep).any():
            assert row[keep].min() >= row[~keep].max()  # a nucleus: every kept token beats every dropped one


@settings(deadline=None, max_examples=40)
@given(
    rows=st.lists(
        st.lists(st.floats(0, 10, width=32), min_size=1, max_size=12), min_size=1, max_size=6
    ).filter(lambda rows: len({len(r) for r in rows}) == 1 and all(sum(r) > 0 for r in rows)),
    seed=st.integers(0, 2**31),
)
def test_sample_categorical_never_draws_zero_mass(rows, seed):
    probs = torch.tensor(rows)
    drawn = sample_categorical(probs, torch.Generator().manual_seed(seed))
    assert (probs.gather(1, drawn[:, None]) > 0).all()
