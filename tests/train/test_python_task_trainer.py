"""The trainer runs the python task named in the config: a reward file, a JSONL file, named rewards, the pool.

Run: .venv/bin/python -m pytest -q tests/train/test_python_task_trainer.py
"""

from __future__ import annotations

import json
import math

import pytest

from steadyrl.report import read_metrics
from steadyrl.train.trainer import Trainer

REWARDS = '''
def sevens(record, completion):
    """Share of '7' characters, and whether the completion starts with the answer's first digit."""
    share = completion.count("7") / max(1, len(completion))
    return {"sevens": share, "first_digit": float(completion[:1] == record["answer"][:1])}
'''


@pytest.fixture
def task_files(tmp_path):
    (tmp_path / "my_rewards.py").write_text(REWARDS)
    rows = [{"question": f"{a}+{b}=", "answer": str(a + b)} for a in range(6) for b in range(6)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


@pytest.mark.parametrize("workers", [0, 1])
def test_trainer_runs_a_reward_from_a_file(tiny_config, task_files, workers):
    overrides = [
        "task.name=python",
        f"task.kwargs={{reward: '{task_files / 'my_rewards.py'}:sevens', data: '{task_files / 'train.jsonl'}', "
        f"prompt_field: question, reward_weights: {{sevens: 1.0, first_digit: 0.5}}, workers: {workers}"
        + (", timeout_s: 30}" if workers else "}"),
        "eval.every=2",
        "eval.pass_k=2",
    ]
    trainer = Trainer(tiny_config(*overrides))
    try:
        summary = trainer.train()
    finally:
        trainer.task.close()
    assert summary["steps"] == 2
    rows = [r for r in read_metrics(trainer.run_dir) if "reward/mean" in r]
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        # r = 1·sevens + 0.5·first_digit, averaged: the logged parts recombine into the logged total
        assert math.isclose(row["reward/mean"], row["reward/sevens_mean"] + 0.5 * row["reward/first_digit_mean"], rel_tol=1e-5)
        assert (row.get("reward/timeout_frac") == 0.0) == bool(workers)
    assert "eval/pass@1" in read_metrics(trainer.run_dir)[-1]
