"""benchmarks/sampling_layer.py: the arithmetic of its table, by hand on made-up metrics rows.

    .venv/bin/python -m pytest -q tests/bench/test_sampling_bench.py
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("bench_sampling_layer", ROOT / "benchmarks" / "sampling_layer.py")
bench = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = bench
spec.loader.exec_module(bench)


def test_interval_is_the_student_t_95_interval():
    # values 1, 2, 3: mean 2, sd 1, n 3 → 4.303 · 1/√3 = 2.4843
    mean, half = bench.interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(2.4843, abs=1e-4)
    assert bench.interval([0.5]) == (0.5, 0.0)


def test_summarise_by_hand():
    rows = [
        {"step": 0, "eval/accuracy": 0.1},
        {"step": 1, "sampling/generated": 32.0, "sampling/trained": 16.0, "sampling/informative_frac": 0.5,
         "sampling/zero_var_generated_frac": 0.75},
        {"step": 2, "sampling/generated": 48.0, "sampling/trained": 16.0, "sampling/informative_frac": 1.0,
         "sampling/zero_var_generated_frac": 0.25},
        {"step": 2, "eval/accuracy": 0.3},
    ]
    s = bench.summarise(rows)
    # generated 80, trained 32 → 2.5; informative 8 + 16 = 24 → 80/24; zero-var mean .5
    assert s["generated"] == 80 and s["gen_per_trained"] == 2.5
    assert s["gen_per_informative"] == pytest.approx(80 / 24) and s["zero_var"] == 0.5
    assert s["curve"] == [(0, 0.0, 0.1), (2, 80.0, 0.3)] and (s["acc_start"], s["acc_end"]) == (0.1, 0.3)
    line = bench.table([{"method": "grpo", **s}, {"method": "x", **s, "acc_end": 0.5}]).splitlines()[-1]
    assert line.startswith("| x | 1 | 0.50 | 2.50 | 3.33 | 80 | 0.100 | 0.500 ± 0.000 | +0.200 |")
