"""benchmarks/precision_mismatch.py runs end to end in --smoke mode and reports every configuration.

    .venv/bin/python -m pytest -q tests/bench/test_precision_mismatch.py
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_smoke_run_reports_every_configuration(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_precision_mismatch", ROOT / "benchmarks" / "precision_mismatch.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    out = tmp_path / "mismatch.md"
    assert module.main(["--smoke", "--out", str(out)]) == 0
    text = out.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| configuration")]
    assert [r.split("|")[1].strip() for r in rows] == list(module.CONFIGS)
    fp32 = float(rows[0].split("|")[2])
    bf16 = float(rows[1].split("|")[2])
    assert 0 <= fp32 < bf16  # the bf16 sampler's mismatch is above the fp32 floor
