"""JsonlMathTask: reading and validating JSONL, splits, extraction, math-verify reward.

Run: .venv/bin/python -m pytest -q tests/tasks/test_tasks_jsonl_math.py
"""

from __future__ import annotations

import json
import random
import re
import sys

import pytest

from extras import needs_tasks_extra_math
from steadyrl.tasks import JsonlMathTask, Prompt, TaskError, write_sample_math_jsonl
from steadyrl.tasks.jsonl_math import last_boxed, last_number


@pytest.fixture(scope="module")
def sample_path(tmp_path_factory):
    return write_sample_math_jsonl(tmp_path_factory.mktemp("math") / "sample.jsonl", n=20, seed=0)


@pytest.fixture(scope="module")
def task(sample_path):
    return JsonlMathTask(sample_path)


def half() -> Prompt:
    return Prompt(id="h", text="?", answer="\\frac{1}{2}")


def test_sample_file(sample_path):
    rows = [json.loads(line) for line in sample_path.read_text().splitlines()]
    assert len(rows) == 20
    assert all(set(row) == {"id", "question", "answer"} for row in rows)
    assert rows[0]["id"] == "sample-0"
    assert sample_path.read_text() == write_sample_math_jsonl(sample_path.parent / "again.jsonl").read_text()
    # every generated answer is what the question asks for; spot-check the arithmetic of each kind
    for row in rows:
        numbers = [int(word) for word in re.findall(r"\d+", row["question"])]
        if "gets" in row["question"]:
            assert int(row["answer"]) == numbers[0] + numbers[1]
        elif "gives away" in row["question"]:
            assert int(row["answer"]) == numbers[0] - numbers[1]
        elif "boxes" in row["question"]:
            assert int(row["answer"]) == numbers[0] * numbers[1]
        elif "shares" in row["question"]:
            assert int(row["answer"]) == numbers[0] // numbers[1] and numbers[0] % numbers[1] == 0
        else:
            assert row["answer"] == "\\frac{1}{2}" and numbers[1] == 2 * numbers[0]


@needs_tasks_extra_math
def test_split_sizes_disjoint_and_deterministic(task, sample_path):
    eval_prompts = task.eval_prompts()
    assert len(eval_prompts) == 2  # round(0.1 * 20)
    train = task.sample("train", 18, seed=0)
    assert len(set(train)) == 18  # without replacement while n <= pool
    assert not set(eval_prompts) & set(train)
    assert {p.id for p in eval_prompts + train} == {f"sample-{i}" for i in range(20)}
    assert JsonlMathTask(sample_path).eval_prompts() == eval_prompts
    assert JsonlMathTask(sample_path, seed=1).eval_prompts() != eval_prompts
    assert task.sample("train", 5, seed=9) == task.sample("train", 5, seed=9)
    first = next(p for p in train if p.id == "sample-0")
    assert first.text == json.loads(sample_path.read_text().splitlines()[0])["question"] + "\n"


@needs_tasks_extra_math
@pytest.mark.parametrize(
    "completion, expected",
    [
        ("So the total is \\boxed{10}.", 1.0),
        ("So the total is \\boxed{11}.", 0.0),
        ("First 5 then \\boxed{9}, wait, \\boxed{10}", 1.0),  # the last box counts
        ("\\boxed{10} and then 11", 1.0),  # a box wins over a later bare number
        ("The answer is 10.", 1.0),  # no box: the last number
        ("I get 1,0 hmm 10", 1.0),
        ("no idea", 0.0),
        ("\\boxed{10", 1.0),  # cut off inside the box: no box, so the last number 10 is used
    ],
)
def test_reward_on_integer_answer(task, completion, expected):
    prompt = Prompt(id="t", text="?", answer="10")
    assert task.reward(prompt, completion) == expected


@needs_tasks_extra_math
def test_fractions_and_decimals_per_math_verify(task):
    # math-verify treats \frac{1}{2} and 0.5 as the same number, in both directions
    assert task.reward(half(), "\\boxed{0.5}") == 1.0
    assert task.reward(half(), "\\boxed{\\frac{1}{2}}") == 1.0
    assert task.reward(half(), "it is 1/2") == 1.0
    assert task.reward(half(), "\\boxed{\\frac{1}{3}}") == 0.0
    assert task.reward(Prompt(id="d", text="?", answer="0.5"), "\\boxed{\\frac{1}{2}}") == 1.0
    assert task.reward(Prompt(id="c", text="?", answer="1000"), "that is 1,000 coins") == 1.0


@needs_tasks_extra_math
def test_demonstration_scores_one(task):
    for prompt in task.eval_prompts() + task.sample("train", 18, seed=0):
        demo = task.demonstration(prompt, random.Random(0))
        assert demo.startswith("The answer is \\boxed{")
        assert task.reward(prompt, demo) == 1.0


@needs_tasks_extra_math
def test_extraction_modes(sample_path):
    boxed_only = JsonlMathTask(sample_path, answer_extraction="boxed")
    prompt = Prompt(id="t", text="?", answer="10")
    assert boxed_only.reward(prompt, "The answer is 10.") == 0.0
    assert boxed_only.reward(prompt, "\\boxed{10}") == 1.0
    whole = JsonlMathTask(sample_path, answer_extraction="math_verify")
    assert whole.extract("x = 10") == "x = 10"
    assert whole.reward(prompt, "$10$") == 1.0


def test_helpers_by_hand():
    assert last_boxed("a \\boxed{1} b \\boxed{\\frac{2}{3}} c") == "\\frac{2}{3}"
    assert last_boxed("\\fbox{7}") == "7"
    assert last_boxed("no box") is None
    assert last_boxed("\\boxed{unclosed") is None
    assert last_number("3 apples, 4.5 pears, -2 plums") == "-2"
    assert last_number("total 1,234,567 ok") == "1234567"
    assert last_number("ratio 3 / 4") == "3/4"
    assert last_number("none") is None


@needs_tasks_extra_math
def test_eval_path_and_custom_fields(tmp_path):
    train_path, eval_path = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train_path.write_text(
        '{"problem": "1+1?", "solution": "2"}\n\n{"problem": "2+2?", "solution": "4"}\n'
        '{"problem": "3+3?", "solution": "6"}\n'
    )
    eval_path.write_text('{"problem": "3+3?", "solution": "6"}\n')
    task = JsonlMathTask(
        train_path,
        eval_path=eval_path,
        question_field="problem",
        answer_field="solution",
        prompt_template="Q: {question} A:",
    )
    assert [p.id for p in task.eval_prompts()] == ["eval.jsonl:1"]
    # "3+3?" is in eval, so it is dropped from train; ids fall back to file:line (blank line 2 skipped)
    assert sorted(p.id for p in task._train) == ["train.jsonl:1", "train.jsonl:3"]
    assert task.eval_prompts()[0].text == "Q: 3+3? A:"


@needs_tasks_extra_math
def test_file_errors(tmp_path):
    with pytest.raises(TaskError, match="does not exist"):
        JsonlMathTask(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "a", "answer": "1"}\n{"question": "b", "answer": \n')
    with pytest.raises(TaskError, match="bad.jsonl line 2 is not valid JSON"):
        JsonlMathTask(bad)
    no_field = tmp_path / "no_field.jsonl"
    no_field.write_text('{"question": "a", "answer": "1"}\n{"problem": "b", "solution": "2"}\n')
    with pytest.raises(
        TaskError, match=r"line 2 has no field 'question'; its keys are \['problem', 'solution'\]"
    ):
        JsonlMathTask(no_field)
    array = tmp_path / "array.jsonl"
    array.write_text("[1, 2]\n")
    with pytest.raises(TaskError, match="line 1 is a JSON list, not an object"):
        JsonlMathTask(array)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(TaskError, match="has no rows"):
        JsonlMathTask(empty)
    one = tmp_path / "one.jsonl"
    one.write_text('{"question": "a", "answer": "1"}\n')
    with pytest.raises(TaskError, match="at least 2"):
        JsonlMathTask(one)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(answer_extraction="regex"), "answer_extraction"),
        (dict(prompt_template="no placeholder"), "prompt_template"),
        (dict(eval_fraction=0.0), "eval_fraction"),
    ],
)
def test_bad_options(sample_path, kwargs, match):
    with pytest.raises(TaskError, match=match):
        JsonlMathTask(sample_path, **kwargs)


@needs_tasks_extra_math
def test_unparsable_gold_answer(task):
    with pytest.raises(TaskError, match="cannot parse the gold answer"):
        task.reward(Prompt(id="g", text="?", answer="???"), "\\boxed{1}")


@needs_tasks_extra_math
def test_gold_is_read_as_one_expression(task):
    # a bare math_verify.parse("3\\sqrt{2}") extracts 3; the task boxes the gold so 3 is not accepted
    root = Prompt(id="r", text="?", answer="3\\sqrt{2}")
    assert task.reward(root, "\\boxed{3\\sqrt{2}}") == 1.0
    assert task.reward(root, "\\boxed{3}") == 0.0


def test_missing_package_names_the_extra(monkeypatch, sample_path):
    monkeypatch.setitem(sys.modules, "math_verify", None)
    with pytest.raises(TaskError, match=r"pip install 'steadyrl\[tasks\]'"):
        JsonlMathTask(sample_path)
