"""Tests for ops/diagnostics.py.

.venv/bin/python -m pytest -q tests/ops/test_diagnostics.py
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import reference_correction as ref
from steadyrl.ops import diagnostics as D

F64 = torch.float64


def close(actual, expected, tol=1e-6):
    assert math.isclose(float(actual), expected, rel_tol=tol, abs_tol=tol), (float(actual), expected)


# ------------------------------------------------------------------ entropy


def test_entropy_hand_values():
    V = 7
    close(D.entropy_from_logits(torch.zeros(2, V))[0], math.log(V))  # uniform: H = log V
    # p = (0.25, 0.75): H = −(0.25 ln 0.25 + 0.75 ln 0.75) = 0.5623351446
    close(D.entropy_from_logits(torch.tensor([[0.0, math.log(3.0)]]))[0], 0.5623351446)
    # a −inf logit has p = 0 and contributes 0 (not NaN): one certain token → H = 0
    assert D.entropy_from_logits(torch.tensor([[0.0, -float("inf"), -float("inf")]]))[0] == 0.0


@pytest.mark.parametrize("shape,chunk", [((1, 5), 1), ((4, 9), 3), ((2, 3, 11), 2), ((3, 4, 6), 1000)])
def test_entropy_matches_loop_reference(shape, chunk):
    gen = torch.Generator().manual_seed(sum(shape))
    logits = 3 * torch.randn(*shape, generator=gen, dtype=F64)
    out = D.entropy_from_logits(logits, chunk_size=chunk)
    expected = ref.entropy(logits.reshape(-1, shape[-1]).tolist())
    assert out.shape == shape[:-1] and out.dtype == torch.float32
    torch.testing.assert_close(
        out.reshape(-1).double(), torch.tensor(expected, dtype=F64), rtol=1e-5, atol=1e-6
    )


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 12), vocab=st.integers(1, 20), chunk=st.integers(1, 15), seed=st.integers(0, 999))
def test_entropy_is_independent_of_chunking_and_detached(rows, vocab, chunk, seed):
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)).requires_grad_(True)
    out = D.entropy_from_logits(logits, chunk_size=chunk)
    torch.testing.assert_close(out, D.entropy_from_logits(logits, chunk_size=rows))
    assert not out.requires_grad
    assert (out >= -1e-6).all() and (out <= math.log(vocab) + 1e-5).all()


def test_entropy_of_bf16_logits_is_computed_in_fp32():
    logits = torch.randn(5, 33, dtype=torch.bfloat16)
    out = D.entropy_from_logits(logits, chunk_size=2)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, D.entropy_from_logits(logits.float()))


# ------------------------------------------------------------------ clip fractions, k3


def test_clip_fractions_hand_values():
    ratio = torch.tensor([[0.7, 0.9, 1.3, 1.5, float("nan")]])
    adv = torch.tensor([[-1.0, -1.0, 1.0, -1.0, 1.0]])
    mask = torch.tensor([[True, True, True, True, False]])
    m = D.clip_fractions(ratio, adv, mask, eps_low=0.2, eps_high=0.28)
    # low: 0.7 < 0.8 with Â < 0 (yes); high: 1.3 > 1.28 with Â > 0 (yes), 1.5 has Â < 0 (clip inactive)
    close(m["ratio/clip_frac_low"], 1 / 4)
    close(m["ratio/clip_frac_high"], 1 / 4)
    close(m["ratio/clip_frac"], 1 / 2)


@pytest.mark.parametrize("seed,batch,length", [(0, 1, 1), (1, 4, 9), (2, 7, 3)])
def test_clip_fractions_match_loop_reference(seed, batch, length):
    gen = torch.Generator().manual_seed(seed)
    ratio = torch.exp(0.3 * torch.randn(batch, length, generator=gen, dtype=F64))
    adv = torch.randn(batch, generator=gen, dtype=F64)
    mask = torch.rand(batch, length, generator=gen) < 0.7
    out = D.clip_fractions(ratio, adv, mask, eps_low=0.2, eps_high=0.27)
    # (B,) advantages broadcast over tokens, as (B, T) would
    expected = ref.clip_fractions(
        ratio.tolist(), adv[:, None].expand(batch, length).tolist(), mask.tolist(), 0.2, 0.27
    )
    for key, value in expected.items():
        close(out[key], value)


def test_approx_kl_k3_hand_values():
    logp = torch.tensor([[math.log(2.0), 0.0, 5.0]])
    old = torch.tensor([[0.0, 0.0, float("nan")]])
    mask = torch.tensor([[True, True, False]])
    close(D.approx_kl_k3(logp, old, mask), (2.0 - 1.0 - math.log(2.0)) / 2)  # r = 2 and r = 1 (k3 = 0)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 999), batch=st.integers(1, 5), length=st.integers(1, 8))
def test_approx_kl_k3_matches_reference_and_is_nonnegative(seed, batch, length):
    gen = torch.Generator().manual_seed(seed)
    old = -3 * torch.rand(batch, length, generator=gen, dtype=F64)
    logp = old + torch.randn(batch, length, generator=gen, dtype=F64)
    mask = torch.rand(batch, length, generator=gen) < 0.7
    out = D.approx_kl_k3(logp, old, mask)
    close(out, ref.approx_kl_k3(logp.tolist(), old.tolist(), mask.tolist()), tol=1e-9)
    assert out >= 0
    assert D.approx_kl_k3(old, old, mask) == 0


# ------------------------------------------------------------------ weights, ESS, groups


def test_effective_sample_size_hand_values():
    ones = torch.ones(4, dtype=torch.bool)
    close(D.effective_sample_size(torch.ones(4), ones), 1.0)  # equal weights
    close(D.effective_sample_size(torch.tensor([1.0, 0.0, 0.0, 0.0]), ones), 0.25)  # one carries all: 1/N
    close(D.effective_sample_size(torch.tensor([2.0, 1.5, 0.25]), ones[:3]), 3.75**2 / (3 * 6.3125))
    assert D.effective_sample_size(torch.ones(3), torch.zeros(3, dtype=torch.bool)) == 0  # nothing selected
    assert D.effective_sample_size(torch.zeros(3), ones[:3]) == 0  # all weight zero


def test_is_weight_stats_hand_values_and_empty_identities():
    w = torch.tensor([[2.0, 0.5, float("nan")]])
    mask = torch.tensor([[True, True, False]])
    m = D.is_weight_stats(w, mask, prefix="mismatch/is_")
    assert set(m) == {
        "mismatch/is_weight_mean",
        "mismatch/is_weight_min",
        "mismatch/is_weight_max",
        "mismatch/is_ess",
    }
    close(m["mismatch/is_weight_mean"], 1.25)
    close(m["mismatch/is_weight_min"], 0.5)
    close(m["mismatch/is_weight_max"], 2.0)
    close(m["mismatch/is_ess"], 2.5**2 / (2 * 4.25))  # (Σw)² / (N Σw²)
    empty = D.is_weight_stats(w, torch.zeros_like(mask))
    assert empty["is/weight_min"] == float("inf") and empty["is/weight_max"] == float("-inf")
    assert empty["is/weight_mean"] == 0 and empty["is/ess"] == 0


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 999), n=st.integers(1, 20))
def test_is_weight_stats_match_loop_reference(seed, n):
    gen = torch.Generator().manual_seed(seed)
    w = torch.rand(n, generator=gen, dtype=F64) * 3
    mask = torch.rand(n, generator=gen) < 0.7
    out = D.is_weight_stats(w, mask, prefix="mismatch/is_")
    for key, value in ref.weight_stats(w.tolist(), mask.tolist()).items():
        assert float(out[key]) == pytest.approx(value, rel=1e-9, abs=1e-12)


def test_zero_variance_group_frac_hand_values():
    nan = float("nan")
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, nan, 1.0, nan, nan])
    # groups of 2: [1,1] flat; [0,1] not; [nan,1] one reward → flat; [nan,nan] → flat  ⇒ 3/4
    close(D.zero_variance_group_frac(rewards, 2), 0.75)
    close(D.zero_variance_group_frac(rewards, 8), 0.0)  # one group with 0 and 1
    with pytest.raises(ValueError, match="group_size"):
        D.zero_variance_group_frac(rewards, 3)


@settings(max_examples=40, deadline=None)
@given(
    rewards=st.lists(st.sampled_from([0.0, 1.0, 0.5, float("nan")]), min_size=1, max_size=24),
    group=st.integers(1, 6),
)
def test_zero_variance_group_frac_matches_loop_reference(rewards, group):
    rewards = rewards[: len(rewards) - len(rewards) % group] or [0.0] * group
    out = D.zero_variance_group_frac(torch.tensor(rewards), group)
    close(out, ref.zero_variance_group_frac(rewards, group), tol=1e-7)


# ------------------------------------------------------------------ gradients


def test_grad_cosine_and_norm_hand_values():
    a = [torch.tensor([1.0, 0.0]), None, torch.tensor([[0.0]])]
    b = [torch.tensor([1.0, 1.0]), torch.tensor([5.0]), None]
    # None is a zero gradient: a = (1, 0, 0, 0), b = (1, 1, 5, 0) → 1 / √27
    close(D.grad_cosine(a, b), 1 / math.sqrt(27))
    close(D.grad_global_norm([torch.tensor([3.0]), None, torch.tensor([[4.0]])]), 5.0)  # √(9 + 16)
    assert D.grad_cosine([torch.zeros(3)], [torch.ones(3)]) == 0  # zero norm → 0, not NaN
    assert D.grad_cosine([None], [None]) == 0
    with pytest.raises(ValueError, match="length"):
        D.grad_cosine([None], [None, None])


def random_grads(seed, n_params, with_none=True):
    gen = torch.Generator().manual_seed(seed)
    grads = []
    for k in range(n_params):
        size = int(torch.randint(1, 6, (1,), generator=gen))
        g = torch.randn(size, generator=gen, dtype=F64)
        grads.append(None if with_none and k % 3 == 2 else g)
    return grads


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 999), n=st.integers(1, 7), scale=st.floats(1e-3, 1e3))
def test_grad_cosine_with_itself_is_one_and_with_negation_minus_one(seed, n, scale):
    g = random_grads(seed, n, with_none=False)
    close(D.grad_cosine(g, [scale * x for x in g]), 1.0, tol=1e-5)
    close(D.grad_cosine(g, [-x for x in g]), -1.0, tol=1e-5)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 999), n=st.integers(1, 7))
def test_grad_cosine_and_norm_match_loop_reference(seed, n):
    a = random_grads(seed, n)
    b = [
        None if x is None and k % 2 else (torch.randn_like(x) if x is not None else torch.randn(3, dtype=F64))
        for k, x in enumerate(a)
    ]
    as_lists = lambda gs: [None if g is None else g.reshape(-1).tolist() for g in gs]  # noqa: E731
    close(D.grad_cosine(a, b), ref.grad_cosine(as_lists(a), as_lists(b)), tol=1e-5)
    close(D.grad_global_norm(a), ref.grad_global_norm(as_lists(a)), tol=1e-5)


def test_grad_cosine_per_module_hand_values_and_consistency():
    a = [torch.tensor([1.0, 0.0]), torch.tensor([2.0]), torch.tensor([1.0])]
    b = [torch.tensor([0.0, 1.0]), torch.tensor([2.0]), torch.tensor([-3.0])]
    m = D.grad_cosine_per_module(["mlp", "mlp", "attn"], a, b)
    # mlp: a = (1, 0, 2), b = (0, 1, 2) → 4 / (√5 · √5) = 0.8 ; attn: 1·(−3) / (1·3) = −1
    close(m["grad/cos/mlp"], 0.8)
    close(m["grad/cos/attn"], -1.0)
    one = D.grad_cosine_per_module(["all"] * 3, a, b, prefix="c/")
    close(one["c/all"], float(D.grad_cosine(a, b)))


def test_grad_stats_accept_bf16_and_return_fp32():
    g = [torch.randn(8, dtype=torch.bfloat16)]
    assert D.grad_cosine(g, g).dtype == torch.float32
    close(D.grad_cosine(g, g), 1.0, tol=1e-5)
    close(D.grad_global_norm(g), float(g[0].float().norm()), tol=1e-6)


def test_masked_min_max_and_at_least_fp32():
    x = torch.tensor([3.0, -1.0, float("nan")])
    keep = torch.tensor([True, True, False])
    assert D.masked_min(x, keep) == -1.0 and D.masked_max(x, keep) == 3.0
    assert D.at_least_fp32(torch.ones(2, dtype=torch.bfloat16)).dtype == torch.float32
    assert D.at_least_fp32(torch.ones(2, dtype=F64)).dtype == F64
