"""Tests for steadyrl.ops.gradients: hand values, loop references, PCGrad / PCR invariants, α limits.

Run: .venv/bin/python -m pytest -q tests/ops/test_gradients.py
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from steadyrl.ops import gradients as G

SETTINGS = settings(max_examples=60, deadline=None)


def t64(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# ----------------------------------------------------------------------------- loop references (methods.md §2)


def ref_dot(a: list[float], b: list[float]) -> float:
    total = 0.0
    for i in range(len(a)):
        total += a[i] * b[i]
    return total


def ref_project(g: list[float], o: list[float], strength: float) -> list[float]:
    """g − s·⟨g,o⟩/‖o‖²·o if ⟨g,o⟩ < 0 (and o ≠ 0), else g."""
    dot, sq = ref_dot(g, o), ref_dot(o, o)
    if dot < 0 and sq > 0:
        return [g[i] - strength * dot / sq * o[i] for i in range(len(g))]
    return list(g)


def ref_pcgrad(g1: list[float], g2: list[float]) -> tuple[list[float], list[float]]:
    """Yu et al. 2020, two tasks: each projected against the other's original gradient when they conflict."""
    return ref_project(g1, g2, 1.0), ref_project(g2, g1, 1.0)


def ref_trace_variance(samples: list[list[float]]) -> float:
    """tr of the unbiased sample covariance: Σ_d Σ_j (x_jd − x̄_d)² / (J − 1); 0 for J < 2."""
    n = len(samples)
    if n < 2:
        return 0.0
    dims = len(samples[0])
    total = 0.0
    for d in range(dims):
        mean = sum(samples[j][d] for j in range(n)) / n
        for j in range(n):
            total += (samples[j][d] - mean) ** 2
    return total / (n - 1)


def ref_pcr(samples_pla: list[list[float]], samples_sta: list[list[float]]) -> tuple[float, list[float]]:
    """methods.md §2 implementable reading for one block: α from the trace variances, then Eq. 15."""
    n, dims = len(samples_pla), len(samples_pla[0])
    mu_p = [sum(samples_pla[j][d] for j in range(n)) / n for d in range(dims)]
    mu_s = [sum(samples_sta[j][d] for j in range(n)) / n for d in range(dims)]
    var_p, var_s = ref_trace_variance(samples_pla), ref_trace_variance(samples_sta)
    alpha = var_p / (var_p + var_s) if var_p + var_s > 0 else 0.0
    return alpha, ref_project(mu_p, mu_s, alpha)


def ref_blockwise_inner(a: list[list[float]], b: list[list[float]], index: list[int], num_blocks: int) -> list[float]:
    out = [0.0] * num_blocks
    for i in range(len(a)):
        out[index[i]] += ref_dot(a[i], b[i])
    return out


# ----------------------------------------------------------------------------- hand-computed values


def test_inner_product_and_conflict_coefficient_hand_values():
    # ⟨(1,2),(3,4)⟩ = 3 + 8 = 11
    assert G.inner_product(t64([1.0, 2.0]), t64([3.0, 4.0])).item() == 11.0
    # κ = s·min(dot,0)/‖o‖² = 0.5·(−2)/4 = −0.25 ; dot ≥ 0 -> 0 ; ‖o‖ = 0 -> 0
    kappa = G.conflict_coefficient(t64([-2.0, 1.0, 0.0]), t64([4.0, 4.0, 0.0]), 0.5)
    assert kappa.tolist() == [-0.25, 0.0, 0.0]
    # per-element strength: s = (1, 0.5): −2/4 = −0.5 ; 0.5·(−3)/1 = −1.5
    assert G.conflict_coefficient(t64([-2.0, -3.0]), t64([4.0, 1.0]), t64([1.0, 0.5])).tolist() == [-0.5, -1.5]


def test_project_conflicting_hand_values():
    g, o = t64([1.0, 1.0]), t64([-1.0, 0.0])
    # ⟨g,o⟩ = −1, ‖o‖² = 1: g − (−1)·o = (1,1) + (−1,0) = (0,1)
    assert G.project_conflicting(g, o).tolist() == [0.0, 1.0]
    # half strength: (1,1) − 0.5·(−1)·(−1,0) = (0.5, 1)
    assert G.project_conflicting(g, o, 0.5).tolist() == [0.5, 1.0]
    # no conflict (⟨g,(1,0)⟩ = 1 > 0) and o = 0: unchanged
    assert G.project_conflicting(g, t64([1.0, 0.0])).tolist() == [1.0, 1.0]
    assert G.project_conflicting(g, t64([0.0, 0.0])).tolist() == [1.0, 1.0]


def test_pcgrad_project_hand_values():
    g1, g2 = t64([1.0, 1.0]), t64([-1.0, 0.0])
    p1, p2 = G.pcgrad_project(g1, g2)
    # dot = −1: g1' = (1,1) − (−1/1)(−1,0) = (0,1) ; g2' = (−1,0) − (−1/2)(1,1) = (−0.5, 0.5)
    assert p1.tolist() == [0.0, 1.0]
    assert p2.tolist() == [-0.5, 0.5]
    # sum (−0.5, 1.5): ⟨sum,g1⟩ = 1 ≥ 0, ⟨sum,g2⟩ = 0.5 ≥ 0
    assert G.inner_product(p1 + p2, g1).item() == 1.0 and G.inner_product(p1 + p2, g2).item() == 0.5
    # not conflicting (dot = 1): both unchanged
    q1, q2 = G.pcgrad_project(g1, t64([1.0, 0.0]))
    assert q1.tolist() == [1.0, 1.0] and q2.tolist() == [1.0, 0.0]


def test_pcr_soft_projection_hand_values():
    mu_pla, mu_sta = t64([1.0, 1.0]), t64([-1.0, 0.0])
    # c = −1, ‖μ_sta‖² = 1: g = μ_pla − α·(−1)·μ_sta = (1 − α, 1)
    assert G.pcr_soft_projection(mu_pla, mu_sta, 0.5).tolist() == [0.5, 1.0]
    assert G.pcr_soft_projection(mu_pla, mu_sta, 0.0).tolist() == [1.0, 1.0]  # plain GRPO direction
    assert G.pcr_soft_projection(mu_pla, mu_sta, 1.0).tolist() == [0.0, 1.0]  # full (one-sided PCGrad)
    # stacked blocks with per-block α: block 2 (3,0) vs (−2,0): c = −6, ‖μ_s‖² = 4, α = 0.25 -> 3 − 0.25·(−6/4)·(−2) = 2.25
    out = G.pcr_soft_projection(t64([[1.0, 1.0], [3.0, 0.0]]), t64([[-1.0, 0.0], [-2.0, 0.0]]), t64([1.0, 0.25]))
    assert out.tolist() == [[0.0, 1.0], [2.25, 0.0]]
    # ‖μ_sta‖ = 0: returned unchanged (no NaN)
    assert G.pcr_soft_projection(mu_pla, t64([0.0, 0.0]), 1.0).tolist() == [1.0, 1.0]


def test_trace_variance_hand_values():
    # samples (1,0), (3,0): S = (4,0), Q = 1 + 9 = 10, ‖S‖²/J = 16/2 = 8 -> (10 − 8)/1 = 2
    assert G.trace_variance(t64([4.0, 0.0]), t64(10.0), 2).item() == 2.0
    # samples (1,2), (3,0), (2,1): S = (6,3), Q = 5 + 9 + 5 = 19, ‖S‖²/J = 45/3 = 15 -> (19 − 15)/2 = 2
    assert G.trace_variance(t64([6.0, 3.0]), t64(19.0), torch.tensor(3.0)).item() == 2.0
    # J < 2: 0 (one sample has no spread), also for J = 0
    assert G.trace_variance(t64([1.0, 2.0]), t64(5.0), 1).item() == 0.0
    assert G.trace_variance(t64([0.0, 0.0]), t64(0.0), 0).item() == 0.0
    # round-off below zero is clamped: Q = 7.999999 < ‖S‖²/J = 8
    assert G.trace_variance_from_norms(t64(16.0), t64(7.999999), 2).item() == 0.0


def test_pcr_alpha_hand_values():
    # α = σ²_pla / (σ²_pla + σ²_sta + ε): 3/(3+1) = 0.75 ; with ε = 1: 3/5 = 0.6 ; both 0 -> 0
    assert G.pcr_alpha(t64([3.0, 0.0]), t64([1.0, 0.0])).tolist() == [0.75, 0.0]
    assert G.pcr_alpha(t64(3.0), t64(1.0), eps=1.0).item() == pytest.approx(0.6)
    assert G.pcr_alpha(t64(0.0), t64(0.0), eps=1e-3).item() == 0.0


def test_blockwise_inner_hand_values():
    a = [t64([1.0, 2.0]), t64([[3.0]]), t64([4.0])]
    b = [t64([1.0, 1.0]), t64([[2.0]]), t64([0.5])]
    # block 0: ⟨(1,2),(1,1)⟩ + 4·0.5 = 3 + 2 = 5 ; block 1: 3·2 = 6 ; block 2: empty -> 0
    out = G.blockwise_inner(a, b, torch.tensor([0, 1, 0]), 3)
    assert out.tolist() == [5.0, 6.0, 0.0]
    with pytest.raises(ValueError, match="one each"):
        G.blockwise_inner(a, b[:2], torch.tensor([0, 1, 0]), 3)


# ----------------------------------------------------------------------------- loop references


def _random_vectors(rng: random.Random, count: int, dims: int, scale: float = 1.0) -> list[list[float]]:
    return [[rng.gauss(0.0, scale) for _ in range(dims)] for _ in range(count)]


@pytest.mark.parametrize("seed", range(8))
def test_projections_match_loop_reference(seed):
    rng = random.Random(seed)
    dims = rng.randint(1, 7)
    g, o = _random_vectors(rng, 2, dims)
    strength = rng.random()
    assert G.project_conflicting(t64(g), t64(o), strength).tolist() == pytest.approx(ref_project(g, o, strength))
    assert G.pcr_soft_projection(t64(g), t64(o), strength).tolist() == pytest.approx(ref_project(g, o, strength))
    p1, p2 = G.pcgrad_project(t64(g), t64(o))
    r1, r2 = ref_pcgrad(g, o)
    assert p1.tolist() == pytest.approx(r1) and p2.tolist() == pytest.approx(r2)


@pytest.mark.parametrize("seed", range(8))
def test_stacked_blocks_match_loop_reference(seed):
    rng = random.Random(100 + seed)
    blocks, dims = rng.randint(1, 5), rng.randint(1, 6)
    g, o = _random_vectors(rng, blocks, dims), _random_vectors(rng, blocks, dims)
    strength = [rng.random() for _ in range(blocks)]
    out = G.project_conflicting(t64(g), t64(o), t64(strength))
    for m in range(blocks):
        assert out[m].tolist() == pytest.approx(ref_project(g[m], o[m], strength[m]))


@pytest.mark.parametrize("seed", range(8))
def test_trace_variance_and_pcr_match_loop_reference(seed):
    rng = random.Random(200 + seed)
    count, dims = rng.randint(1, 6), rng.randint(1, 6)
    pla = _random_vectors(rng, count, dims, scale=rng.uniform(0.1, 3.0))
    sta = _random_vectors(rng, count, dims, scale=rng.uniform(0.1, 3.0))

    def streaming(samples):  # S and Q as a combiner accumulates them
        x = t64(samples)
        return x.sum(0), (x * x).sum()

    s_pla, q_pla = streaming(pla)
    s_sta, q_sta = streaming(sta)
    var_pla = G.trace_variance(s_pla, q_pla, count)
    var_sta = G.trace_variance(s_sta, q_sta, count)
    assert var_pla.item() == pytest.approx(ref_trace_variance(pla), rel=1e-9, abs=1e-12)
    alpha = G.pcr_alpha(var_pla, var_sta)
    ref_alpha, ref_direction = ref_pcr(pla, sta)
    assert alpha.item() == pytest.approx(ref_alpha, rel=1e-9, abs=1e-12)
    direction = G.pcr_soft_projection(s_pla / count, s_sta / count, alpha)
    assert direction.tolist() == pytest.approx(ref_direction, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_blockwise_inner_matches_loop_reference(seed):
    rng = random.Random(300 + seed)
    n, blocks = rng.randint(1, 6), rng.randint(1, 4)
    sizes = [rng.randint(1, 5) for _ in range(n)]
    a = [[rng.gauss(0, 1) for _ in range(k)] for k in sizes]
    b = [[rng.gauss(0, 1) for _ in range(k)] for k in sizes]
    index = [rng.randrange(blocks) for _ in range(n)]
    out = G.blockwise_inner([t64(x) for x in a], [t64(x) for x in b], torch.tensor(index), blocks)
    assert out.tolist() == pytest.approx(ref_blockwise_inner(a, b, index, blocks))


# ----------------------------------------------------------------------------- properties

vectors = st.integers(1, 6).flatmap(
    lambda d: st.tuples(
        *[st.lists(st.floats(-10, 10, allow_nan=False, allow_subnormal=False), min_size=d, max_size=d)] * 2
    )
)


@SETTINGS
@given(vectors)
def test_pcgrad_result_never_conflicts_with_either_input(pair):
    g1, g2 = t64(pair[0]), t64(pair[1])
    p1, p2 = G.pcgrad_project(g1, g2)
    scale = 1e-9 * (1.0 + g1.norm() * g2.norm() + g1.norm() ** 2 + g2.norm() ** 2)
    assert G.inner_product(p1 + p2, g1) >= -scale
    assert G.inner_product(p1 + p2, g2) >= -scale
    assert G.inner_product(p1, g2) >= -scale and G.inner_product(p2, g1) >= -scale


@SETTINGS
@given(vectors, st.floats(0.0, 1.0))
def test_soft_projection_moves_only_the_conflicting_component(pair, alpha):
    mu_pla, mu_sta = t64(pair[0]), t64(pair[1])
    out = G.pcr_soft_projection(mu_pla, mu_sta, alpha)
    c, sq = G.inner_product(mu_pla, mu_sta), G.inner_product(mu_sta, mu_sta)
    tol = 1e-9 * (1.0 + mu_pla.norm() * mu_sta.norm() + mu_pla.norm() ** 2)
    # ⟨g, μ_sta⟩ = c − α·min(c, 0): the conflict shrinks by (1 − α), agreement untouched
    assert abs(G.inner_product(out, mu_sta) - (c - alpha * min(c.item(), 0.0))) <= tol * (1.0 + sq)
    # the part of μ_pla orthogonal to μ_sta never changes
    if sq > 1e-12:
        ortho = lambda v: v - G.inner_product(v, mu_sta) / sq * mu_sta  # noqa: E731
        assert torch.allclose(ortho(out), ortho(mu_pla), atol=1e-7 * (1.0 + mu_pla.norm().item()))
    # full strength never conflicts
    assert G.inner_product(G.pcr_soft_projection(mu_pla, mu_sta, 1.0), mu_sta) >= -tol * (1.0 + sq)


@SETTINGS
@given(vectors, st.floats(0.0, 1.0), st.floats(1e-3, 1e3))
@example(([-1.0], [2.93e-162]), 1.0, 2.0)  # ‖μ_sta‖² underflowed before the max-abs rescaling
def test_projection_is_scale_invariant(pair, alpha, scale):
    # What lets the combiner project sums S = J·μ instead of means: P(cμ_p, cμ_s) = c·P(μ_p, μ_s) for c > 0.
    mu_pla, mu_sta = t64(pair[0]), t64(pair[1])
    assert torch.allclose(
        G.pcr_soft_projection(scale * mu_pla, scale * mu_sta, alpha),
        scale * G.pcr_soft_projection(mu_pla, mu_sta, alpha),
        rtol=1e-9,
        atol=1e-9 * scale * (1.0 + mu_pla.norm().item()),
    )


@SETTINGS
@given(st.integers(2, 6), st.integers(1, 5), st.integers(0, 2**31 - 1), st.floats(-50, 50))
def test_trace_variance_is_translation_invariant(count, dims, seed, shift):
    rng = random.Random(seed)
    x = t64(_random_vectors(rng, count, dims))
    moved = x + shift
    var = G.trace_variance(x.sum(0), (x * x).sum(), count)
    var_moved = G.trace_variance(moved.sum(0), (moved * moved).sum(), count)
    assert var >= 0 and var_moved.item() == pytest.approx(var.item(), rel=1e-6, abs=1e-6 * (1 + shift**2))


@SETTINGS
@given(st.floats(0, 1e6), st.floats(0, 1e6))
def test_alpha_is_a_precision_weight(var_pla, var_sta):
    alpha = G.pcr_alpha(t64(var_pla), t64(var_sta))
    swapped = G.pcr_alpha(t64(var_sta), t64(var_pla))
    assert 0.0 <= alpha.item() <= 1.0
    if var_pla + var_sta > 0:
        assert alpha.item() + swapped.item() == pytest.approx(1.0)  # α(σ_p, σ_s) = 1 − α(σ_s, σ_p)
    else:
        assert alpha.item() == 0.0


# ----------------------------------------------------------------------------- α limits (methods.md §2, step 3)


@pytest.mark.parametrize("noisy", ["plasticity", "stability"])
def test_alpha_limits(noisy):
    gen = torch.Generator().manual_seed(0)
    count, dims = 64, 5
    mu_pla, mu_sta = t64([1.0, 1.0, 0.0, 0.0, 0.0]), t64([-1.0, 0.0, 0.0, 0.0, 0.0])
    big, small = 30.0, 1e-3
    noise_pla = torch.randn(count, dims, generator=gen, dtype=torch.float64) * (big if noisy == "plasticity" else small)
    noise_sta = torch.randn(count, dims, generator=gen, dtype=torch.float64) * (small if noisy == "plasticity" else big)
    # centre the noise so the sample means are exactly μ_pla, μ_sta
    pla = mu_pla + noise_pla - noise_pla.mean(0)
    sta = mu_sta + noise_sta - noise_sta.mean(0)
    var_pla = G.trace_variance(pla.sum(0), (pla * pla).sum(), count)
    var_sta = G.trace_variance(sta.sum(0), (sta * sta).sum(), count)
    alpha = G.pcr_alpha(var_pla, var_sta)
    out = G.pcr_soft_projection(pla.mean(0), sta.mean(0), alpha)
    if noisy == "plasticity":  # α -> 1: full projection, (1,1) -> (0,1)
        assert alpha.item() > 1 - 1e-6
        assert torch.allclose(out, t64([0.0, 1.0, 0.0, 0.0, 0.0]), atol=1e-6)
    else:  # α -> 0: the plain plasticity direction
        assert alpha.item() < 1e-6
        assert torch.allclose(out, mu_pla, atol=1e-6)


def test_float32_inputs_stay_finite():
    g = torch.tensor([1e-20, -1e-20], dtype=torch.float32)
    o = torch.tensor([-1e-20, 0.0], dtype=torch.float32)  # ‖o‖² = 1e-40 is subnormal in fp32
    out = G.pcr_soft_projection(g, o, 1.0)
    assert torch.isfinite(out).all() and not math.isnan(G.pcr_alpha(torch.tensor(0.0), torch.tensor(0.0)).item())
