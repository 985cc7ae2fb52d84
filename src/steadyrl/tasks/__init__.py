"""Tasks: prompts with gold answers, verifiable rewards, SFT demonstrations; ``build_task`` by name.

``reasoning_gym`` and ``jsonl_math`` import their optional packages (``pip install 'steadyrl[tasks]'``)
only when built; ``python`` (your reward function and data) needs ``steadyrl[data]`` for anything but JSONL.
"""

from __future__ import annotations

import inspect
from typing import Any

from steadyrl.tasks.arithmetic import ArithmeticTask, column_carries
from steadyrl.tasks.base import (
    Prompt,
    RewardError,
    Task,
    TaskError,
    TaskScores,
    score_batch,
    score_completions,
)
from steadyrl.tasks.jsonl_math import JsonlMathTask, write_sample_math_jsonl
from steadyrl.tasks.python_task import PythonRewardTask
from steadyrl.tasks.reasoning_gym import ReasoningGymTask

TASKS: dict[str, type] = {
    "arithmetic": ArithmeticTask,
    "reasoning_gym": ReasoningGymTask,
    "jsonl_math": JsonlMathTask,
    "python": PythonRewardTask,
}


def build_task(name: str, **kwargs: Any) -> Task:
    """Construct the task registered as ``name`` with ``kwargs``; unknown names or keys raise TaskError."""
    if name not in TASKS:
        raise TaskError(f"unknown task {name!r}; valid names: {sorted(TASKS)}")
    task_class = TASKS[name]
    parameters = {
        key: parameter
        for key, parameter in inspect.signature(task_class.__init__).parameters.items()
        if key != "self" and parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)
    }
    unknown = sorted(set(kwargs) - set(parameters))
    if unknown:
        raise TaskError(f"unknown option(s) {unknown} for task {name!r}; valid keys: {sorted(parameters)}")
    missing = [
        key for key, p in parameters.items() if p.default is inspect.Parameter.empty and key not in kwargs
    ]
    if missing:
        raise TaskError(f"task {name!r} needs {missing}; valid keys: {sorted(parameters)}")
    return task_class(**kwargs)


__all__ = [
    "TASKS",
    "ArithmeticTask",
    "JsonlMathTask",
    "Prompt",
    "PythonRewardTask",
    "ReasoningGymTask",
    "RewardError",
    "Task",
    "TaskError",
    "TaskScores",
    "build_task",
    "column_carries",
    "score_batch",
    "score_completions",
    "write_sample_math_jsonl",
]
