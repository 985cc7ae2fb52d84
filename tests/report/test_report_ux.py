"""The run report a person reads first (issue 16 item 6): a headline, no EMA through sparse eval points, the
page's full width, the guard's rollbacks and alarms, and sample completions with their rewards.

    .venv/bin/python -m pytest -q tests/report/test_report_ux.py
"""

from __future__ import annotations

import json
import math

import pytest

from steadyrl.report import MetricLogger, make_report
from steadyrl.report import plots as plots_module
from steadyrl.report.html import headline
from steadyrl.report.plots import ema, is_dense, make_plots
from steadyrl.report.sinks import SAMPLES_FILE, read_samples

EVAL_ACCURACY = [0.5, 0.6, 0.65, 0.7, 0.75, 0.8, 0.835]  # evals at steps 0, 10, ..., 60


def _quickstart_like_rows() -> list[dict]:
    """60 training steps (every step) and 7 evals (every 10 steps), as the quickstart logs them."""
    rows = []
    for step in range(0, 61):
        if step:
            rows.append({"step": step, "reward/mean": 0.5 + step / 200, "policy/entropy": 0.3})
        if step % 10 == 0:
            acc = EVAL_ACCURACY[step // 10]
            rows.append({"step": step, "eval/accuracy": acc, "eval/reward_mean": acc, "eval/len_mean": 3.0})
    return rows


def _write_rows(run_dir, rows) -> None:
    with MetricLogger(run_dir, tensorboard=False) as logger:
        for row in rows:
            row = dict(row)
            logger.log(row.pop("step"), row)


# ----------------------------------------------------------------------------- headline


def test_headline_from_the_summary():
    summary = {"steps": 60, "eval_start": 0.5, "eval_end": 0.835, "eval_metric": "eval/accuracy"}
    assert headline(summary, []) == "accuracy 0.500 → 0.835 in 60 steps"
    assert headline({**summary, "eval_metric": "eval/pass@1"}, []) == "pass@1 0.500 → 0.835 in 60 steps"


def test_headline_from_metrics_when_the_run_has_no_summary():
    assert headline({}, _quickstart_like_rows()) == "accuracy 0.500 → 0.835 in 60 steps"
    assert headline({}, [{"step": 0, "eval/accuracy": 0.25}]) == "accuracy 0.250 at step 0"
    assert headline({}, [{"step": 3, "reward/mean": 0.1}]) is None  # no eval ran


def test_headline_is_on_the_page_and_in_the_markdown(tmp_path):
    _write_rows(tmp_path, _quickstart_like_rows())
    (tmp_path / "summary.json").write_text(json.dumps({"steps": 60, "eval_start": 0.5, "eval_end": 0.835}))
    page = make_report(tmp_path).read_text()
    assert '<p class="headline">accuracy 0.500 → 0.835 in 60 steps</p>' in page
    assert "**accuracy 0.500 → 0.835 in 60 steps**" in (tmp_path / "report" / "summary.md").read_text()


# ----------------------------------------------------------------------------- no smoothing of sparse points


def test_is_dense():
    assert is_dense(list(range(1, 61)))  # a training metric: every step
    assert is_dense([1, 2, 3, 5, 6, 7, 8, 9, 10, 11])  # 10 of 11 steps (a skipped row) >= 0.9
    assert not is_dense(list(range(0, 61, 10)))  # eval every 10: 7 of 61 steps
    assert not is_dense(list(range(0, 41, 2)))  # eval every 2: 21 of 41 steps
    assert not is_dense([1, 2])  # too short to smooth
    assert is_dense([4, 5, 6])


def test_sparse_eval_series_are_drawn_point_to_point(tmp_path, monkeypatch):
    # The defect: eval/reward_mean (7 evals) got the EMA, whose last point is 0.713, not the real 0.835
    # (hand-computed: m₇ = 0.371928, 1 − 0.9⁷ = 0.521703, 0.371928 / 0.521703 = 0.712911).
    assert ema(EVAL_ACCURACY)[-1] == pytest.approx(0.712911, abs=1e-6)
    smoothed = []
    real_ema = plots_module.ema

    def recording_ema(values, smoothing=0.9):
        smoothed.append(len(values))
        return real_ema(values, smoothing)

    monkeypatch.setattr(plots_module, "ema", recording_ema)
    result = make_plots(_quickstart_like_rows(), tmp_path)
    assert "extras_eval" in [f.name for f in result.files]  # eval/len_mean, eval/reward_mean are drawn ...
    assert smoothed == [60, 60]  # ... but only reward/mean and policy/entropy (60 steps each) are smoothed


# ----------------------------------------------------------------------------- page width


def test_page_uses_the_window_width_and_wide_grids(tmp_path):
    _write_rows(tmp_path, _quickstart_like_rows())
    page = make_report(tmp_path).read_text()
    assert "max-width: 1100px" not in page  # the old fixed column
    assert "grid-template-columns: repeat(auto-fill" in page
    assert '<figure id="extras_eval" class="wide">' in page  # a grid of subplots spans the row
    assert '<figure id="reward">' in page


# ----------------------------------------------------------------------------- guard events


def test_guard_events_are_listed(tmp_path):
    _write_rows(tmp_path, _quickstart_like_rows())
    events = [
        {"event": "snapshot", "step": 5},
        {"event": "rollback", "step": 12, "restored_step": 5, "reasons": ["grad_spike", "reward_drop"],
         "signals": {"grad": 40.0}, "rollbacks": 1, "lr_scale": 0.3, "clip_scale": 0.5, "lr": 9e-4},
        {"event": "alarm", "step": 30, "reasons": ["entropy_rise"], "signals": {},
         "why_no_rollback": "max_rollbacks reached"},
    ]
    (tmp_path / "guard.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events) + '{"event": "roll')
    page = make_report(tmp_path).read_text()
    assert "<h2>Stability guard</h2>" in page
    assert "1 rollback(s), 1 alarm(s), 1 snapshot(s)" in page
    assert "<td>12</td><td>rollback</td><td>grad_spike, reward_drop</td><td>5</td><td>0.0009</td>" in page
    assert "<td>max_rollbacks reached</td>" in page


def test_no_guard_section_without_guard_log(tmp_path):
    _write_rows(tmp_path, _quickstart_like_rows())
    assert "Stability guard" not in make_report(tmp_path).read_text()


# ----------------------------------------------------------------------------- sample completions


def _sample(prompt: str, completion: str, reward) -> dict:
    return {"prompt": prompt, "answer": "83", "completion": completion, "reward": reward, "greedy": True}


def test_log_samples_writes_jsonl_and_resume_drops_later_ones(tmp_path):
    with MetricLogger(tmp_path, tensorboard=False) as logger:
        logger.log_samples(0, [_sample("74+9=", "73", 0.0), _sample("<b>", "83", float("nan"))])
        logger.log_samples(10, [_sample("74+9=", "83", 1.0)])
        logger.log_samples(20, [])  # nothing to write
    rows = read_samples(tmp_path)
    assert [(r["step"], r["completion"], r["reward"]) for r in rows] == [(0, "73", 0.0), (0, "83", None), (10, "83", 1.0)]
    for line in (tmp_path / SAMPLES_FILE).read_text().splitlines():
        json.loads(line)  # strict JSON: the NaN reward is null
    with MetricLogger(tmp_path, tensorboard=False, resume_step=5):  # resumed from a step-5 checkpoint
        pass
    assert [r["step"] for r in read_samples(tmp_path)] == [0, 0]
    with MetricLogger(tmp_path, tensorboard=False, resume_step=-1):  # a fresh start in the same directory
        pass
    assert read_samples(tmp_path) == []


def test_report_shows_the_first_and_last_eval_samples(tmp_path):
    _write_rows(tmp_path, _quickstart_like_rows())
    with MetricLogger(tmp_path, tensorboard=False, resume_step=None) as logger:
        logger.log_samples(0, [_sample("74+9=", "73", 0.0), _sample("<b>x</b>", "?", None)])
        logger.log_samples(10, [_sample("74+9=", "MIDDLE", 0.0)])
        logger.log_samples(60, [_sample("74+9=", "83", 1.0)])
    page = make_report(tmp_path).read_text()
    assert "<h2>Sample completions</h2>" in page
    assert "<h3>eval at step 0 (greedy)</h3>" in page and "<h3>eval at step 60 (greedy)</h3>" in page
    assert "MIDDLE" not in page  # only the first and the last eval
    assert '<td class="text">74+9=</td><td class="text">83</td><td class="text">73</td><td class="num">0</td>' in page
    assert "&lt;b&gt;x&lt;/b&gt;" in page and '<td class="num">unscorable</td>' in page
    assert math.isfinite(read_samples(tmp_path)[-1]["reward"])
