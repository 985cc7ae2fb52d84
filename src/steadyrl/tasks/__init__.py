"""Tasks: prompts with gold answers, verifiable rewards, SFT demonstrations (built by name through
``steadyrl.registry.build_task``).

``reasoning_gym`` and ``jsonl_math`` import their optional packages (``pip install 'steadyrl[tasks]'``)
only when built; ``python`` (your reward function and data) needs ``steadyrl[data]`` for anything but JSONL.
"""

from __future__ import annotations

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

__all__ = [
    "ArithmeticTask",
    "JsonlMathTask",
    "Prompt",
    "PythonRewardTask",
    "ReasoningGymTask",
    "RewardError",
    "Task",
    "TaskError",
    "TaskScores",
    "column_carries",
    "score_batch",
    "score_completions",
    "write_sample_math_jsonl",
]
