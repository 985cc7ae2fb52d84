"""Plots and the HTML / markdown run report.

Run: .venv/bin/python -m pytest -q tests/report/test_report.py
"""

from __future__ import annotations

import json
import math
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from steadyrl.report import make_report
from steadyrl.report.html import flatten, metric_overview
from steadyrl.report.plots import CORE_PANELS, ema, make_plots, metric_series, numeric_keys
from steadyrl.report.sinks import MetricLogger

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- EMA and series


def test_ema_hand_computed():
    # s = 0.5:  m1 = 0.5·0 + 0.5·2 = 1,  debiased 1 / (1 − 0.5) = 2
    #           m2 = 0.5·1 + 0.5·4 = 2.5, debiased 2.5 / (1 − 0.25) = 10/3
    #           m3 = 0.5·2.5 + 0.5·0 = 1.25, debiased 1.25 / (1 − 0.125) = 10/7
    assert ema([2.0, 4.0, 0.0], smoothing=0.5) == pytest.approx([2.0, 10 / 3, 10 / 7])
    assert ema([1.0, 2.0, 3.0], smoothing=0.0) == [1.0, 2.0, 3.0]
    assert ema([0.1] * 7, smoothing=0.9) == [0.1] * 7  # exactly, no rounding wobble on a flat curve
    assert ema([], smoothing=0.9) == []
    with pytest.raises(ValueError):
        ema([1.0], smoothing=1.0)


def test_ema_skips_non_finite_without_poisoning():
    # the NaN position stays NaN; the next value continues as if the NaN were absent
    out = ema([2.0, float("nan"), 4.0, float("inf")], smoothing=0.5)
    assert out[0] == 2.0 and math.isnan(out[1]) and math.isnan(out[3])
    assert out[2] == pytest.approx(10 / 3)


def _ema_loop_reference(values, s):
    # straight from the definition: weights s^(n-k) over the finite values seen so far, normalised
    out, seen = [], []
    for x in values:
        if not math.isfinite(x):
            out.append(float("nan"))
            continue
        seen.append(x)
        n = len(seen)
        weights = [(1 - s) * s ** (n - 1 - k) for k in range(n)]
        out.append(sum(w * v for w, v in zip(weights, seen)) / sum(weights))
    return out


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.one_of(st.floats(-1e3, 1e3), st.just(float("nan"))), max_size=30),
    st.floats(0.0, 0.99),
)
def test_ema_matches_weighted_average_reference(values, smoothing):
    got, want = ema(values, smoothing), _ema_loop_reference(values, smoothing)
    for g, w in zip(got, want):
        assert (math.isnan(g) and math.isnan(w)) or g == pytest.approx(w, rel=1e-9, abs=1e-9)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3), min_size=1, max_size=30), st.floats(0.0, 0.99))
def test_ema_stays_within_running_range(values, smoothing):
    # a convex combination of the values seen so far
    for n, m in enumerate(ema(values, smoothing), start=1):
        assert min(values[:n]) - 1e-6 <= m <= max(values[:n]) + 1e-6


def test_metric_series_and_numeric_keys():
    rows = [
        {"step": 0, "wall_s": 1.0, "reward/mean": 0.5, "note": "text"},
        {"step": 1, "wall_s": 2.0, "reward/mean": None},
        {"step": 1, "wall_s": 2.0, "eval/accuracy": 0.25},
        {"step": 2, "wall_s": 3.0, "reward/mean": float("inf"), "flag": True},
    ]
    steps, values = metric_series(rows, "reward/mean")
    assert steps == [0, 1, 2] and values[0] == 0.5 and math.isnan(values[1]) and math.isnan(values[2])
    assert metric_series(rows, "eval/accuracy") == ([1], [0.25])
    assert metric_series(rows, "absent") == ([], [])
    assert numeric_keys(rows) == ["eval/accuracy", "reward/mean"]  # no step / wall_s / strings / bools


def test_panel_patterns():
    by_name = {p.name: p for p in CORE_PANELS}
    keys = [
        "eval/accuracy",
        "eval/pass@1",
        "eval/pass@16",
        "eval/len_mean",
        "mismatch/kl_k1",
        "mismatch/is_ess",
    ]
    assert by_name["accuracy"].keys(keys) == ["eval/accuracy", "eval/pass@1", "eval/pass@16"]
    assert by_name["mismatch_kl"].keys(keys) == ["mismatch/kl_k1"]


# ----------------------------------------------------------------------------- plots


def _rows(n_steps=12):
    rows = []
    for step in range(n_steps):
        rows.append(
            {
                "step": step,
                "wall_s": float(step),
                "reward/mean": 0.1 * step,
                "reward/std": 0.05,
                "policy/entropy": 1.0 / (1 + step),
                "grad/norm": 10.0 ** (step % 4),
                "ratio/clip_frac_low": 0.01,
                "ratio/clip_frac_high": 0.02,
                "mismatch/kl_k1": 1e-3,
                "mismatch/kl_k3": float("nan") if step == 3 else 2e-3,
                "capo/rejected_frac": 0.1,
                "pcr/alpha_mean": 0.5,
                "pcr/cos_pla_sta": -0.2,
                "kl/ref_k3": 0.01,
            }
        )
        if step % 5 == 0:
            rows.append({"step": step, "wall_s": float(step), "eval/accuracy": 0.3, "eval/pass@8": 0.6})
    return rows


def test_make_plots_writes_every_panel_and_extras(tmp_path):
    result = make_plots(_rows(), tmp_path)
    names = [f.name for f in result.files]
    assert names == [
        "reward", "accuracy", "entropy", "grad_norm", "clip_frac", "mismatch_kl",
        "extras_capo", "extras_kl", "extras_pcr",
    ]  # fmt: skip
    for plot in result.files:
        assert plot.path.read_bytes()[:8] == PNG_MAGIC
    assert result.not_logged == []
    assert {f.name: f.keys for f in result.files}["accuracy"] == ["eval/accuracy", "eval/pass@8"]
    assert {f.name: f.keys for f in result.files}["extras_pcr"] == ["pcr/alpha_mean", "pcr/cos_pla_sta"]
    # reward/std is drawn as the band of the reward panel, not repeated as an extra
    assert not any("reward/std" in f.keys for f in result.files)


def test_make_plots_with_missing_and_all_nan_keys(tmp_path):
    rows = [{"step": s, "reward/mean": 0.5 * s, "policy/entropy": None} for s in range(4)]
    result = make_plots(rows, tmp_path)
    assert [f.name for f in result.files] == ["reward"]
    reasons = dict(result.not_logged)
    assert reasons["Policy entropy"] == "logged, but no finite value"
    assert reasons["Held-out accuracy"] == "not logged"
    assert reasons["Gradient norm"] == "not logged"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reward.png"]


def test_make_plots_empty_rows(tmp_path):
    result = make_plots([], tmp_path)
    assert result.files == [] and len(result.not_logged) == len(CORE_PANELS)


# ----------------------------------------------------------------------------- report


def _write_run(run_dir, rows, *, summary=True, config=True):
    with MetricLogger(run_dir, tensorboard=False) as logger:
        for row in rows:
            row = dict(row)
            logger.log(row.pop("step"), row)
    if summary:
        (run_dir / "summary.json").write_text(
            json.dumps(
                {"steps": 12, "wall_s": 34.5, "eval_start": {"accuracy": 0.3}, "eval_end": {"accuracy": 0.6}}
            )
        )
    if config:
        (run_dir / "config.yaml").write_text(
            "loss:\n  name: ppo_clip\n  clip_high: 0.28  # <b>not html</b>\n"
        )


def _img_sources(index_html: str) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', index_html)


def test_make_report_full_run(tmp_path):
    _write_run(tmp_path, _rows())
    index = make_report(tmp_path)
    assert index == (tmp_path / "report" / "index.html").resolve()
    page = index.read_text()
    pngs = sorted(p.name for p in (tmp_path / "report").glob("*.png"))
    assert len(pngs) == 9
    # every PNG is on the page, by relative path, and every image on the page exists
    assert sorted(_img_sources(page)) == pngs
    assert "<script" not in page and "<style>" in page
    assert "eval_end.accuracy" in page and "34.5" in page  # flattened summary table
    assert "&lt;b&gt;not html&lt;/b&gt;" in page  # config shown escaped inside <pre>
    assert "clip_high: 0.28" in page
    md = (tmp_path / "report" / "summary.md").read_text()
    assert "| eval_end.accuracy | 0.6 |" in md
    assert "[Reward](reward.png)" in md


def test_make_report_one_step_run_without_summary_or_config(tmp_path):
    _write_run(
        tmp_path, [{"step": 0, "reward/mean": 0.0, "grad/norm": float("nan")}], summary=False, config=False
    )
    page = make_report(tmp_path).read_text()
    assert _img_sources(page) == ["reward.png"]
    assert "Gradient norm: logged, but no finite value" in page
    assert "Policy entropy: not logged" in page
    assert "summary.json not found" in page and "config.yaml not found" in page


def test_make_report_empty_run_and_stale_pngs(tmp_path):
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "old.png").write_bytes(PNG_MAGIC)
    page = make_report(tmp_path).read_text()
    assert _img_sources(page) == []
    assert "metrics.jsonl is missing or empty" in page
    assert not (tmp_path / "report" / "old.png").exists()  # the folder matches the page
    assert (tmp_path / "report" / "summary.md").exists()


def test_make_report_bad_summary_and_missing_dir(tmp_path):
    (tmp_path / "summary.json").write_text("{not json")
    assert "summary.json is not valid JSON" in make_report(tmp_path).read_text()
    with pytest.raises(FileNotFoundError, match="run directory"):
        make_report(tmp_path / "absent")


def test_flatten_and_overview():
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": 2}) == {"a.b": 1, "a.c.d": [1, 2], "e": 2}
    rows = [{"step": 0, "x": 3.0}, {"step": 1, "x": None}, {"step": 2, "x": 1.0}, {"step": 3, "y": None}]
    by_metric = {item["metric"]: item for item in metric_overview(rows)}
    x = by_metric["x"]
    # finite values of x: 3, 1  ->  first 3, last 1, min 1, max 3; one null among 3 rows
    assert (x["rows"], x["non_finite"]) == (3, 1)
    assert (x["first"], x["last"], x["min"], x["max"]) == (3.0, 1.0, 1.0, 3.0)
    assert x["last_step"] == 2
    assert math.isnan(by_metric["y"]["last"]) and by_metric["y"]["non_finite"] == 1
