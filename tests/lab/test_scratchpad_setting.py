"""The lab's scratchpad setting end to end on the shipped checkpoint (slow): the enumerated completions are the
long worked answers, the on-policy gradient tracks ∇J_S up to the enumeration's missing mass, and CAPO's lab
sees long held-out contexts.

Run: .venv/bin/python -m pytest -q -m slow tests/lab/test_scratchpad_setting.py
"""

from __future__ import annotations

import pytest

from steadyrl.bench.mechanisms import quick_spec
from steadyrl.lab.capo_lab import CapoRun, CapoSpec
from steadyrl.lab.formulation import FormulationLab, FormulationSpec
from steadyrl.train.setup import embedded_available

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not embedded_available("tiny-adder-scratchpad"), reason="embedded:tiny-adder-scratchpad not built"),
]


def test_formulation_on_scratchpad_answers():
    params = {**quick_spec(setting="scratchpad").formulation, "num_prompts": 2, "mass": 0.9, "mismatches": ("fp32",),
              "warmup_steps": 0}
    lab = FormulationLab(FormulationSpec(**params), seed=0, log=lambda m: None)
    setup = lab.setup_row()
    assert 21 <= setup["mean_len_policy"] <= 34 and setup["truncated_policy"] < 0.01  # worked answers, with EOS
    assert setup["mass_min"] >= 0.9 and 0.0 <= setup["J"] <= 1.0
    rows = {(r["method"], r["agg"]): r for r in lab.mismatch_rows()}
    # on-policy, sum aggregation: the only error left is the 10 % of mass the enumeration leaves out
    assert rows[("none", "sum")]["cos"] > 0.9 and rows[("seq_is", "sum")]["cos"] > 0.9


def test_capo_lab_on_scratchpad_contexts():
    spec = CapoSpec(**{**quick_spec(setting="scratchpad").capo, "steps": 1, "heldout_prompts": 4})
    run = CapoRun(spec, "capo", 1e-3, seed=0)
    assert run.heldout.response_mask.sum(1).float().mean() > 20
    rows = run.run()
    assert [r["kind"] for r in rows] == ["step", "step", "summary"] and rows[-1]["tokens"] > 1000
