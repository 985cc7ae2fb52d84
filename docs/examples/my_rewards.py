"""Example reward functions for steadyrl's `python` task (docs/your-own-model.md).

A reward is called as ``reward(record, completion, **reward_kwargs)``: ``record`` is the prompt's data row
(every field of the row, plus ``id``, ``prompt`` and ``answer`` from the mapped fields), ``completion`` the
text the policy wrote. Return a float, None when the completion cannot be scored, or a dict of named floats.
"""

from __future__ import annotations

import re

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_ANSWER_LINE = re.compile(r"Answer:\s*(-?\d+(?:\.\d+)?)\s*$")


def last_number(text: str) -> str | None:
    numbers = _NUMBER.findall(text.replace(",", ""))
    return numbers[-1] if numbers else None


def exact_match(record: dict, completion: str) -> float:
    """1 when the last number in the completion is the gold answer, else 0."""
    return float(last_number(completion) == str(record["answer"]).strip())


def correct_and_formatted(record: dict, completion: str, strict: bool = False) -> dict[str, float | None]:
    """Two named rewards, combined by the task's reward_weights (r = Σ w_k r_k):

    correct  1 when the final answer is right (with ``strict``, only an "Answer: N" last line counts), else 0;
             None when the gold answer is not a number, so that a bad data row is masked instead of scored 0
    format   1 when the completion ends with an "Answer: N" line, else 0
    """
    gold = str(record["answer"]).strip()
    if _NUMBER.fullmatch(gold) is None:
        return {"correct": None, "format": 0.0}
    line = _ANSWER_LINE.search(completion.strip())
    answer = line.group(1) if line else (None if strict else last_number(completion))
    return {"correct": float(answer == gold), "format": float(line is not None)}
