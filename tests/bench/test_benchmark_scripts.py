"""The benchmark scripts run end to end in --smoke mode on CPU, and their tables say what they should.

No timing is asserted: only that every configuration ran, that the arithmetic of the reported ratios is
right (hand-computed on made-up times), and that the table is consistent with itself.
"""

from __future__ import annotations

import importlib.util
import math
import re
import sys
from pathlib import Path

import pytest

from steadyrl import registry

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str):
    path = ROOT / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


overhead = _load("overhead")
throughput = _load("throughput")


def _rows(text: str) -> dict[str, list[str]]:
    """Markdown table rows keyed by their first cell."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("| configuration") and not line.startswith("| side"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells
    return rows


def _ratio(cell: str) -> float:
    assert cell.endswith("x"), cell
    return float(cell[:-1])


# ----------------------------------------------------------------------------- overhead: ratio arithmetic


def test_paired_ratios_and_table_by_hand():
    ref = overhead.Case("grpo", "reference", [], "grpo", times=[1.0, 1.0, 2.0], wall=[1.5, 1.5, 3.0])
    case = overhead.Case("minirl N=2", "minirl", [], "grpo", steps_per_batch=2, times=[2.0, 3.0, 4.0], wall=[2, 9, 9])
    # per round: 2/1 = 2, 3/1 = 3, 4/2 = 2  -> range 2-3
    assert overhead.paired_ratios(case, ref) == [2.0, 3.0, 2.0]
    rows = _rows(overhead.table([ref, case]))
    # medians: grpo 1 s (wall 1.5 s), minirl 3 s (wall 9 s) -> ratio 3; per optimizer step 3 x 1 / 2 = 1.5;
    # the ratios use `times`, not `wall`
    assert rows["grpo"][3:8] == ["1000.0", "1500.0", "1.00x", "1.00-1.00", ""]
    assert rows["minirl N=2"][3:8] == ["3000.0", "9000.0", "3.00x", "2.00-3.00", "1.50x"]
    assert rows["minirl N=2"][8:] == ["n/a", "n/a"]  # no CUDA memory counter on CPU


def test_table_reports_an_error_row_instead_of_a_ratio():
    ref = overhead.Case("grpo", "reference", [], "grpo", times=[1.0], wall=[1.0])
    broken = overhead.Case("loss=x", "loss", [], "grpo", error="ConfigError: bad")
    rows = _rows(overhead.table([ref, broken]))
    assert rows["loss=x"][3] == "error: ConfigError: bad"


def test_every_registered_method_has_a_configuration():
    names = {c.name for c in overhead.build_cases(overhead.SHAPES["cpu"])}
    for loss in registry.LOSSES:
        assert loss == "ppo_clip" or f"loss={loss}" in names  # ppo_clip is the GRPO reference itself
    for correction in registry.CORRECTIONS:
        assert f"correction={correction}" in names
    for combiner in registry.COMBINERS:
        assert combiner == "sum" or f"combiner={combiner}" in names
    assert {"capo (recipe, adam model)", "minirl N=2", "minirl N=4", "minirl N=8"} <= names
    assert {"moe grpo replay=R2", "moe grpo replay=R3", "grpo+kl (micro-batch 8)", "grpo (control)"} <= names


# ----------------------------------------------------------------------------- overhead: smoke run


def test_overhead_smoke_runs_every_configuration(tmp_path):
    out = tmp_path / "overhead.md"
    assert overhead.main(["--smoke", "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("Device: CPU")
    assert "Command: python benchmarks/overhead.py --smoke" in text
    rows = _rows(text)
    cases = overhead.build_cases(overhead.SHAPES["smoke"])
    assert set(rows) == {c.name for c in cases}
    for case in cases:
        cells = rows[case.name]
        assert not cells[3].startswith("error"), cells
        assert float(cells[3]) > 0
        assert float(cells[4]) > 0
        ratio = _ratio(cells[5])
        assert math.isfinite(ratio) and ratio > 0
        if case.name == case.reference:
            assert cells[5] == "1.00x"
        if case.steps_per_batch > 1 and case.reference == "grpo":
            # one round: per optimizer step = ratio / N, up to the table's rounding
            assert _ratio(cells[7]) == pytest.approx(ratio / case.steps_per_batch, abs=0.01)


# ----------------------------------------------------------------------------- throughput


def test_throughput_report_by_hand():
    ours = throughput.SideResult("steadyrl (hf)", completions=8, gen_s=[0.5, 0.5], gen_tokens=[40, 60])
    trl = throughput.SideResult("TRL x GRPOTrainer", completions=8, gen_s=[1.0, 1.0], gen_tokens=[50, 50])
    # step ends at 0, 1, 2, 4, 7 with one warm-up step -> steps 1, 2, 3 (the first, 1 s, is warm-up)
    ours.add_steps([0.0, 1.0, 2.0, 4.0, 7.0], [0.0, 1.0, 3.0, 6.0, 9.0], warmup=1)
    assert ours.step_s == [1.0, 2.0, 3.0] and ours.wall_s == [2.0, 3.0, 3.0]
    trl.add_steps([0.0, 9.0, 13.0, 17.0, 22.0], [0.0, 9.0, 13.0, 17.0, 22.0], warmup=1)
    rows = _rows(throughput.report([ours, trl]))
    # steadyrl: median step 2 s (wall 3 s) -> 8 / 2 = 4 completions/s; 100 tokens in 1 s;
    # (40 + 60) / 2 calls / 8 completions = 6.25 tokens per completion
    # TRL: steps 4, 4, 5 -> median 4 s; speed-up 4 / 2 = 2; 100 tokens in 2 s = 50 tokens/s -> generation ratio 2
    assert rows["steadyrl (hf)"][1:] == ["2.000", "3.000", "4.0", "0.500", "100", "6.2", "2.00x", "2.00x"]
    assert rows["TRL x GRPOTrainer"][1:] == ["4.000", "4.000", "2.0", "1.000", "50", "6.2", "1.00x", "1.00x"]


def test_throughput_smoke_runs_both_sides(tmp_path):
    out = tmp_path / "throughput.md"
    assert throughput.main(["--smoke", "--out", str(out)]) == 0
    text = out.read_text()
    rows = _rows(text)
    from steadyrl.registry import ROLLOUT_BACKENDS as BACKENDS

    expected = {f"steadyrl ({b})" for b in ("hf", "native") if b in BACKENDS}
    try:
        import trl

        expected.add(f"TRL {trl.__version__} GRPOTrainer")
    except ImportError:
        assert "TRL not run" in text
    assert set(rows) == expected
    batch = throughput.SETTINGS["smoke"].prompts * throughput.SETTINGS["smoke"].generations
    for name, cells in rows.items():
        step, per_s, mean_len = float(cells[1]), float(cells[3]), float(cells[6])
        assert step > 0 and float(cells[2]) > 0
        # completions/s = B / step time; the table rounds the step time to 3 decimals (±0.0005 s), which
        # on a fast smoke step is more than 2 % of it.
        rel = max(0.02, 0.0006 / step)
        assert per_s == pytest.approx(batch / step, rel=rel, abs=0.1), name
        assert 1.0 <= mean_len <= throughput.SETTINGS["smoke"].new_tokens, name
    assert re.search(r"up to 4 new tokens, micro-batch 8", text)
