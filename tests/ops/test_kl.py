"""Tests for steadyrl.ops.kl: hand values, loop references, gradients, straight-through variants, properties.

Run: .venv/bin/python -m pytest -q tests/ops/test_kl.py
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import reference as ref
from steadyrl.ops import kl

ESTIMATORS = [kl.kl_k1, kl.kl_k2, kl.kl_k3, kl.kl_k1_st, kl.kl_k3_st]
SETTINGS = settings(max_examples=40, deadline=None)
NAN, INF = float("nan"), float("inf")
LOG_HALF, LOG_QUARTER = math.log(0.5), math.log(0.25)


def t64(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def ones_mask(x: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(x, dtype=torch.bool)


# ----------------------------------------------------------------------------- hand-computed values


def test_hand_values():
    # π_θ(y) = 0.5, π_ref(y) = 0.25:  log π − log π_ref = log 2 = 0.6931472
    # k1 = 0.6931472 ; k2 = ½ · 0.4804530 = 0.2402265
    # k3 = π_ref/π − log(π_ref/π) − 1 = 0.5 + 0.6931472 − 1 = 0.1931472
    lp, rp = t64([[LOG_HALF]]), t64([[LOG_QUARTER]])
    mask = ones_mask(lp)
    assert kl.kl_k1(lp, rp, mask).item() == pytest.approx(0.6931472, rel=1e-7)
    assert kl.kl_k2(lp, rp, mask).item() == pytest.approx(0.2402265, rel=1e-7)
    assert kl.kl_k3(lp, rp, mask).item() == pytest.approx(0.1931472, rel=1e-6)
    # swapped (π_θ = 0.25, π_ref = 0.5): k1 = −0.6931472 (k1 can be negative), k3 = 2 − 0.6931472 − 1 = 0.3068528
    assert kl.kl_k1(rp, lp, mask).item() == pytest.approx(-0.6931472, rel=1e-7)
    assert kl.kl_k3(rp, lp, mask).item() == pytest.approx(0.3068528, rel=1e-6)


def test_k3_clamps():
    # log π_ref − log π = −30 -> clamped to −20: e^−20 + 20 − 1 = 19.000000002 -> clamped to 10
    # log π_ref − log π = +25 -> clamped to 20: e^20 − 21 = 4.85e8 -> clamped to 10
    lp, rp = t64([[0.0, -25.0]]), t64([[-30.0, 0.0]])
    mask = ones_mask(lp)
    assert kl.kl_k3(lp, rp, mask).tolist() == [[10.0, 10.0]]
    # clamps off -> raw values: e^−30 + 30 − 1 = 29.0 and e^25 − 25 − 1 = 7.2005e10
    raw = kl.kl_k3(lp, rp, mask, log_ratio_clamp=INF, kl_clamp=INF)
    assert raw[0, 0].item() == pytest.approx(29.0 + math.exp(-30.0))
    assert raw[0, 1].item() == pytest.approx(math.exp(25.0) - 26.0)
    # log-ratio clamp at 2: e^−2 + 2 − 1 = 1.1353353 (under kl_clamp)
    assert kl.kl_k3(lp, rp, mask, log_ratio_clamp=2.0)[0, 0].item() == pytest.approx(1.1353353, rel=1e-7)


def test_masked_positions_are_exactly_zero():
    # masked positions hold NaN / ±inf log-probs; the estimators must give 0 there, finite elsewhere
    lp = t64([[LOG_HALF, NAN, -INF]])
    rp = t64([[LOG_QUARTER, 0.0, INF]])
    mask = torch.tensor([[True, False, False]])
    for estimator in ESTIMATORS:
        out = estimator(lp, rp, mask)
        assert out[0, 1:].tolist() == [0.0, 0.0]
        assert math.isfinite(out[0, 0].item())


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_signature(estimator):
    params = list(inspect.signature(estimator).parameters.values())
    assert [p.name for p in params[:3]] == ["logprobs", "ref_logprobs", "mask"]
    assert all(p.kind is p.KEYWORD_ONLY and p.default is not p.empty for p in params[3:])


# ----------------------------------------------------------------------------- gradients


def test_hand_gradients():
    # d/d log π at log π = log ½, log π_ref = log ¼:
    # k1: 1 ; k2: log π − log π_ref = 0.6931472 ; k3: 1 − π_ref/π = 1 − 0.5 = 0.5
    rp = t64([[LOG_QUARTER]])
    expected = {kl.kl_k1: 1.0, kl.kl_k2: 0.6931472, kl.kl_k3: 0.5, kl.kl_k1_st: 0.6931472, kl.kl_k3_st: 0.6931472}
    for estimator, grad in expected.items():
        lp = t64([[LOG_HALF]]).requires_grad_(True)
        estimator(lp, rp, ones_mask(lp)).sum().backward()
        assert lp.grad.item() == pytest.approx(grad, rel=1e-6), estimator.__name__


def test_clamped_k3_has_no_gradient_but_k3_st_does():
    # k3 clamped at 10 -> zero gradient (verl's behaviour); the straight-through k2 gradient still pulls back:
    # d k2 / d log π = log π − log π_ref = 0 − (−30) = 30
    rp = t64([[-30.0]])
    lp = t64([[0.0]]).requires_grad_(True)
    kl.kl_k3(lp, rp, ones_mask(lp)).sum().backward()
    assert lp.grad.item() == 0.0
    lp.grad = None
    kl.kl_k3_st(lp, rp, ones_mask(lp)).sum().backward()
    assert lp.grad.item() == pytest.approx(30.0)


def test_ref_logprobs_get_no_gradient_through_straight_through_value():
    # sg[k3] + k2 − sg[k2]: the value part is detached, the gradient w.r.t. log π_ref is that of k2: −(log π − log π_ref)
    lp = t64([[LOG_HALF]]).requires_grad_(True)
    rp = t64([[LOG_QUARTER]]).requires_grad_(True)
    kl.kl_k3_st(lp, rp, ones_mask(lp)).sum().backward()
    assert rp.grad.item() == pytest.approx(-0.6931472, rel=1e-6)


# ----------------------------------------------------------------------------- loop references


def random_inputs(gen: torch.Generator, batch: int, width: int, spread: float = 3.0):
    lp = -torch.rand(batch, width, generator=gen, dtype=torch.float64) * spread
    rp = -torch.rand(batch, width, generator=gen, dtype=torch.float64) * spread
    lengths = torch.randint(0, width + 1, (batch,), generator=gen)
    mask = torch.arange(width) < lengths[:, None]
    garbage = torch.tensor([NAN, INF, -INF, 1e30], dtype=torch.float64)
    lp = torch.where(mask, lp, garbage[torch.randint(0, 4, (batch, width), generator=gen)])
    rp = torch.where(mask, rp, garbage[torch.randint(0, 4, (batch, width), generator=gen)])
    return lp, rp, mask


REFERENCES = [
    (kl.kl_k1, ref.kl_k1, {}),
    (kl.kl_k2, ref.kl_k2, {}),
    (kl.kl_k3, ref.kl_k3, {}),
    (kl.kl_k3, ref.kl_k3, {"log_ratio_clamp": 1.5, "kl_clamp": 0.4}),
    (kl.kl_k1_st, ref.kl_k1, {}),
    (kl.kl_k3_st, ref.kl_k3, {"log_ratio_clamp": 1.5, "kl_clamp": 0.4}),
]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(("estimator", "reference", "hp"), REFERENCES)
def test_matches_loop_reference(estimator, reference, hp, seed):
    gen = torch.Generator().manual_seed(seed)
    batch, width = int(torch.randint(1, 7, (1,), generator=gen)), int(torch.randint(1, 10, (1,), generator=gen))
    lp, rp, mask = random_inputs(gen, batch, width, spread=[3.0, 30.0][seed % 2])
    expected = ref.per_token(reference, lp.tolist(), rp.tolist(), mask.tolist(), **hp)
    torch.testing.assert_close(estimator(lp, rp, mask, **hp), t64(expected), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(("estimator", "base"), [(kl.kl_k1_st, kl.kl_k1), (kl.kl_k3_st, kl.kl_k3)])
def test_straight_through_value_is_exact_and_gradient_is_k2s(estimator, base, seed):
    gen = torch.Generator().manual_seed(seed)
    lp, rp, mask = random_inputs(gen, 4, 6, spread=30.0)
    leaf = lp.clone().requires_grad_(True)
    value = estimator(leaf, rp, mask)
    assert torch.equal(value.detach(), base(lp, rp, mask))
    value.sum().backward()
    # ∂k2/∂log π = log π − log π_ref on valid tokens, 0 at masked ones
    expected = torch.where(mask, lp - rp, 0.0)
    torch.testing.assert_close(leaf.grad, expected, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- properties

logprob = st.floats(-40.0, 0.0, allow_nan=False)


@SETTINGS
@given(pairs=st.lists(st.tuples(logprob, logprob), min_size=1, max_size=12))
def test_k2_and_k3_are_non_negative(pairs):
    lp, rp = t64([[a for a, _ in pairs]]), t64([[b for _, b in pairs]])
    mask = ones_mask(lp)
    for estimator in (kl.kl_k2, kl.kl_k3, kl.kl_k3_st):
        assert (estimator(lp, rp, mask) >= 0).all()
    assert (kl.kl_k3(lp, lp, mask) == 0).all() and (kl.kl_k1(lp, lp, mask) == 0).all()


@SETTINGS
@given(
    seed=st.integers(0, 2**16),
    garbage=st.sampled_from([NAN, INF, -INF, 1e38, -1e38, 5.0]),
    estimator=st.sampled_from(ESTIMATORS),
)
def test_masked_garbage_changes_neither_value_nor_gradient(seed, garbage, estimator):
    gen = torch.Generator().manual_seed(seed)
    lp, rp, mask = random_inputs(gen, 3, 5)
    results = []
    for fill in (0.0, garbage):
        leaf = torch.where(mask, lp, fill).requires_grad_(True)
        ref_lp = torch.where(mask, rp, fill)
        out = estimator(leaf, ref_lp, mask)
        out.sum().backward()
        results.append((out.detach(), leaf.grad))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])
    assert (results[1][1][~mask] == 0).all()


@SETTINGS
@given(seed=st.integers(0, 2**16), extra=st.integers(1, 4), estimator=st.sampled_from(ESTIMATORS))
def test_padding_columns_change_nothing(seed, extra, estimator):
    gen = torch.Generator().manual_seed(seed)
    lp, rp, mask = random_inputs(gen, 3, 5)
    pad = torch.full((3, extra), NAN, dtype=torch.float64)
    padded = estimator(torch.cat([lp, pad], 1), torch.cat([rp, pad], 1), torch.cat([mask, ~ones_mask(pad)], 1))
    assert torch.equal(padded[:, :5], estimator(lp, rp, mask))
    assert (padded[:, 5:] == 0).all()
