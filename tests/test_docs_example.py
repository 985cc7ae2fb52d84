"""docs/examples/your_own_model.yaml and my_rewards.py: the guide's config trains for two steps with the model
path swapped for the embedded model, and the example rewards score as their docstrings say.

Run: .venv/bin/python -m pytest -q tests/test_docs_example.py
"""

from __future__ import annotations

import math
from pathlib import Path

from extras import requires_extra
from steadyrl.config_load import load_config
from steadyrl.report import read_metrics
from steadyrl.rewards import load_reward_function
from steadyrl.tasks import write_sample_math_jsonl
from steadyrl.train.trainer import Trainer

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"


def test_example_rewards():
    exact = load_reward_function(f"{EXAMPLES / 'my_rewards.py'}:exact_match")
    named = load_reward_function(f"{EXAMPLES / 'my_rewards.py'}:correct_and_formatted")
    assert exact({"answer": "1234"}, "so 1,234 apples") == 1.0 and exact({"answer": "12"}, "none") == 0.0
    assert named({"answer": "7"}, "3 + 4\nAnswer: 7") == {"correct": 1.0, "format": 1.0}
    assert named({"answer": "7"}, "it is 7") == {"correct": 1.0, "format": 0.0}
    assert named({"answer": "7"}, "it is 7", strict=True) == {"correct": 0.0, "format": 0.0}
    assert named({"answer": "\\frac{1}{2}"}, "Answer: 1") == {"correct": None, "format": 0.0}


@requires_extra("lora", "peft")
def test_the_guide_config_trains_two_steps(tmp_path):
    data = write_sample_math_jsonl(tmp_path / "train.jsonl", n=40)
    cfg = load_config(
        EXAMPLES / "your_own_model.yaml",
        [
            "model.name_or_path=embedded:tiny-adder",  # the char tokenizer has no chat template: no system prompt
            "model.system_prompt=null",
            "model.autocast_bf16=false",
            f"task.kwargs.reward={EXAMPLES / 'my_rewards.py'}:correct_and_formatted",
            f"task.kwargs.data={data}",
            "task.kwargs.workers=1",
            "rollout.prompts_per_step=2",
            "rollout.group_size=4",
            "rollout.max_new_tokens=6",
            "optim.steps=2",
            "optim.micro_batch_size=8",
            "eval.every=0",
            "checkpoint.every=0",
            "checkpoint.save_final_model=false",
            "logging.progress=false",
            "logging.report=false",
            "logging.tensorboard=false",
            "run.device=cpu",
            f"run.output_dir={tmp_path / 'run'}",
        ],
    )
    assert cfg.model.lora is not None and cfg.task.name == "python"
    trainer = Trainer(cfg)
    try:
        summary = trainer.train()
    finally:
        trainer.task.close()
    assert summary["steps"] == 2
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert {"reward/correct_mean", "reward/format_mean", "reward/timeout_frac", "kl/ref_k3"} <= set(row)
        assert all(math.isfinite(v) for k, v in row.items() if not k.endswith(("_min", "_max")) and k != "reward/correct_mean")

