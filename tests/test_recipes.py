"""Every shipped recipe trains its embedded model for two steps with finite metrics (small batch, CPU)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from steadyrl.config_load import load_config
from steadyrl.report import read_metrics
from steadyrl.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(
    p for p in (ROOT / "configs").rglob("*.yaml") if p.resolve().is_file() and p.parent.name != "models"
)  # configs/models/ name real hub models; tests/test_model_recipes.py runs them with the embedded model


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_recipe_trains_two_steps(recipe, tmp_path):
    cfg = load_config(
        recipe,
        [
            "optim.steps=2",
            "rollout.prompts_per_step=2",
            "optim.warmup_steps=0",
            "eval.every=0",
            "logging.progress=false",
            "logging.report=false",
            "logging.tensorboard=false",
            "checkpoint.save_final_model=false",
            "run.device=cpu",
            f"run.output_dir={tmp_path / 'run'}",
        ],
    )
    assert cfg.model.name_or_path.startswith("embedded:"), "recipes train the embedded models"
    summary = Trainer(cfg).train()
    assert summary["steps"] == 2 and summary["skipped_steps"] == 0
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        for key, value in row.items():
            if not key.endswith(("_min", "_max")):
                assert math.isfinite(value), f"{recipe.name}: {key} = {value}"
