"""The collapse definition and the per-cell metrics of the stability lab, on hand-made curves."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from steadyrl.report.collapse import (
    CollapseCriteria,
    RunCurves,
    accuracy_threshold,
    cell_metrics,
    collapse_verdict,
    completions_to_target,
    mean_fractions,
    roughness,
)


def rows_from(acc: list[float], *, every: int = 5, entropy=None, eval_len=None, **train_series) -> list[dict]:
    """metrics.jsonl-like rows: an eval row every ``every`` steps from step 0, a training row per step."""
    steps = every * (len(acc) - 1)
    entropy = entropy or [0.2] * steps
    rows = []
    for i, a in enumerate(acc):
        rows.append({"step": i * every, "eval/accuracy": a, "eval/len_mean": (eval_len or [3.6] * len(acc))[i]})
    for s in range(1, steps + 1):
        row = {"step": s, "reward/mean": 0.5, "policy/entropy": entropy[s - 1], "grad/norm": 1.0, "policy/loss": 0.0}
        for key, values in train_series.items():
            row[key.replace("__", "/")] = values[s - 1]
        rows.append(row)
    return sorted(rows, key=lambda r: r["step"])


def verdict(rows, steps=None):
    curves = RunCurves.from_rows(rows)
    return collapse_verdict(curves, steps or len(curves.train))


def test_accuracy_threshold_by_hand():
    assert accuracy_threshold(0.52) == pytest.approx(0.32)  # max(0.26, 0.32)
    assert accuracy_threshold(0.3) == pytest.approx(0.15)  # max(0.15, 0.10)
    assert accuracy_threshold(0.52, CollapseCriteria(acc_rel=0.9)) == pytest.approx(0.468)  # max(0.468, 0.32)


def test_stable_collapsed_and_recovered_curves():
    stable = verdict(rows_from([0.52, 0.6, 0.66, 0.7]))
    assert not stable.collapsed and not stable.dipped and stable.reasons == ()
    collapsed = verdict(rows_from([0.52, 0.3, 0.05, 0.0]))
    assert collapsed.collapsed and collapsed.reasons == ("accuracy 0.000 < 0.320",)
    recovered = verdict(rows_from([0.52, 0.1, 0.45, 0.6]))  # dipped below 0.32 at step 5, then recovered
    assert not recovered.collapsed and recovered.dipped
    degraded = verdict(rows_from([0.52, 0.45, 0.40, 0.33]))  # worse, but above max(0.26, 0.32)
    assert not degraded.collapsed


def test_numerical_collapse():
    rows = rows_from([0.52, 0.6, 0.6], policy__loss=[0.0] * 4 + [math.nan] + [0.0] * 5)
    v = verdict(rows)
    assert v.collapsed and v.reasons == ("non-finite policy/loss at step 5",)
    # 2 skipped of 10 steps = 20 % > 10 %
    v = verdict(rows_from([0.52, 0.6, 0.6], train__skipped_steps=[0.0] * 8 + [1.0, 2.0]))
    assert v.collapsed and v.reasons == ("2 of 10 steps skipped",)
    assert not verdict(rows_from([0.52, 0.6, 0.6], train__skipped_steps=[0.0] * 9 + [1.0])).collapsed  # 10 %


def test_entropy_blow_up_and_frozen_policy():
    # first 5 mean 0.2, last 5 mean 1.5 > max(4 × 0.2, 1.0) = 1.0
    v = verdict(rows_from([0.52, 0.5, 0.5], entropy=[0.2] * 5 + [1.5] * 5))
    assert v.collapsed and v.reasons == ("entropy blow-up 0.200 -> 1.500",)
    # last 5 mean 0.9: above 4 × 0.2 = 0.8 but not above 1 nat
    assert not verdict(rows_from([0.52, 0.5, 0.5], entropy=[0.2] * 5 + [0.9] * 5)).collapsed
    frozen = [0.2] * 5 + [0.001] * 5
    v = verdict(rows_from([0.52, 0.5, 0.5], entropy=frozen))  # final 0.5 ≤ start 0.52: no gain
    assert v.collapsed and v.reasons == ("entropy 0.0010 < floor 0.01 without accuracy gain",)
    assert not verdict(rows_from([0.52, 0.8, 0.9], entropy=frozen)).collapsed  # converged onto right answers


def test_length_collapse():
    v = verdict(rows_from([0.52, 0.5, 0.45], eval_len=[3.6, 2.0, 1.7]))  # 1.7 < 0.5 × 3.6 = 1.8
    assert v.collapsed and v.reasons == ("eval length 1.70 < 0.5 x 3.60",)
    v = verdict(rows_from([0.52, 0.5, 0.45], rollout__truncated_frac=[0.0] * 5 + [0.8] * 5))
    assert v.collapsed and v.reasons == ("truncated fraction 0.80 > 0.5",)


def test_completions_to_target_by_hand():
    steps, acc = [0, 5, 10, 15], [0.5, 0.6, 0.7, 0.8]
    assert completions_to_target(steps, acc, 256, 0.65) == 10 * 256  # first eval ≥ 0.65 is step 10
    assert completions_to_target(steps, acc, 256, 0.95) is None
    assert completions_to_target(steps, acc, 256, 0.5) == 0
    assert completions_to_target([0, 5], [0.5, math.nan], 256, 0.6) is None


def _roughness_loop(values, scale=1.0):
    total, count = 0.0, 0
    for t in range(1, len(values)):
        a, b = values[t - 1], values[t]
        if math.isfinite(a) and math.isfinite(b):
            total += abs(b - a)
            count += 1
    return total / count / scale if count else math.nan


def test_roughness_by_hand():
    assert roughness([0.5, 0.7, 0.4, 0.4]) == pytest.approx(0.5 / 3)  # (0.2 + 0.3 + 0) / 3
    assert roughness([0.5, math.nan, 0.7, 0.4]) == pytest.approx(0.3)  # only (0.7, 0.4) is a finite pair
    assert roughness([0.5, 0.7], scale=2.0) == pytest.approx(0.1)  # 0.2 / 2
    assert math.isnan(roughness([0.5]))


@pytest.mark.parametrize("seed", range(5))
def test_roughness_matches_loop_and_numpy(seed):
    rng = random.Random(seed)
    values = [rng.random() if rng.random() > 0.1 else math.nan for _ in range(rng.randint(2, 40))]
    expected = _roughness_loop(values)
    if math.isnan(expected):
        assert math.isnan(roughness(values))
    else:
        assert roughness(values) == pytest.approx(expected)
    clean = [rng.random() for _ in range(20)]
    assert roughness(clean) == pytest.approx(float(np.mean(np.abs(np.diff(clean)))))


@given(st.lists(st.floats(-10, 10), min_size=2, max_size=30), st.floats(-5, 5), st.floats(0.1, 10))
@settings(deadline=None, max_examples=60)
def test_roughness_is_shift_invariant_and_scale_linear(values, shift, scale):
    base = roughness(values)
    assert roughness([v + shift for v in values]) == pytest.approx(base, abs=1e-9)
    assert roughness([v * scale for v in values]) == pytest.approx(base * scale, rel=1e-9, abs=1e-9)


def test_mean_fractions_by_hand():
    rows = [
        {"step": 1, "reward/mean": 0.5, "ratio/clip_frac_low": 0.1, "ratio/clip_frac_high": 0.2, "capo/rejected_frac": 0.3},
        {"step": 2, "reward/mean": 0.5, "ratio/clip_frac_low": 0.0, "ratio/clip_frac_high": 0.1, "capo/rejected_frac": 0.1,
         "mismatch/masked_frac": 0.05},
    ]
    out = mean_fractions(RunCurves.from_rows(rows))
    assert out["clip_frac"] == pytest.approx(0.2)  # mean(0.1 + 0.2, 0.0 + 0.1)
    assert out["capo/rejected_frac"] == pytest.approx(0.2)  # mean(0.3, 0.1)
    assert out["mismatch/masked_frac"] == pytest.approx(0.05)  # one step logged it
    assert out["rejected_frac"] == pytest.approx(0.2)  # the largest rejection fraction
    assert mean_fractions(RunCurves.from_rows([{"step": 1, "reward/mean": 0.5}])) == {"rejected_frac": 0.0}


def test_cell_metrics_of_a_run():
    rows = rows_from([0.52, 0.6, 0.75], guard__rollbacks=[0.0] * 6 + [1.0] * 4, guard__lr_scale=[1.0] * 6 + [0.5] * 4)
    m = cell_metrics(rows, steps=10, completions_per_step=256)
    assert m["collapsed"] is False and m["dipped"] is False
    assert (m["start_acc"], m["final_acc"], m["best_acc"]) == (0.52, 0.75, 0.75)
    assert m["target_acc"] == pytest.approx(0.72)  # 0.52 + 0.2
    assert m["completions_to_target"] == 10 * 256  # eval at step 10 is the first ≥ 0.72
    assert m["roughness"] == 0.0  # reward/mean is constant
    assert m["rollbacks"] == 1 and m["lr_scale"] == 0.5 and m["steps_done"] == 10
    assert m["curve"]["eval_steps"] == [0, 5, 10] and len(m["curve"]["reward"]) == 10
    empty = cell_metrics([], steps=10, completions_per_step=256)
    assert empty["collapsed"] is False and empty["steps_done"] == 0 and math.isnan(empty["final_acc"])
