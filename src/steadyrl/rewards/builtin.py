"""Reward functions that ship with steadyrl, to name in a config as ``steadyrl.rewards.builtin:<name>``.

    task: {name: python, kwargs: {reward: "steadyrl.rewards.builtin:math_answer", data: gsm8k.jsonl}}
"""

from __future__ import annotations

import functools
from typing import Any


def exact_match(record: dict[str, Any], completion: str, *, strip: bool = True) -> float:
    """1 when the completion equals the record's ``answer`` (both stripped of surrounding whitespace), else 0."""
    answer, text = str(record["answer"]), completion
    if strip:
        answer, text = answer.strip(), text.strip()
    return 1.0 if text == answer else 0.0


@functools.lru_cache(maxsize=4096)
def _gold(answer: str) -> Any:
    from steadyrl.tasks.jsonl_math import import_math_verify

    return import_math_verify().parse(f"\\boxed{{{answer}}}")


def math_answer(record: dict[str, Any], completion: str, *, extraction: str = "boxed_or_last") -> float | None:
    """1 when the completion's final answer equals the record's ``answer`` under math-verify, else 0.

    The same extraction and comparison as the ``jsonl_math`` task (its ``answer_extraction`` modes); None when
    math-verify cannot read the gold answer, so that a bad data row is masked, not scored 0. Needs the tasks
    extra (math-verify), and runs in the main thread of its process (math-verify times out with signals): use
    it with ``workers >= 1`` when the trainer runs it from another thread.
    """
    from steadyrl.tasks.jsonl_math import ANSWER_EXTRACTIONS, import_math_verify, last_boxed, last_number

    if extraction not in ANSWER_EXTRACTIONS:
        raise ValueError(f"extraction must be one of {list(ANSWER_EXTRACTIONS)}, got {extraction!r}")
    math_verify = import_math_verify()
    gold = _gold(str(record["answer"]))
    if not any(not isinstance(item, str) for item in gold):
        return None
    if extraction == "math_verify":
        extracted: str | None = completion
    else:
        boxed = last_boxed(completion)
        if boxed is not None or extraction == "boxed":
            extracted = None if boxed is None else f"\\boxed{{{boxed}}}"
        else:
            extracted = last_number(completion)
    if extracted is None:
        return 0.0
    prediction = math_verify.parse(extracted)
    if not prediction:
        return 0.0
    return 1.0 if math_verify.verify(gold, prediction) else 0.0
