"""The real-model recipes (configs/models/*.yaml) are valid: each trains for two steps, as written apart from
the sizes, with the model swapped for the embedded one and the data for a small GSM8K-style JSONL file written
here. The recipes render prompts with the chat template (prompt_format: chat, a system prompt), so the embedded
model is copied with a ChatML-style template added to its tokenizer; its weights are the embedded model's.

Run: .venv/bin/python -m pytest -q tests/test_model_recipes.py
"""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import pytest

from extras import requires_extra
from steadyrl.config_load import load_config
from steadyrl.report import read_metrics
from steadyrl.runtime.checkpoint import latest_checkpoint
from steadyrl.train.setup import resolve_model_path
from steadyrl.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "configs" / "models").glob("*.yaml"))
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
pytestmark = requires_extra("tasks", "math_verify")


def write_gsm8k_style(path: Path, n: int = 40) -> Path:
    """GSM8K's layout: a question, and an answer that is a worked solution ending in '#### <number>'."""
    rng = random.Random(0)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            a, b = rng.randint(2, 60), rng.randint(2, 60)
            question = f"Ann has {a} apples and buys {b} more. How many apples does she have?"
            answer = f"Ann has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}"
            f.write(json.dumps({"question": question, "answer": answer}) + "\n")
    return path


@pytest.fixture
def chat_model_dir(tmp_path) -> Path:
    out = tmp_path / "tiny-adder-chat"
    shutil.copytree(resolve_model_path("embedded:tiny-adder"), out)
    config_file = out / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "chat_template": CHATML}))
    return out


def test_there_is_a_real_model_recipe():
    assert RECIPES and all(not load_config(r).model.name_or_path.startswith("embedded:") for r in RECIPES)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_trains_two_steps_with_the_embedded_model(recipe, lora, chat_model_dir, tmp_path):
    if lora:
        pytest.importorskip("peft", reason="needs the lora extra (peft): pip install -e '.[lora]'")
    data = write_gsm8k_style(tmp_path / "train.jsonl")
    sizes = [
        f"model.name_or_path={chat_model_dir}",
        "model.autocast=none",  # CPU
        f"task.kwargs.data={data}",
        "task.kwargs.workers=1",
        "rollout.prompts_per_step=2",
        "rollout.group_size=4",
        "rollout.max_new_tokens=6",
        "optim.steps=2",
        "optim.warmup_steps=0",
        "optim.micro_batch_size=4",
        "eval.every=2",
        "eval.num_prompts=2",
        "eval.pass_k=2",
        "checkpoint.every=1",
        "logging.progress=false",
        "logging.report=false",
        "logging.tensorboard=false",
        "run.device=cpu",
        f"run.output_dir={tmp_path / 'run'}",
    ]
    if lora:
        sizes.append("model.lora={r: 4, alpha: 8, target_modules: [all-linear]}")
    cfg = load_config(recipe, sizes)
    assert cfg.model.prompt_format == "chat" and cfg.model.system_prompt and cfg.guard is not None
    assert cfg.task.kwargs["reward"] == "steadyrl.rewards.builtin:math_answer"
    trainer = Trainer(cfg)
    try:
        assert trainer.renderer.uses_chat(trainer.tokenizer)
        summary = trainer.train()
    finally:
        trainer.task.close()
    assert summary["steps"] == 2 and summary["skipped_steps"] == 0
    rows = [r for r in read_metrics(tmp_path / "run") if "reward/mean" in r]
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert row["reward/nan_frac"] == 0.0  # math-verify reads every '... #### N' solution as a gold answer
        for key, value in row.items():
            if not key.endswith(("_min", "_max")):
                assert math.isfinite(value), f"{recipe.name}: {key} = {value}"
    step_dir = latest_checkpoint(tmp_path / "run")
    assert (step_dir / "hf" / "config.json").is_file() and (step_dir / "hf-adapter").is_dir() is lora
    assert (tmp_path / "run" / "final").is_dir()
