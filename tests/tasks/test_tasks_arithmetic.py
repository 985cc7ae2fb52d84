"""ArithmeticTask: prompts, reward, held-out split, carries, imperfect demonstrations.

Run: .venv/bin/python -m pytest -q tests/tasks/test_tasks_arithmetic.py
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from steadyrl.tasks import ArithmeticTask, Prompt, TaskError, column_carries


def schoolbook(a: int, op: str, b: int, drop_column: int | None = None) -> int:
    """Digit-by-digit pencil-and-paper algorithm, optionally forgetting the carry / borrow out of one column."""
    if op == "-":
        big, small = max(a, b), min(a, b)
        top = [int(c) for c in reversed(str(big))]
        bottom = [int(c) for c in reversed(str(small))] + [0] * (len(str(big)) - len(str(small)))
        result, borrow = 0, 0
        for k in range(len(top)):
            digit = top[k] - borrow - bottom[k]
            borrow = 0
            if digit < 0:
                digit += 10
                borrow = 1
            if k == drop_column:
                borrow = 0
            result += digit * 10**k
        return result if a >= b else -result
    da = [int(c) for c in reversed(str(a))]
    db = [int(c) for c in reversed(str(b))]
    columns = [0] * (len(da) + len(db) + 1)
    for i in range(len(da)):
        for j in range(len(db)):
            if op == "+":
                if i == j:
                    columns[i] += da[i] + db[j]
            else:
                columns[i + j] += da[i] * db[j]
    if op == "+":  # digits without a partner in the other operand
        for i in range(len(db), len(da)):
            columns[i] += da[i]
        for j in range(len(da), len(db)):
            columns[j] += db[j]
    result, carry = 0, 0
    for k in range(len(columns)):
        total = columns[k] + carry
        result += (total % 10) * 10**k
        carry = total // 10
        if k == drop_column:
            carry = 0
    return result + carry * 10 ** len(columns)


def test_prompt_format_and_answer():
    task = ArithmeticTask()
    prompt = task.make_prompt(47, "+", 38)
    assert prompt.text == "47+38="
    assert prompt.answer == "85"
    assert prompt.id == "arithmetic/47+38"
    assert prompt.meta == {"a": 47, "op": "+", "b": 38, "value": 85}
    assert ArithmeticTask(operations="*").make_prompt(12, "*", 34).answer == "408"
    assert ArithmeticTask(allow_negative=True).make_prompt(3, "-", 5).answer == "-2"
    assert ArithmeticTask(answer_format="reversed").make_prompt(47, "+", 38).answer == "58"
    assert ArithmeticTask(answer_format="reversed").make_prompt(3, "-", 15).answer == "-21"  # -12 reversed


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("85", 1.0),
        ("85\n12+3=15", 1.0),  # cut at the first newline
        ("  85 is it", 1.0),  # stripped, cut at whitespace
        ("085", 0.0),  # leading zero is a different string
        ("84", 0.0),
        ("85.0", 0.0),
        ("", 0.0),
        ("   \n", 0.0),
        ("8 5", 0.0),
    ],
)
def test_reward(completion, expected):
    task = ArithmeticTask()
    assert task.reward(task.make_prompt(47, "+", 38), completion) == expected


def test_operands_and_digits_in_range():
    task = ArithmeticTask(min_digits=2, max_digits=3, operations="+-*")
    prompts = task.sample("train", 300, seed=1)
    ops = {p.meta["op"] for p in prompts}
    assert ops == {"+", "-", "*"}
    for p in prompts:
        a, b = p.meta["a"], p.meta["b"]
        assert 10 <= a <= 999 and 10 <= b <= 999
        if p.meta["op"] == "-":
            assert a >= b  # allow_negative=False orders the operands
        assert task.reward(p, p.answer) == 1.0
        assert int(p.answer) == eval(p.text[:-1])  # the answer is the true value


def test_one_digit_includes_zero():
    values = {p.meta["a"] for p in ArithmeticTask(max_digits=1).sample("train", 400, seed=0)}
    assert values == set(range(10))


def test_train_and_eval_are_disjoint_and_deterministic():
    task = ArithmeticTask(max_digits=2, operations="+-", eval_size=50)
    eval_prompts = task.eval_prompts()
    assert len(eval_prompts) == 50 and len(set(eval_prompts)) == 50
    assert all(task.is_eval_problem(p.meta["a"], p.meta["op"], p.meta["b"]) for p in eval_prompts)
    eval_texts = {p.text for p in eval_prompts}
    train = task.sample("train", 2000, seed=3)
    assert not any(task.is_eval_problem(p.meta["a"], p.meta["op"], p.meta["b"]) for p in train)
    assert not eval_texts & {p.text for p in train}
    assert train == task.sample("train", 2000, seed=3)
    assert [p.text for p in train[:20]] != [p.text for p in task.sample("train", 20, seed=4)]
    # the eval set is fixed by the task seed, and is the same object across calls
    assert ArithmeticTask(max_digits=2, operations="+-", eval_size=50).eval_prompts() == eval_prompts
    assert ArithmeticTask(max_digits=2, operations="+-", eval_size=50, seed=1).eval_prompts() != eval_prompts
    sampled_eval = task.sample("eval", 10, seed=0)
    assert set(sampled_eval) <= set(eval_prompts)


def test_small_problem_space_gives_smaller_eval_set():
    task = ArithmeticTask(max_digits=1, operations="+")  # 100 problems, about 1/10 held out
    eval_prompts = task.eval_prompts()
    assert 1 <= len(eval_prompts) < 30
    everything = {(a, b) for a in range(10) for b in range(10)}
    bucket = {(a, b) for a, b in everything if task.is_eval_problem(a, "+", b)}
    assert {(p.meta["a"], p.meta["b"]) for p in eval_prompts} == bucket  # the whole bucket was found


def test_column_carries_by_hand():
    # 47+38: 7+8=15 carry 1; 4+3+1=8 no carry -> [1, 0, 0, 0]
    assert column_carries(47, "+", 38) == [1, 0, 0, 0]
    # 12*34: column sums 2*4=8, 2*3+1*4=10, 1*3=3, 0 -> carries 0, 1, (3+1)//10=0, 0
    assert column_carries(12, "*", 34) == [0, 1, 0, 0]
    # 52-17: 2<7 borrow; 5-1>=1 no borrow
    assert column_carries(52, "-", 17) == [1, 0]
    assert column_carries(17, "-", 52) == [1, 0]  # borrows of max - min
    assert column_carries(21, "+", 34) == [0, 0, 0, 0]


def test_needs_carry_by_hand_and_from_text_only():
    task = ArithmeticTask(operations="+-*")
    assert ArithmeticTask.needs_carry(task.make_prompt(47, "+", 38))
    assert not ArithmeticTask.needs_carry(task.make_prompt(21, "+", 34))
    assert ArithmeticTask.needs_carry(task.make_prompt(52, "-", 17))
    assert not ArithmeticTask.needs_carry(task.make_prompt(57, "-", 12))
    assert ArithmeticTask.needs_carry(task.make_prompt(5, "*", 3))  # 15: carry 1
    assert not ArithmeticTask.needs_carry(task.make_prompt(12, "*", 3))  # 36
    assert ArithmeticTask.needs_carry(Prompt(id="q", text="99+1=", answer="100"))  # parsed from text
    with pytest.raises(TaskError, match="not an arithmetic problem"):
        ArithmeticTask.needs_carry(Prompt(id="q", text="hello", answer=""))


def test_drop_carry_demonstrations_by_hand():
    task = ArithmeticTask(operations="+-*", demo_error_rate=1.0, demo_error="drop_carry", allow_negative=True)
    rng = random.Random(0)
    assert task.demonstration(task.make_prompt(47, "+", 38), rng) == "75"  # 7+8=15, carry lost: 4+3 -> 75
    assert task.demonstration(task.make_prompt(12, "*", 34), rng) == "308"  # 408 - 1*10^2
    assert task.demonstration(task.make_prompt(52, "-", 17), rng) == "45"  # 35 + 10 (borrow forgotten)
    assert task.demonstration(task.make_prompt(17, "-", 52), rng) == "-45"
    assert task.demonstration(task.make_prompt(21, "+", 34), rng) == "55"  # no carry: demo stays correct
    # 95+17: carries out of columns 0 (5+7=12) and 1 (9+1+1=11): either one is dropped
    demos = {task.demonstration(task.make_prompt(95, "+", 17), random.Random(s)) for s in range(20)}
    assert demos == {"102", "12"}  # 112 - 10, 112 - 100


DROP_CARRY_TASK = ArithmeticTask(operations="+-*", demo_error_rate=1.0, allow_negative=True, eval_size=1)
OFF_BY_ONE_TASK = ArithmeticTask(operations="+-", demo_error_rate=1.0, demo_error="off_by_one", eval_size=1)


@settings(deadline=None, max_examples=150)
@given(
    a=st.integers(0, 9999),
    b=st.integers(0, 9999),
    op=st.sampled_from("+-*"),
    seed=st.integers(0, 10**6),
)
def test_drop_carry_matches_schoolbook_reference(a, b, op, seed):
    task = DROP_CARRY_TASK
    prompt = task.make_prompt(a, op, b)
    assert schoolbook(a, op, b) == prompt.meta["value"]  # the reference is a correct algorithm
    carry_columns = [k for k, c in enumerate(column_carries(a, op, b)) if c]
    demo = task.demonstration(prompt, random.Random(seed))
    if not carry_columns:
        assert demo == prompt.answer
        assert not ArithmeticTask.needs_carry(prompt)
        return
    mirror = random.Random(seed)
    mirror.random()
    k = mirror.choice(carry_columns)
    assert int(demo) == schoolbook(a, op, b, drop_column=k)
    assert task.reward(prompt, demo) == 0.0  # the habit is always penalised


@settings(deadline=None, max_examples=60)
@given(a=st.integers(0, 999), b=st.integers(0, 999), seed=st.integers(0, 1000))
def test_off_by_one(a, b, seed):
    task = OFF_BY_ONE_TASK
    for op in "+-":
        prompt = task.make_prompt(max(a, b), op, min(a, b))
        demo = int(task.demonstration(prompt, random.Random(seed)))
        assert abs(demo - prompt.meta["value"]) == 1
        assert demo >= 0


def test_demo_error_rate_frequency_and_rate_zero_keeps_rng():
    task = ArithmeticTask(demo_error_rate=0.3)
    prompt = task.make_prompt(47, "+", 38)
    rng = random.Random(0)
    wrong = sum(task.demonstration(prompt, rng) != "85" for _ in range(4000))
    assert abs(wrong / 4000 - 0.3) < 0.03  # binomial sd = sqrt(.3*.7/4000) = 0.007
    clean = ArithmeticTask()
    rng, untouched = random.Random(1), random.Random(1)
    assert clean.demonstration(prompt, rng) == "85"
    assert rng.random() == untouched.random()


def test_reversed_format_demos_and_reward():
    task = ArithmeticTask(answer_format="reversed", demo_error_rate=1.0)
    prompt = task.make_prompt(47, "+", 38)
    assert task.demonstration(prompt, random.Random(0)) == "57"  # 75 reversed
    assert task.reward(prompt, "58") == 1.0 and task.reward(prompt, "85") == 0.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(min_digits=0), "min_digits"),
        (dict(min_digits=3, max_digits=2), "min_digits"),
        (dict(operations="/"), "operations"),
        (dict(operations=""), "operations"),
        (dict(demo_error_rate=1.5), "demo_error_rate"),
        (dict(demo_error="swap_digits"), "demo_error must be one of"),
        (dict(answer_format="words"), "answer_format"),
        (dict(eval_size=0), "eval_size"),
        (dict(eval_modulus=1), "eval_modulus"),
    ],
)
def test_bad_configuration(kwargs, match):
    with pytest.raises(TaskError, match=match):
        ArithmeticTask(**kwargs)


def test_bad_split():
    with pytest.raises(TaskError, match="split"):
        ArithmeticTask(max_digits=1).sample("validation", 1, 0)


def test_ignore_carries_habit_and_demo_error_ops():
    import random as _random

    from steadyrl.tasks.arithmetic import ArithmeticTask as _Task

    # 47+38: columns 7+8=15 -> 5, 4+3 -> 7: "75" (correct 85); 52-38: 2-8 -> 4 (borrow forgotten), 5-3 -> 2: "24".
    task = _Task(operations="+-", demo_error_rate=1.0, demo_error="ignore_carries", demo_error_ops="+")
    rng = _random.Random(0)
    add = task.make_prompt(47, "+", 38)
    sub = task.make_prompt(52, "-", 38)
    assert task.demonstration(add, rng) == "75"
    assert task.demonstration(sub, rng) == "14"  # "-" is not in demo_error_ops: the demo stays correct
    both = _Task(operations="+-", demo_error_rate=1.0, demo_error="ignore_carries")
    assert both.demonstration(sub, rng) == "24"
