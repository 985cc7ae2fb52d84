"""registry.build_task: names, options, errors listing the valid choices.

Run: .venv/bin/python -m pytest -q tests/tasks/test_tasks_build.py
"""

from __future__ import annotations

import pytest

from extras import needs_tasks_extra
from steadyrl.registry import TASKS, build_task
from steadyrl.tasks import (
    ArithmeticTask,
    JsonlMathTask,
    ReasoningGymTask,
    Task,
    TaskError,
    write_sample_math_jsonl,
)


def test_names():
    assert sorted(TASKS) == ["arithmetic", "jsonl_math", "python", "reasoning_gym"]


@needs_tasks_extra
def test_builds_each_task(tmp_path):
    arithmetic = build_task("arithmetic", max_digits=2, operations="+-", eval_size=10)
    assert isinstance(arithmetic, ArithmeticTask) and arithmetic.operations == ("+", "-")
    gym = build_task("reasoning_gym", dataset="chain_sum", size=10, eval_size=5)
    assert isinstance(gym, ReasoningGymTask)
    path = write_sample_math_jsonl(tmp_path / "m.jsonl", n=10)
    math_task = build_task("jsonl_math", path=str(path), eval_fraction=0.2)
    assert isinstance(math_task, JsonlMathTask) and len(math_task.eval_prompts()) == 2
    for task in (arithmetic, gym, math_task):
        assert isinstance(task, Task)


def test_unknown_name_lists_valid_names():
    with pytest.raises(
        TaskError, match=r"unknown task 'gsm8k'; valid names: arithmetic, jsonl_math, python, reasoning_gym\."
    ):
        build_task("gsm8k")


def test_unknown_option_lists_valid_keys():
    with pytest.raises(
        TaskError,
        match=r"unknown setting\(s\) 'digits' for task 'arithmetic'; valid: .*max_digits",
    ):
        build_task("arithmetic", digits=3)


def test_missing_required_option():
    with pytest.raises(
        TaskError, match=r"task 'reasoning_gym' needs 'dataset'; valid: .*answer_tag"
    ):
        build_task("reasoning_gym", size=10)
    with pytest.raises(TaskError, match=r"needs 'path'"):
        build_task("jsonl_math")


def test_bad_value_is_still_a_task_error():
    with pytest.raises(TaskError, match="operations"):
        build_task("arithmetic", operations="^")
