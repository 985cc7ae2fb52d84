"""The collapse map's report on a fake results.jsonl: aggregates by hand, findings, and the files it writes."""

from __future__ import annotations

import json
import math

import pytest

from steadyrl.bench.report_stability import aggregate, findings, read_results, write_report


def cell(method, lr, seed, final, *, collapsed, to_target=None, rollbacks=0, status="ok", roughness=0.05):
    steps = [0, 5, 10]
    return {
        "method": method, "lr": lr, "seed": seed, "status": status, "error": None if status == "ok" else "boom",
        "collapsed": collapsed, "collapse_reasons": ["accuracy"] if collapsed else [], "start_acc": 0.5,
        "final_acc": final, "best_acc": max(0.5, final), "target_acc": 0.65, "completions_to_target": to_target,
        "roughness": roughness, "clip_frac": 0.01, "rejected_frac": 0.0, "entropy_final": 0.2, "rollbacks": rollbacks,
        "steps_done": 10, "wall_s": 12.0, "completions_per_step": 256,
        "curve": {"eval_steps": steps, "eval_acc": [0.5, (0.5 + final) / 2, final], "reward": [0.5] * 10, "entropy": [0.2] * 10},
    }


@pytest.fixture
def rows():
    return [
        # plain GRPO: stable at 3e-4 (reaches the target at 2560 / 3840 completions), collapses at 3e-3 in both seeds
        cell("grpo", 3e-4, 0, 0.70, collapsed=False, to_target=2560),
        cell("grpo", 3e-4, 1, 0.66, collapsed=False, to_target=3840),
        cell("grpo", 3e-3, 0, 0.00, collapsed=True),
        cell("grpo", 3e-3, 1, 0.02, collapsed=True, to_target=512),  # met the target, then collapsed: not counted
        # guard: one false alarm at 3e-4; holds at 3e-3 in one seed of two
        cell("grpo_guard", 3e-4, 0, 0.70, collapsed=False, to_target=2560, rollbacks=1),
        cell("grpo_guard", 3e-4, 1, 0.68, collapsed=False, to_target=2560),
        cell("grpo_guard", 3e-3, 0, 0.60, collapsed=False, rollbacks=2),
        cell("grpo_guard", 3e-3, 1, 0.10, collapsed=True, rollbacks=3),
        # capo: holds at 3e-3 and reaches the target sooner than GRPO at 3e-4
        cell("capo", 3e-4, 0, 0.60, collapsed=False),
        cell("capo", 3e-4, 1, 0.62, collapsed=False),
        cell("capo", 3e-3, 0, 0.75, collapsed=False, to_target=1280),
        cell("capo", 3e-3, 1, math.nan, collapsed=None, status="error"),
    ]


def test_aggregate_by_hand(rows):
    agg = aggregate(rows)
    g = agg[("grpo", 3e-4)]
    assert g["collapsed"] == 0 and g["judged"] == 2
    assert g["final_mean"] == pytest.approx(0.68)  # (0.70 + 0.66) / 2
    assert (g["final_min"], g["final_max"]) == (0.66, 0.70)
    assert g["completions_median"] == 3200  # median(2560, 3840)
    assert agg[("grpo", 3e-3)]["collapsed"] == 2 and agg[("grpo", 3e-3)]["completions_median"] is None
    c = agg[("capo", 3e-3)]  # the error cell is not judged
    assert (c["n"], c["judged"], c["errors"], c["collapsed"]) == (2, 1, 1, 0)
    assert c["final_mean"] == pytest.approx(0.75) and c["completions_median"] == 1280
    assert agg[("grpo_guard", 3e-3)]["rollbacks"] == 5 and agg[("grpo_guard", 3e-4)]["cells_with_rollback"] == 1


def test_findings_state_the_collapse_regime_and_the_guard(rows):
    text = "\n".join(findings(rows))
    assert "Plain GRPO collapses in most seeds at lr 0.003 (2/2)." in text
    assert "GRPO's best stable lr is 0.0003: final accuracy 0.680; target 0.650 reached after 3200 completions" in text
    assert "held (collapsed in at most half the seeds): grpo_guard (1/2, final 0.35), capo (0/1, final 0.75)" in text
    assert "capo 1280 (fewer, 1/1 seeds)" in text
    # false alarms at 3e-4: 1 of 2 guarded runs rolled back, 1 rollback in 20 steps = 5.0 per 100 steps
    assert "1/2 runs rolled back, 1 rollbacks in 20 steps (5.0 per 100 steps)" in text
    assert "GRPO + guard at lr 0.003: collapsed 1/2 (plain GRPO 2/2), 5 rollbacks" in text
    assert "1 cell(s) raised an error: capo lr=0.003 seed=1: boom" in text


def test_findings_without_a_collapse_say_so(rows):
    calm = [r for r in rows if r["lr"] == 3e-4]
    assert "does not reach its collapse regime" in findings(calm)[0]


def test_write_report_files(rows, tmp_path):
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r, allow_nan=True) + "\n" for r in rows))
    meta = {"command": "steadyrl bench stability --quick", "train_wall_s": 123.0, "spec": {"steps": 10, "workers": 2}}
    paths = write_report(tmp_path, read_results(tmp_path / "results.jsonl"), meta)
    assert sorted(p.name for p in paths) == ["curves.png", "heatmap.png", "report.html", "report.md"]
    for p in paths:
        assert p.is_file() and p.stat().st_size > 0
    assert (tmp_path / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (tmp_path / "report.html").read_text()
    assert "src='heatmap.png'" in page and "src='curves.png'" in page and "steadyrl bench stability --quick" in page
    md = (tmp_path / "report.md").read_text()
    assert "![heat map](heatmap.png)" in md and "wall time (all cells, before this report): 123 s" in md
    assert "| grpo | 0.003 | 2/2 | 0.010 [0.00, 0.02] |" in md  # mean of 0.00 and 0.02
