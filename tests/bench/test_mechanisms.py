"""The mechanism lab's runner and report (bench/mechanisms.py, bench/report_mechanisms.py) on synthetic rows,
and one tiny end-to-end run (slow).

Run: .venv/bin/python -m pytest -q tests/bench/test_mechanisms.py
"""

from __future__ import annotations

import json

import pytest

from steadyrl.bench.mechanisms import ITEMS, full_spec, plan_jobs, quick_spec, run_mechanisms
from steadyrl.bench.report_mechanisms import rerender, write_report
from steadyrl.cli import main
from steadyrl.config import ConfigError


def test_plan_covers_every_item_and_seed():
    jobs = plan_jobs(quick_spec(seeds=(0, 1)))
    items = {j.item for j in jobs}
    assert items == set(ITEMS)
    assert {j.seed for j in jobs if j.item == "formulation"} == {0, 1}
    assert sum(j.item == "guard" for j in jobs) == 1  # the replay does not depend on a seed
    assert len({j.name for j in jobs}) == len(jobs)
    costs = [j.cost for j in jobs]
    assert costs == sorted(costs, reverse=True)  # expensive first
    assert full_spec().formulation["every_k"] == (8,)


def test_bad_items_and_seeds_are_config_errors():
    with pytest.raises(ConfigError, match="unknown lab item"):
        plan_jobs(quick_spec(items=("formulaton",)))
    with pytest.raises(ConfigError, match="at least one seed"):
        plan_jobs(quick_spec(seeds=()))


def _rows():
    setup = {"item": "formulation", "kind": "setup", "rows": 300, "mass_min": 0.999, "J": 0.6,
             "mismatch": {"fp32": {"k3": 0.0, "seq_kl_mu_old": 0.0}, "fp8": {"k3": 1e-3, "seq_kl_mu_old": 3e-3}}}
    rows = []
    for seed in (0, 1, 2):
        rows.append({**setup, "seed": seed})
        for m in ("fp32", "fp8"):
            for method in ("none", "tis", "seq_is"):
                rows.append({"item": "formulation", "kind": "mismatch", "seed": seed, "mismatch": m, "N": 1, "k": 0,
                             "method": method, "agg": "sum", "cos": 0.99, "rel_err": 0.1 + 0.01 * seed, "norm_ratio": 1.0})
            for method in ("none", "minirl"):
                rows.append({"item": "formulation", "kind": "fixed", "seed": seed, "mismatch": m, "N": 2, "k": 1,
                             "method": method, "agg": "sum", "cos": 0.9, "rel_err": 0.4, "norm_ratio": 1.0})
        rows.append({"item": "formulation", "kind": "noise", "seed": seed, "N": 2, "agg": "sum", "minibatch": 128,
                     "noise_rel": 1.0, "noise_cos": 0.3})
        rows.append({"item": "pcr", "kind": "run", "seed": seed, "method": "pcr", "plasticity_gain": 0.2,
                     "retention_loss": 0.05, "cos_mean": -0.1, "conflict_frac_mean": 0.4, "alpha_mean": 0.9})
        rows.append({"item": "lco", "kind": "summary", "seed": seed, "method": "lco_kld", "cos_on_policy": 0.2,
                     "cos_stale": -0.1, "toward_frac": 0.4, "grad_norm_roughness": 0.3, "update_cos_consecutive": 0.7,
                     "reward_last": 0.5})
    rows.append({"item": "formulation", "kind": "job", "job": "x", "seed": 0, "wall_s": 3.0, "status": "ok"})
    rows.append({"item": "pcr", "kind": "job", "job": "y", "seed": 0, "wall_s": 1.0, "status": "error", "error": "boom"})
    return rows


def test_report_renders_tables_figures_and_errors(tmp_path):
    paths = write_report(tmp_path, _rows(), {"command": "steadyrl bench mechanisms --quick", "wall_s": 12.0})
    text = (tmp_path / "report.md").read_text()
    assert "## 1. Formulation" in text and "## 4. PCR" in text and "## 5. LCO" in text
    assert "0.11 ± 0.025" in text  # rel_err 0.10, 0.11, 0.12: mean 0.11, half-width 4.303 · 0.01 / √3 = 0.0248
    assert "ERROR y: boom" in text
    assert {p.name for p in paths} >= {"report.md", "formulation_mismatch.png", "pcr.png", "lco.png"}
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    assert rerender(tmp_path)[0].name == "report.md"


def test_report_only_without_results_is_a_one_line_error(tmp_path, capsys):
    assert main(["bench", "mechanisms", "--quick", "--report-only", "--out", str(tmp_path / "none")]) == 2
    assert "no results.jsonl" in capsys.readouterr().err


def test_cli_lists_the_subcommand(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "mechanisms", "--help"])
    assert "--report-only" in capsys.readouterr().out


@pytest.mark.slow
def test_tiny_lab_end_to_end(tmp_path):
    spec = quick_spec(
        seeds=(0,), out=str(tmp_path / "lab"), workers=1, items=("formulation", "routing", "guard"),
        formulation={"num_prompts": 4, "mismatches": ("fp32", "fp8"), "staleness": (2,), "trajectory_mismatches": ("fp32",),
                     "warmup_steps": 1, "noise_batches": 1},
        routing={"num_prompts": 4, "staleness": (1, 2), "warmup_steps": 1},
    )
    meta = run_mechanisms(spec, command="test", log=lambda m: None)
    rows = [json.loads(x) for x in (tmp_path / "lab" / "results.jsonl").read_text().splitlines()]
    assert all(r["status"] == "ok" for r in rows if r.get("kind") == "job")
    on_policy = [r for r in rows if r.get("kind") == "mismatch" and r["mismatch"] == "fp32" and r["agg"] == "sum"]
    assert on_policy and all(r["cos"] > 0.9999 for r in on_policy)
    assert meta["jobs"] == 4 and (tmp_path / "lab" / "report.md").is_file()
