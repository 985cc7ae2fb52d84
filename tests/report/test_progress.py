"""ProgressBar: postfix keys, missing / NaN metrics, disabled bar.

Run: .venv/bin/python -m pytest -q tests/report/test_progress.py
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from steadyrl.report.progress import ProgressBar, format_value, postfix_from_metrics


def test_format_value():
    assert format_value(0.123456) == "0.123"  # 3 significant digits
    assert format_value(1234.5) == "1.23e+03"
    assert format_value(float("nan")) == "nan"
    assert format_value(float("-inf")) == "-inf"
    assert format_value(torch.tensor(2.0)) == "2"
    assert format_value(None) == "?"
    assert format_value("x") == "?"


def test_postfix_picks_available_metrics_in_preference_order():
    metrics = {"reward/mean": 0.5, "policy/entropy": 1.25, "mismatch/kl_k3": 0.001, "perf/step_s": 2.0}
    assert postfix_from_metrics(metrics) == {"rew": "0.5", "ent": "1.25", "kl": "0.001", "s/it": "2"}
    # kl/ref_k3 is preferred over the mismatch KL when both are logged
    assert postfix_from_metrics({"kl/ref_k3": 0.02, "mismatch/kl_k3": 0.001}) == {"kl": "0.02"}
    assert postfix_from_metrics({"eval/pass@1": 0.4}) == {"acc": "0.4"}
    assert postfix_from_metrics({}) == {}


def test_update_moves_the_bar_and_keeps_last_values(capsys):
    bar = ProgressBar(10, initial=2)
    bar.update(3, {"reward/mean": 0.5, "policy/entropy": float("nan")})
    bar.update(4, {"eval/accuracy": 0.75})  # an eval row does not erase the training numbers
    assert bar.postfix == {"rew": "0.5", "ent": "nan", "acc": "0.75"}
    assert bar._bar.n == 4
    bar.write("hello")
    bar.close()
    err = capsys.readouterr().err
    assert "hello" in err
    assert "rew=0.5" in err and "acc=0.75" in err and "4/10" in err


def test_disabled_bar_is_silent(capsys):
    with ProgressBar(5, enabled=False) as bar:
        bar.update(1, {"reward/mean": 1.0})
        bar.write("should not appear")
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


@settings(max_examples=30, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["reward/mean", "policy/entropy", "kl/ref_k3", "perf/step_s", "other/x"]),
        st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.none(), st.text(max_size=3)),
    )
)
def test_update_never_raises(metrics):
    bar = ProgressBar(3, enabled=True)
    try:
        bar.update(1, metrics)
        bar.update(2, None)
    finally:
        bar.close()
