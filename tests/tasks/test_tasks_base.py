"""Prompt, score_completions (NaN / None / raising / non-numeric rewards), draw_from_pool.

Run: .venv/bin/python -m pytest -q tests/tasks/test_tasks_base.py
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from steadyrl.tasks import Prompt, RewardError, Task, TaskError, score_completions
from steadyrl.tasks.base import check_split, draw_from_pool


class TableTask:
    """Returns whatever the completion names, to drive score_completions through every case."""

    name = "table"

    def sample(self, split, n, seed):
        return []

    def eval_prompts(self):
        return []

    def demonstration(self, prompt, rng):
        return prompt.answer

    def reward(self, prompt, completion):
        table = {
            "one": 1.0,
            "half": 0.5,
            "int": 1,
            "bool": True,
            "none": None,
            "nan": math.nan,
            "np": np.float64(0.25),
            "tensor": torch.tensor(0.75),
            "np_bool": np.bool_(True),
            "vector": torch.tensor([1.0, 2.0]),
            "str": "1.0",
            "list": [1.0],
            "inf": math.inf,
        }
        if completion == "raise":
            raise KeyError("boom")
        return table[completion]


P = Prompt(id="p0", text="2+2=", answer="4")


def test_prompt_equality_and_hash_use_id_and_text():
    a = Prompt(id="x", text="t", answer="1", meta={"k": [1]})
    b = Prompt(id="x", text="t", answer="2", meta={"other": 2})
    c = Prompt(id="y", text="t", answer="1")
    assert a == b and hash(a) == hash(b)
    assert a != c
    assert len({a, b, c}) == 2
    assert Prompt(id="z", text="t", answer="a").meta == {}
    with pytest.raises(AttributeError):
        a.text = "u"  # frozen


def test_table_task_satisfies_protocol():
    assert isinstance(TableTask(), Task)


def test_score_completions_values():
    completions = ["one", "half", "int", "bool", "none", "nan", "np", "tensor", "np_bool"]
    rewards = score_completions(TableTask(), [P] * len(completions), completions)
    assert rewards.dtype == torch.float32 and rewards.shape == (9,)
    expected = torch.tensor([1.0, 0.5, 1.0, 1.0, math.nan, math.nan, 0.25, 0.75, 1.0])
    torch.testing.assert_close(rewards, expected, equal_nan=True)


def test_score_completions_empty():
    assert score_completions(TableTask(), [], []).shape == (0,)


def test_raising_reward_names_prompt_completion_and_error():
    prompts = [P, Prompt(id="p-bad", text="9*9=", answer="81")]
    with pytest.raises(RewardError) as info:
        score_completions(TableTask(), prompts, ["one", "raise"])
    message = str(info.value)
    for fragment in (
        "'p-bad'",
        "'9*9='",
        "'raise'",
        "KeyError",
        "boom",
        "Fix the reward function",
        "'table'",
    ):
        assert fragment in message
    assert isinstance(info.value.__cause__, KeyError)


@pytest.mark.parametrize("completion", ["str", "list", "inf", "vector"])
def test_non_numeric_or_infinite_reward_is_an_error(completion):
    with pytest.raises(RewardError, match="fix the reward function to return a finite float"):
        score_completions(TableTask(), [P], [completion])


def test_long_completion_is_truncated_in_message():
    class Raises(TableTask):
        def reward(self, prompt, completion):
            raise ValueError("bad")

    long = "x" * 1000
    with pytest.raises(RewardError) as info:
        score_completions(Raises(), [P], [long])
    assert "x" * 200 in str(info.value) and "x" * 201 not in str(info.value)
    assert "(1000 chars)" in str(info.value)


def test_length_mismatch():
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        score_completions(TableTask(), [P, P], ["one"])


def test_check_split():
    check_split("train")
    check_split("eval")
    with pytest.raises(TaskError, match="'train' or 'eval'"):
        check_split("test")


def test_draw_from_pool_by_hand():
    pool = [Prompt(id=str(i), text=str(i), answer="") for i in range(3)]
    order = list(range(3))
    random.Random(5).shuffle(order)
    assert draw_from_pool(pool, 2, seed=5) == [pool[i] for i in order[:2]]
    assert draw_from_pool(pool, 0, seed=5) == []
    with pytest.raises(TaskError, match="empty"):
        draw_from_pool([], 1, seed=0)
    with pytest.raises(TaskError, match="n must be >= 0"):
        draw_from_pool(pool, -1, seed=0)


@settings(deadline=None, max_examples=40)
@given(pool_size=st.integers(1, 7), n=st.integers(0, 30), seed=st.integers(0, 10**6))
def test_draw_from_pool_is_balanced_and_deterministic(pool_size, n, seed):
    pool = [Prompt(id=str(i), text=str(i), answer="") for i in range(pool_size)]
    drawn = draw_from_pool(pool, n, seed)
    assert drawn == draw_from_pool(pool, n, seed)
    assert len(drawn) == n
    counts = [sum(p.id == q.id for p in drawn) for q in pool]
    assert max(counts) - min(counts) <= 1  # each full pass uses every prompt once
    for start in range(0, n - n % pool_size, pool_size):
        assert len({p.id for p in drawn[start : start + pool_size]}) == pool_size
