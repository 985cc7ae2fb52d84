"""ArithmeticTask(scratchpad=True): the worked column addition, its reward, lengths, vocabulary, demo errors.

Run: .venv/bin/python -m pytest -q tests/tasks/test_tasks_arithmetic_scratchpad.py
"""

from __future__ import annotations

import random
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from steadyrl.models import build_char_tokenizer
from steadyrl.models.tokenizer import ARITHMETIC_ALPHABET
from steadyrl.tasks import ArithmeticTask, TaskError
from steadyrl.tasks.arithmetic import column_addition

SCRATCH = ArithmeticTask(min_digits=2, max_digits=3, operations="+", scratchpad=True)
COLUMN_RE = re.compile(r"^(\d)\+(\d)\+([01])=(\d+)$")


def test_format_of_known_problems():
    # 347+85: 7+5+0 = 12 (carry 1), 4+8+1 = 13 (carry 1), 3+0+1 = 4: answer 432.
    assert SCRATCH.solution(SCRATCH.make_prompt(347, "+", 85)) == "7+5+0=12 4+8+1=13 3+0+1=4 (432)"
    # 47+38: 7+8+0 = 15, 4+3+1 = 8: 85. The prompt and the answer are those of the plain task.
    prompt = SCRATCH.make_prompt(47, "+", 38)
    assert (prompt.text, prompt.answer) == ("47+38=", "85")
    assert SCRATCH.solution(prompt) == "7+8+0=15 4+3+1=8 (85)"
    # 999+999: every column carries, the last carry becomes the leading 1 of 1998.
    assert SCRATCH.solution(SCRATCH.make_prompt(999, "+", 999)) == "9+9+0=18 9+9+1=19 9+9+1=19 (1998)"
    # a clean demonstration is the solution, and leaves rng alone
    rng, untouched = random.Random(3), random.Random(3)
    assert SCRATCH.demonstration(prompt, rng) == SCRATCH.solution(prompt)
    assert rng.random() == untouched.random()
    # the plain task's solution is its answer
    assert ArithmeticTask().solution(ArithmeticTask().make_prompt(47, "+", 38)) == "85"


def test_column_addition_forgetting_carries_by_hand():
    # 95+5: 5+5+0 = 10 (carry 1), 9+0+1 = 10 (carry 1): 100.
    assert column_addition(95, 5) == (["5+5+0=10", "9+0+1=10"], 100)
    # forget the carry out of column 0: 9+0+0 = 9: 90 = 100 - 10^1
    assert column_addition(95, 5, {0}) == (["5+5+0=10", "9+0+0=9"], 90)
    # forget the last carry: the leading 1 is dropped: "00" = 0 = 100 - 10^2
    assert column_addition(95, 5, {1}) == (["5+5+0=10", "9+0+1=10"], 0)


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("7+8+0=15 4+3+1=8 (85)", 1.0),
        ("(85)", 1.0),  # the columns are not checked: the reward is the outcome's
        ("7+8+0=15 4+3+0=7 (85)", 1.0),  # wrong working, right answer: still the outcome
        ("7+8+0=15 4+3+1=8 (85) (75)", 1.0),  # the first marker counts, the rest is ignored
        ("7+8+0=15 4+3+1=8 (75) (85)", 0.0),
        ("7+8+0=15 4+3+0=7 (75)", 0.0),  # the ignore-carries habit
        ("7+8+0=15 4+3+1=8 85", 0.0),  # no marker
        ("7+8+0=15 4+3+1=8 (85", 0.0),  # unclosed
        ("7+8+0=15 4+3+1=8 (085)", 0.0),  # leading zero: a different string, as in plain mode
        ("7+8+0=15 4+3+1=8 ( 85)", 0.0),
        ("7+8+0=15 4+3+1=8 ()", 0.0),
        ("", 0.0),
        ("+++===((", 0.0),
    ],
)
def test_reward(completion, expected):
    assert SCRATCH.reward(SCRATCH.make_prompt(47, "+", 38), completion) == expected


def test_format_reward_reads_the_marker():
    task = ArithmeticTask(min_digits=2, max_digits=3, scratchpad=True, format_reward=0.1)
    prompt = task.make_prompt(47, "+", 38)
    assert task.reward(prompt, "7+8+0=15 4+3+0=7 (75)") == {"correct": 0.0, "format": 0.1}
    assert task.reward(prompt, "7+8+0=15 4+3+1=8 (85)") == {"correct": 1.0, "format": 0.1}
    assert task.reward(prompt, "7+8+0=15 4+3+1=8 85") == {"correct": 0.0, "format": 0.0}
    assert task.reward(prompt, "(8 5)") == {"correct": 0.0, "format": 0.0}


@settings(deadline=None, max_examples=200)
@given(a=st.integers(10, 999), b=st.integers(10, 999))
def test_lengths_vocabulary_and_columns(a, b):
    tokenizer = build_char_tokenizer(ARITHMETIC_ALPHABET)
    prompt = SCRATCH.make_prompt(a, "+", b)
    text = SCRATCH.solution(prompt)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in ids and tokenizer.decode(ids) == text  # the embedded vocabulary covers it
    assert 20 <= len(ids) + 1 <= 60  # + EOS; 21 for 10+10, 34 for 999+999
    assert SCRATCH.reward(prompt, text) == 1.0
    *columns, marker = text.split(" ")
    assert len(columns) == max(len(str(a)), len(str(b))) and marker == f"({a + b})"
    carry = 0
    for k, column in enumerate(columns):  # every column is true arithmetic, its carry-in the previous carry-out
        x, y, c, s = map(int, COLUMN_RE.match(column).groups())
        assert (x, y, c) == ((a // 10**k) % 10, (b // 10**k) % 10, carry) and s == x + y + c
        carry = s // 10


def test_length_range_is_tight():
    def tokens(a: int, b: int) -> int:  # characters + EOS
        return len(SCRATCH.solution(SCRATCH.make_prompt(a, "+", b))) + 1

    # "0+0+0=0 1+1+0=2 (20)": 7 + 1 + 7 + 1 + 4 = 20 characters; "9+9+0=18 9+9+1=19 9+9+1=19 (1998)": 33
    assert tokens(10, 10) == 21 and tokens(999, 999) == 34


@settings(deadline=None, max_examples=100)
@given(a=st.integers(10, 999), b=st.integers(10, 999), seed=st.integers(0, 10_000),
       error=st.sampled_from(["ignore_carries", "drop_carry", "off_by_one"]))
def test_corrupted_demos_state_the_plain_tasks_corrupted_value(a, b, seed, error):
    """The scratchpad's answer is the value the plain task's demonstration of the same error gives, with the
    same rng draws (drop_carry picks the same column, off_by_one the same sign)."""
    kwargs = dict(min_digits=2, max_digits=3, operations="+", demo_error_rate=1.0, demo_error=error)
    scratch, plain = ArithmeticTask(scratchpad=True, **kwargs), ArithmeticTask(**kwargs)
    prompt = plain.make_prompt(a, "+", b)
    rng_s, rng_p = random.Random(seed), random.Random(seed)
    demo = scratch.demonstration(prompt, rng_s)
    assert scratch.final_answer(demo) == plain.demonstration(prompt, rng_p)
    assert rng_s.random() == rng_p.random()
    if error == "off_by_one":  # columns right, answer moved
        assert demo.rsplit(" ", 1)[0] == scratch.solution(prompt).rsplit(" ", 1)[0]
    if error == "ignore_carries":  # every carry-in written as 0
        assert all(col.split("=")[0].endswith("+0") for col in demo.split(" ")[:-1])


def test_ignore_carries_by_hand():
    task = ArithmeticTask(min_digits=2, max_digits=3, scratchpad=True, demo_error_rate=1.0, demo_error="ignore_carries")
    # 347+85 with no carry: 12 -> 2, 4+8 = 12 -> 2, 3: 322
    assert task.demonstration(task.make_prompt(347, "+", 85), random.Random(0)) == "7+5+0=12 4+8+0=12 3+0+0=3 (322)"


def test_reversed_answer_inside_the_marker():
    task = ArithmeticTask(min_digits=2, max_digits=3, scratchpad=True, answer_format="reversed")
    prompt = task.make_prompt(347, "+", 85)
    assert task.solution(prompt) == "7+5+0=12 4+8+1=13 3+0+1=4 (234)"
    assert task.reward(prompt, "(234)") == 1.0 and task.reward(prompt, "(432)") == 0.0


@pytest.mark.parametrize("operations", ["-", "+-", "*"])
def test_scratchpad_is_addition_only(operations):
    with pytest.raises(TaskError, match="operations='\\+'"):
        ArithmeticTask(operations=operations, scratchpad=True)
