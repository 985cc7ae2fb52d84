"""Tests for ops/correction.py: hand values, loop references, properties.

.venv/bin/python -m pytest -q tests/ops/test_correction.py
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import reference_correction as ref
from steadyrl import registry
from steadyrl.ops import correction as C
from steadyrl.types import LossInputs

CORRECTIONS = {name: entry.fn for name, entry in registry.CORRECTIONS.items()}

F64 = torch.float64
LOG = math.log


def lp(rows):
    return torch.tensor(rows, dtype=F64)


def inputs_from_ratios(rhos, mask=None, advantages=None) -> LossInputs:
    """Build inputs whose token ratio π_old/μ is exactly ``rhos`` (log μ = 0, log π_old = log ρ)."""
    old = lp([[LOG(r) for r in row] for row in rhos])
    mask = torch.ones_like(old, dtype=torch.bool) if mask is None else torch.tensor(mask)
    adv = torch.ones_like(old) if advantages is None else lp(advantages)
    return LossInputs(
        logprobs=old.clone(),
        old_logprobs=old,
        advantages=adv,
        response_mask=mask,
        rollout_logprobs=torch.zeros_like(old),
    )


def close(actual, expected, tol=1e-12):
    assert math.isclose(float(actual), expected, rel_tol=tol, abs_tol=tol), (float(actual), expected)


# ------------------------------------------------------------------ hand-computed values


def test_token_tis_hand_values():
    out = C.token_tis(inputs_from_ratios([[3.0, 1.5, 0.25]]), cap=2.0)
    assert out.weights.tolist() == [[2.0, 1.5, 0.25]]  # min(ρ, 2)
    assert out.mask.all()
    m = out.metrics
    close(m["mismatch/kl_k1"], -LOG(3 * 1.5 * 0.25) / 3)  # mean(−log ρ) = −log(Πρ)/3 = −log(1.125)/3
    close(m["mismatch/kl_k3"], (2.0 + 0.5 - 0.75 - LOG(1.125)) / 3)  # mean(ρ − 1) − mean(log ρ)
    close(m["mismatch/truncated_frac"], 1 / 3)  # only ρ = 3 exceeds C
    close(m["mismatch/is_weight_mean"], 1.25)  # (2 + 1.5 + 0.25) / 3
    close(m["mismatch/is_weight_min"], 0.25)
    close(m["mismatch/is_weight_max"], 2.0)
    close(m["mismatch/is_ess"], 3.75**2 / (3 * 6.3125))  # (Σw)² / (N Σw²), Σw² = 4 + 2.25 + 0.0625
    close(m["mismatch/masked_frac"], 0.0)


def test_seq_tis_hand_values():
    mask = [[True, True], [True, True], [False, False]]
    out = C.seq_tis(inputs_from_ratios([[2.0, 0.75], [4.0, 1.0], [9.0, 9.0]], mask), cap=2.0)
    # Π ρ: 1.5 (kept), 4 → 2 (truncated); the empty third row keeps weight 1
    torch.testing.assert_close(out.weights, lp([[1.5, 1.5], [2.0, 2.0], [1.0, 1.0]]))
    close(out.metrics["mismatch/truncated_frac"], 0.5)  # 1 of 2 valid sequences
    close(out.metrics["mismatch/is_ess"], 3.5**2 / (2 * (1.5**2 + 2.0**2)))  # 12.25 / 12.5 = 0.98
    close(out.metrics["mismatch/is_weight_mean"], 1.75)


def test_token_mis_hand_values_band_is_inclusive():
    out = C.token_mis(inputs_from_ratios([[0.4, 0.5, 1.0, 2.0, 2.5]]), ratio_min=0.5, ratio_max=2.0)
    assert out.mask.tolist() == [[False, True, True, True, False]]  # 0.5 and 2.0 are inside
    torch.testing.assert_close(out.weights, lp([[0.0, 0.5, 1.0, 2.0, 0.0]]))  # ρ · 𝟙[band]
    m = out.metrics
    close(m["mismatch/masked_frac"], 2 / 5)
    close(m["mismatch/masked_frac_low"], 1 / 5)
    close(m["mismatch/masked_frac_high"], 1 / 5)
    close(m["mismatch/is_weight_mean"], 3.5 / 3)  # over kept tokens: (0.5 + 1 + 2) / 3
    close(m["mismatch/is_weight_min"], 0.5)
    close(m["mismatch/is_ess"], 3.5**2 / (3 * 5.25))  # Σw² = 0.25 + 1 + 4


def test_icepop_is_token_mis_with_wider_band():
    out = C.icepop(inputs_from_ratios([[0.4, 0.5, 1.0, 2.0, 2.5, 5.5]]))  # band [0.5, 5]
    assert out.mask.tolist() == [[False, True, True, True, True, False]]
    torch.testing.assert_close(out.weights, lp([[0.0, 0.5, 1.0, 2.0, 2.5, 0.0]]))


def test_seq_mis_hand_values():
    out = C.seq_mis(inputs_from_ratios([[2.0, 0.75], [4.0, 1.0], [0.5, 0.5]]))  # Π ρ = 1.5, 4, 0.25
    assert out.mask.tolist() == [[True, True], [False, False], [False, False]]
    torch.testing.assert_close(out.weights, lp([[1.5, 1.5], [0.0, 0.0], [0.0, 0.0]]))
    close(out.metrics["mismatch/masked_frac"], 4 / 6)
    close(out.metrics["mismatch/masked_seq_frac"], 2 / 3)
    close(out.metrics["mismatch/is_ess"], 1.0)  # one kept sequence


def test_geo_rs_hand_values_uses_geometric_mean():
    # geometric means: 1.0005 (in), sqrt(1.01·0.99) = 0.99995 (in: the per-token errors cancel), 1.002 (out)
    out = C.geo_rs(inputs_from_ratios([[1.0005, 1.0005], [1.01, 0.99], [1.002, 1.002]]))
    assert out.mask.tolist() == [[True, True], [True, True], [False, False]]
    assert out.weights.eq(1).all()
    close(out.metrics["mismatch/masked_seq_frac"], 1 / 3)
    close(out.metrics["mismatch/geo_ratio_min"], math.sqrt(1.01 * 0.99), tol=1e-12)
    close(out.metrics["mismatch/geo_ratio_max"], 1.002, tol=1e-12)


def test_geo_rs_k3_hand_values():
    # seq 0: ((1.1 − log 1.1 − 1) + (0.9 − log 0.9 − 1)) / 2 = (0.0046898 + 0.0053605) / 2 ≈ 0.0050252 ≤ 0.01
    # seq 1: ((1.5 − log 1.5 − 1) + 0) / 2 = 0.0945349 / 2 ≈ 0.0472675 > 0.01
    out = C.geo_rs_k3(inputs_from_ratios([[1.1, 0.9], [1.5, 1.0]]), k3_max=0.01)
    assert out.mask.tolist() == [[True, True], [False, False]]
    close(out.metrics["mismatch/seq_k3_max"], (0.5 - LOG(1.5)) / 2)


def test_opsm_hand_values():
    current = lp([[-1.0, -1.0], [-1.0, -1.0], [-1.0, -1.0]])
    old = lp([[-0.4, -0.4], [-0.4, -0.4], [-0.6, -0.6]])  # D_i = mean(log π_old − log π_θ) = 0.6, 0.6, 0.4
    adv = lp([[-1.0, -1.0], [1.0, 1.0], [-1.0, -1.0]])
    mask = torch.ones(3, 2, dtype=torch.bool)
    inputs = LossInputs(logprobs=current, old_logprobs=old, advantages=adv, response_mask=mask)
    out = C.opsm(inputs, delta=0.5)
    # dropped only where Â < 0 and D > 0.5: sequence 0
    assert out.mask.tolist() == [[False, False], [True, True], [True, True]]
    assert out.weights.eq(1).all()
    close(out.metrics["opsm/drift_mean"], (0.6 + 0.6 + 0.4) / 3)
    close(out.metrics["opsm/drift_max"], 0.6)
    close(out.metrics["mismatch/masked_seq_frac"], 1 / 3)
    # anchor="rollout" compares μ with π_θ instead: μ = π_θ gives D = 0, nothing dropped
    inputs.rollout_logprobs = current.clone()
    assert C.opsm(inputs, anchor="rollout").mask.all()


def test_opsm_per_token_advantages_follow_trl():
    current = lp([[-1.0, -1.0, -1.0]])
    old = lp([[0.0, 0.0, 0.0]])  # D = 1 > 0.5
    adv = lp([[-1.0, 0.0, 2.0]])  # only the negative-advantage token is dropped (0 is not < 0)
    inputs = LossInputs(
        logprobs=current, old_logprobs=old, advantages=adv, response_mask=torch.ones(1, 3, dtype=torch.bool)
    )
    assert C.opsm(inputs).mask.tolist() == [[False, True, True]]


def test_anchor_selects_the_trainer_side():
    old = lp([[LOG(2.0)]])
    current = lp([[LOG(4.0)]])
    inputs = LossInputs(
        logprobs=current,
        old_logprobs=old,
        advantages=lp([[1.0]]),
        response_mask=torch.ones(1, 1, dtype=torch.bool),
        rollout_logprobs=lp([[0.0]]),
    )
    assert C.token_tis(inputs, anchor="old", cap=10.0).weights.item() == pytest.approx(2.0)  # π_old/μ
    assert C.token_tis(inputs, anchor="current", cap=10.0).weights.item() == pytest.approx(4.0)  # π_θ/μ


def test_mismatch_metrics_hand_values():
    trainer = lp([[LOG(2.0), LOG(0.5), 7.0]])
    rollout = lp([[0.0, 0.0, float("nan")]])
    mask = torch.tensor([[True, True, False]])
    m = C.mismatch_metrics(trainer, rollout, mask)
    close(m["mismatch/kl_k1"], 0.0)  # −(log 2 − log 2)/2
    close(m["mismatch/kl_k3"], 0.25)  # ((2 − 1 − log 2) + (0.5 − 1 + log 2)) / 2
    close(m["mismatch/chi2"], 1.125)  # (4 + 0.25)/2 − 1
    close(m["mismatch/abs_logprob_diff_mean"], LOG(2.0))
    close(m["mismatch/abs_logprob_diff_max"], LOG(2.0))
    close(m["mismatch/log_ppl_abs_diff_mean"], 0.0)  # mean log ρ over the sequence = 0


def test_missing_rollout_logprobs_names_the_fix():
    inputs = inputs_from_ratios([[1.0]])
    inputs.rollout_logprobs = None
    for name, fn in CORRECTIONS.items():
        if name == "high_entropy":  # a token mask of π_θ alone (ops/token_masks.py), no rollout log-probs
            continue
        if name == "opsm":
            with pytest.raises(ValueError, match="rollout_logprobs"):
                fn(inputs, anchor="rollout")
            continue
        with pytest.raises(ValueError, match="rollout_logprobs"):
            fn(inputs)


def test_bad_anchor_and_bad_hyper_parameters():
    inputs = inputs_from_ratios([[1.0]])
    with pytest.raises(ValueError, match="anchor"):
        C.token_tis(inputs, anchor="rollout")
    with pytest.raises(ValueError, match="anchor"):
        C.opsm(inputs, anchor="current")
    with pytest.raises(ValueError, match="cap"):
        C.seq_tis(inputs, cap=0.0)
    with pytest.raises(ValueError, match="ratio_min"):
        C.token_mis(inputs, ratio_min=3.0, ratio_max=2.0)


# ------------------------------------------------------------------ loop references

REF_CALLS = {
    "token_tis": (dict(cap=1.5), lambda a, r, m, adv, cur: ref.token_tis(a, r, m, 1.5)),
    "seq_tis": (dict(cap=1.7), lambda a, r, m, adv, cur: ref.seq_tis(a, r, m, 1.7)),
    "token_mis": (
        dict(ratio_min=0.7, ratio_max=1.4),
        lambda a, r, m, adv, cur: ref.token_mis(a, r, m, 0.7, 1.4),
    ),
    "icepop": (
        dict(ratio_min=0.8, ratio_max=1.3),
        lambda a, r, m, adv, cur: ref.token_mis(a, r, m, 0.8, 1.3),
    ),
    "seq_mis": (dict(ratio_min=0.6, ratio_max=1.6), lambda a, r, m, adv, cur: ref.seq_mis(a, r, m, 0.6, 1.6)),
    "geo_rs": (dict(ratio_min=0.9, ratio_max=1.1), lambda a, r, m, adv, cur: ref.geo_rs(a, r, m, 0.9, 1.1)),
    "geo_rs_k3": (dict(k3_max=0.02), lambda a, r, m, adv, cur: ref.geo_rs_k3(a, r, m, 0.02)),
    "opsm": (dict(delta=0.05), lambda a, r, m, adv, cur: ref.opsm(a, cur, adv, m, 0.05)),
}


def random_inputs(seed: int, batch: int, length: int, spread: float = 0.25) -> LossInputs:
    gen = torch.Generator().manual_seed(seed)
    rollout = -torch.rand(batch, length, generator=gen, dtype=F64) * 3
    old = rollout + spread * torch.randn(batch, length, generator=gen, dtype=F64)
    current = old + spread * torch.randn(batch, length, generator=gen, dtype=F64)
    mask = torch.rand(batch, length, generator=gen) < 0.75
    mask[0, 0] = True
    if batch > 2:
        mask[-1] = False  # an all-padding row
    adv = torch.randn(batch, 1, generator=gen, dtype=F64).expand(batch, length).clone()
    return LossInputs(
        logprobs=current, old_logprobs=old, advantages=adv, response_mask=mask, rollout_logprobs=rollout
    )


def assert_metrics_match(actual, expected):
    assert set(actual) == set(expected), set(actual) ^ set(expected)
    for key, value in expected.items():
        got = float(actual[key])
        assert math.isclose(got, value, rel_tol=1e-9, abs_tol=1e-12) or got == value, (key, got, value)


@pytest.mark.parametrize("name", sorted(REF_CALLS))
@pytest.mark.parametrize("seed,batch,length", [(0, 1, 1), (1, 3, 7), (2, 5, 4), (3, 8, 16), (4, 4, 33)])
def test_matches_loop_reference(name, seed, batch, length):
    inputs = random_inputs(seed, batch, length)
    kwargs, reference = REF_CALLS[name]
    out = CORRECTIONS[name](inputs, **kwargs)
    ref_w, ref_keep, ref_metrics = reference(
        inputs.old_logprobs.tolist(),
        inputs.rollout_logprobs.tolist(),
        inputs.response_mask.tolist(),
        inputs.advantages.tolist(),
        inputs.logprobs.tolist(),
    )
    torch.testing.assert_close(out.weights, lp(ref_w), rtol=1e-9, atol=1e-12)
    assert out.mask.tolist() == ref_keep
    assert_metrics_match(out.metrics, ref_metrics)


@pytest.mark.parametrize("seed,batch,length", [(0, 1, 1), (5, 3, 9), (6, 6, 20)])
def test_mismatch_metrics_match_loop_reference(seed, batch, length):
    inputs = random_inputs(seed, batch, length, spread=0.5)
    out = C.mismatch_metrics(inputs.old_logprobs, inputs.rollout_logprobs, inputs.response_mask)
    expected = ref.mismatch_metrics(
        inputs.old_logprobs.tolist(), inputs.rollout_logprobs.tolist(), inputs.response_mask.tolist()
    )
    assert set(out) == set(expected)
    for key, value in expected.items():
        assert math.isclose(float(out[key]), value, rel_tol=1e-5, abs_tol=1e-6), (key, float(out[key]), value)


# ------------------------------------------------------------------ properties

shapes = st.tuples(st.integers(0, 10_000), st.integers(1, 5), st.integers(1, 9))
names = st.sampled_from(sorted(REF_CALLS))


def run(name, inputs, anchor=None):
    kwargs = dict(REF_CALLS[name][0])
    if anchor is not None:
        kwargs["anchor"] = anchor
    return CORRECTIONS[name](inputs, **kwargs)


def assert_same_result(a, b):
    torch.testing.assert_close(a.weights, b.weights, rtol=0, atol=0)
    assert torch.equal(a.mask, b.mask)
    assert set(a.metrics) == set(b.metrics)
    for key in a.metrics:
        torch.testing.assert_close(a.metrics[key], b.metrics[key], rtol=1e-12, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(shape=shapes, name=names, garbage=st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e30]))
def test_masked_garbage_changes_nothing(shape, name, garbage):
    inputs = random_inputs(*shape)
    dirty = random_inputs(*shape)
    pad = ~inputs.response_mask
    for field in ("logprobs", "old_logprobs", "rollout_logprobs", "advantages"):
        setattr(
            dirty,
            field,
            torch.where(pad, torch.full_like(getattr(inputs, field), garbage), getattr(inputs, field)),
        )
    assert_same_result(run(name, inputs), run(name, dirty))


@settings(max_examples=40, deadline=None)
@given(shape=shapes, name=names, extra=st.integers(1, 4))
def test_appended_padding_changes_nothing(shape, name, extra):
    inputs = random_inputs(*shape)
    batch = inputs.response_mask.shape[0]

    def pad(x, value):
        return torch.cat([x, torch.full((batch, extra), value, dtype=x.dtype)], dim=1)

    padded = LossInputs(
        logprobs=pad(inputs.logprobs, float("nan")),
        old_logprobs=pad(inputs.old_logprobs, 3.0),
        advantages=pad(inputs.advantages, -5.0),
        response_mask=pad(inputs.response_mask, False),
        rollout_logprobs=pad(inputs.rollout_logprobs, -50.0),
    )
    short, long = run(name, inputs), run(name, padded)
    length = inputs.response_mask.shape[1]
    torch.testing.assert_close(long.weights[:, :length], short.weights)
    assert long.weights[:, length:].eq(1).all() and long.mask[:, length:].all()
    assert torch.equal(long.mask[:, :length], short.mask)
    for key in short.metrics:
        torch.testing.assert_close(long.metrics[key], short.metrics[key])


@settings(max_examples=30, deadline=None)
@given(shape=shapes, name=names)
def test_weights_are_detached(shape, name):
    inputs = random_inputs(*shape)
    inputs.logprobs.requires_grad_(True)
    inputs.old_logprobs.requires_grad_(True)
    inputs.rollout_logprobs.requires_grad_(True)
    anchor = "old" if name == "opsm" else "current"
    out = run(name, inputs, anchor=anchor)
    assert not out.weights.requires_grad
    assert all(not v.requires_grad for v in out.metrics.values())


@settings(max_examples=40, deadline=None)
@given(shape=shapes, name=names, anchor=st.sampled_from(["old", "current"]))
def test_on_policy_is_the_identity(shape, name, anchor):
    inputs = random_inputs(*shape)
    # μ = π_anchor (and π_θ = π_old, so OPSM's drift is 0 too)
    inputs.logprobs = inputs.old_logprobs.clone()
    inputs.rollout_logprobs = inputs.old_logprobs.clone()
    out = run(name, inputs, anchor="old" if name == "opsm" else anchor)
    assert out.weights.eq(1).all()
    assert out.mask.all()
    assert out.metrics["mismatch/kl_k1"] == 0 and out.metrics["mismatch/kl_k3"] == 0
    assert out.metrics["mismatch/is_ess"] == 1
    assert out.metrics["mismatch/masked_frac"] == 0


@settings(max_examples=40, deadline=None)
@given(shape=shapes)
def test_seq_tis_equals_product_of_token_weights(shape):
    inputs = random_inputs(*shape)
    big = 1e300  # no truncation: seq weight = Π_t ρ_t = Π_t (token_tis weight)
    token = C.token_tis(inputs, cap=big).weights
    seq = C.seq_tis(inputs, cap=big).weights
    mask = inputs.response_mask
    product = torch.where(mask, token, torch.ones_like(token)).prod(dim=1, keepdim=True).expand_as(token)
    torch.testing.assert_close(torch.where(mask, seq, product), product, rtol=1e-10, atol=0)


@settings(max_examples=40, deadline=None)
@given(shape=shapes, name=names)
def test_outputs_are_well_formed(shape, name):
    out = run(name, random_inputs(*shape, spread=1.0))
    assert out.mask.dtype == torch.bool and out.weights.shape == out.mask.shape
    assert torch.isfinite(out.weights).all() and (out.weights >= 0).all()
    assert 0 <= float(out.metrics["mismatch/masked_frac"]) <= 1
    assert 0 <= float(out.metrics["mismatch/is_ess"]) <= 1 + 1e-12
    assert float(out.metrics["mismatch/kl_k3"]) >= 0
