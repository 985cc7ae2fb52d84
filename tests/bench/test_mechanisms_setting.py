"""The mechanism lab's settings (bench/mechanisms.py SETTINGS): the default is the short-answer lab unchanged,
``scratchpad`` runs formulation and CAPO on the scratchpad checkpoint.

Run: .venv/bin/python -m pytest -q tests/bench/test_mechanisms_setting.py
"""

from __future__ import annotations

import dataclasses

import pytest

from steadyrl.bench.mechanisms import SCRATCHPAD_MODEL, MechanismsSpec, full_spec, plan_jobs, quick_spec
from steadyrl.cli import build_parser
from steadyrl.config import ConfigError
from steadyrl.lab.capo_lab import CapoSpec, _recipe
from steadyrl.lab.context import SCRATCHPAD
from steadyrl.lab.formulation import FormulationSpec


def test_the_default_quick_run_is_unchanged():
    spec = quick_spec()
    assert dataclasses.replace(spec, setting="short") == MechanismsSpec()
    assert spec.formulation == {} and spec.capo == {"steps": 4} and spec.out == "runs/mechanisms-quick"
    assert FormulationSpec(**spec.formulation).model == "embedded:tiny-adder"
    assert FormulationSpec().max_new_tokens == 6  # the short answers' budget, as before


def test_scratchpad_setting_plans_formulation_and_capo_on_the_scratchpad_model():
    spec = quick_spec(setting="scratchpad")
    assert spec.items == ("formulation", "capo") and spec.out == "runs/mechanisms-scratchpad-quick"
    f = FormulationSpec(**spec.formulation)
    assert (f.model, f.task_kwargs, f.max_new_tokens) == (SCRATCHPAD_MODEL, SCRATCHPAD, 40)
    assert {j.item for j in plan_jobs(spec)} == {"formulation", "capo"}
    # the caller's item parameters merge over the setting's, CAPO's config overrides add up
    spec = quick_spec(setting="scratchpad", formulation={"num_prompts": 4}, capo={"overrides": ("optim.lr=1e-4",)})
    assert spec.formulation["num_prompts"] == 4 and spec.formulation["model"] == SCRATCHPAD_MODEL
    assert spec.capo["overrides"][-1] == "optim.lr=1e-4" and spec.capo["steps"] == 4
    assert full_spec(setting="scratchpad").out == "runs/mechanisms-scratchpad"
    assert quick_spec(setting="scratchpad", out="x", items=("capo",)).items == ("capo",)


def test_scratchpad_capo_recipe_is_the_scratchpad_task():
    spec = quick_spec(setting="scratchpad")
    cfg, _ = _recipe(CapoSpec(**spec.capo), "capo", 1e-3, 0)
    assert cfg.model.name_or_path == SCRATCHPAD_MODEL and cfg.rollout.max_new_tokens == 40
    assert dict(cfg.task.kwargs) == SCRATCHPAD
    assert cfg.optim.lr == 1e-3 and cfg.token_filters[0].name == "capo"  # the rest is CAPO's recipe


def test_bad_setting_and_items_outside_it_are_config_errors():
    with pytest.raises(ConfigError, match="unknown lab setting"):
        quick_spec(setting="long")
    with pytest.raises(ConfigError, match="runs only formulation, capo"):
        plan_jobs(quick_spec(setting="scratchpad", items=("routing",)))


def test_cli_setting_option():
    args = build_parser().parse_args(["bench", "mechanisms", "--quick", "--setting", "scratchpad"])
    assert args.setting == "scratchpad"
    assert build_parser().parse_args(["bench", "mechanisms", "--quick"]).setting == "short"


def test_cli_set_gives_item_parameters(monkeypatch):
    import steadyrl.bench.mechanisms as mechanisms
    from steadyrl.cli import main

    seen = {}
    monkeypatch.setattr(mechanisms, "run_mechanisms", lambda spec, command=None: seen.setdefault("spec", spec))
    argv = ["bench", "mechanisms", "--quick", "--setting", "scratchpad", "--items", "formulation",
            "--set", "formulation.lr=3e-4", "formulation.trajectory_mismatches=[fp32]"]
    assert main(argv) == 0
    f = seen["spec"].formulation
    assert f["lr"] == 3e-4 and f["trajectory_mismatches"] == ("fp32",) and f["model"] == SCRATCHPAD_MODEL
    assert main(["bench", "mechanisms", "--quick", "--set", "lr=3e-4"]) == 2  # no item: a one-line error
