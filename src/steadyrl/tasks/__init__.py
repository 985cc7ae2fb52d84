"""Tasks: prompts with gold answers, verifiable rewards, SFT demonstrations (built by name through
``steadyrl.registry.build_task``).

``reasoning_gym`` and ``jsonl_math`` import their optional packages (``pip install 'steadyrl[tasks]'``)
only when built.
"""

from __future__ import annotations

from steadyrl.tasks.arithmetic import ArithmeticTask, column_carries
from steadyrl.tasks.base import (
    Prompt,
    RewardError,
    RewardScores,
    Task,
    TaskError,
    score_completions,
    score_rewards,
)
from steadyrl.tasks.jsonl_math import JsonlMathTask, write_sample_math_jsonl
from steadyrl.tasks.reasoning_gym import ReasoningGymTask

__all__ = [
    "ArithmeticTask",
    "JsonlMathTask",
    "Prompt",
    "ReasoningGymTask",
    "RewardError",
    "RewardScores",
    "Task",
    "TaskError",
    "column_carries",
    "score_completions",
    "score_rewards",
    "write_sample_math_jsonl",
]
