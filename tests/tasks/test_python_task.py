"""The python task: a reward function from a file, data with field mapping, safeguards, named rewards, the pool.

Run: .venv/bin/python -m pytest -q tests/tasks/test_python_task.py
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from steadyrl.registry import build_task
from steadyrl.tasks import PythonRewardTask, RewardError, Task, TaskError, score_batch

REWARDS = '''
import time

def graded(record, completion, exact_bonus=1.0):
    """0.5 for mentioning the answer, + exact_bonus when the completion is exactly it."""
    if completion == "unscorable":
        return None
    if completion == "raise":
        return {}["missing"]
    if completion == "text":
        return "high"
    if completion == "sleep":
        time.sleep(30)
    answer = record["answer"]
    return 0.5 * (answer in completion) + exact_bonus * (completion == answer)

def named(record, completion):
    if completion == "half-missing":
        return {"correct": 1.0, "format": None}
    if completion == "renamed":
        return {"correct": 1.0, "style": 1.0}
    if completion == "number":
        return 1.0
    return {"correct": float(completion == record["answer"]), "format": float(completion.isdigit())}

def echo_record(record, completion):
    return {"level": float(record["level"]), "has_reference": float("reference" in record)}
'''

ROWS = [
    {"uid": f"q{i}", "question": f"What is {i} + {i}?", "solution": str(2 * i), "level": i % 3, "worked": f"{i}+{i}={2 * i}"}
    for i in range(10)
]


@pytest.fixture
def files(tmp_path):
    (tmp_path / "rewards.py").write_text(REWARDS)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return tmp_path


def make(files, reward="graded", **kwargs):
    options = dict(prompt_field="question", answer_field="solution", id_field="uid")
    options.update(kwargs)
    return PythonRewardTask(f"{files / 'rewards.py'}:{reward}", str(files / "train.jsonl"), **options)


def test_prompts_fields_and_held_out_split(files):
    task = make(files, prompt_template="Q: {prompt}\nA:", eval_split=0.2, seed=3)
    assert isinstance(task, Task)
    eval_prompts = task.eval_prompts()
    assert len(eval_prompts) == 2
    train_ids = {p.id for p in task.sample("train", 100, seed=0)}
    assert len(train_ids) == 8 and not train_ids & {p.id for p in eval_prompts}
    prompt = eval_prompts[0]
    row = next(r for r in ROWS if r["uid"] == prompt.id)
    assert prompt.text == f"Q: {row['question']}\nA:" and prompt.answer == row["solution"]
    # the record keeps every field of the row and adds id / prompt / answer
    assert prompt.meta == {**row, "id": row["uid"], "prompt": prompt.text, "answer": row["solution"]}
    assert task.sample("train", 5, seed=7) == task.sample("train", 5, seed=7)
    assert make(files, prompt_template="Q: {prompt}\nA:", eval_split=0.2, seed=3).eval_prompts() == eval_prompts


def test_rewards_with_kwargs_none_and_nan(files):
    task = make(files, reward_kwargs={"exact_bonus": 2.0})
    prompt = task.eval_prompts()[0]
    scores = score_batch(task, [prompt] * 4, [prompt.answer, f"it is {prompt.answer}", "no", "unscorable"])
    # exact: 0.5 (mentions) + 2.0 (exact); mentions only: 0.5; wrong: 0; None: NaN (masked, counted)
    torch.testing.assert_close(scores.rewards, torch.tensor([2.5, 0.5, 0.0, math.nan]), equal_nan=True)
    assert scores.components == {} and "reward/timeout_frac" not in scores.metrics
    assert task.reward(prompt, prompt.answer) == 2.5


def test_a_raising_reward_names_the_prompt_and_the_line(files):
    task = make(files)
    prompt = task.eval_prompts()[0]
    with pytest.raises(RewardError) as error:
        task.score([prompt], ["raise"])
    message = str(error.value)
    assert "\n" not in message
    assert f"prompt id {prompt.id!r}" in message and "completion 'raise'" in message
    assert "raised KeyError: 'missing' at " in message and "rewards.py:9 in graded" in message
    with pytest.raises(RewardError, match=r"returned 'high' \(str\) for task 'python', prompt id"):
        task.score([prompt], ["text"])


def test_named_rewards_are_summed_with_weights_and_kept(files):
    task = make(files, reward="named", reward_weights={"correct": 1.0, "format": 0.25})
    prompt = task.eval_prompts()[0]
    scores = task.score([prompt] * 3, [prompt.answer, "x", "half-missing"])
    # r = 1·correct + 0.25·format: exact digits 1 + 0.25; "x" 0 + 0; a missing component makes r missing
    torch.testing.assert_close(scores.rewards, torch.tensor([1.25, 0.0, math.nan]), equal_nan=True)
    torch.testing.assert_close(scores.components["correct"], torch.tensor([1.0, 0.0, 1.0]))
    torch.testing.assert_close(scores.components["format"], torch.tensor([1.0, 0.0, math.nan]), equal_nan=True)
    torch.testing.assert_close(scores.metrics["reward/correct_mean"], torch.tensor(2 / 3))
    torch.testing.assert_close(scores.metrics["reward/format_mean"], torch.tensor(0.5))  # over scorable ones


def test_named_rewards_default_to_weight_one_and_must_keep_their_names(files):
    task = make(files, reward="named")
    prompt = task.eval_prompts()[0]
    scores = task.score([prompt], [prompt.answer])
    assert scores.rewards.tolist() == [2.0] and list(scores.components) == ["correct", "format"]  # sorted names
    weighted = make(files, reward="named", reward_weights={"format": 0.5, "correct": 1.0})
    assert list(weighted.score([prompt], ["x"]).components) == ["format", "correct"]  # reward_weights' order
    with pytest.raises(RewardError, match=r"returned the rewards \['correct', 'style'\] .* \['correct', 'format'\]"):
        task.score([prompt], ["renamed"])  # a later batch with other names
    with pytest.raises(RewardError, match="returned one number .* named rewards are expected"):
        task.score([prompt], ["number"])
    weighted = make(files, reward="graded", reward_weights={"correct": 1.0})
    with pytest.raises(RewardError, match="named rewards are expected"):
        weighted.score([prompt], ["x"])


def test_the_record_carries_every_field(files):
    task = make(files, reward="echo_record", reference_field="worked")
    prompt = task.eval_prompts()[0]
    scores = task.score([prompt], ["anything"])
    row = next(r for r in ROWS if r["uid"] == prompt.id)
    assert scores.components["level"].item() == row["level"] and scores.components["has_reference"].item() == 1.0
    assert task.demonstration(prompt, None) == row["worked"]


def test_pool_gives_the_same_rewards_and_counts_timeouts(files):
    in_process = make(files)
    pooled = make(files, workers=2, timeout_s=1.0)
    prompts = in_process.sample("train", 6, seed=0)
    completions = [p.answer if i % 2 else "wrong" for i, p in enumerate(prompts)]
    try:
        assert torch.equal(pooled.score(prompts, completions).rewards, in_process.score(prompts, completions).rewards)
        timed = pooled.score(prompts[:4], ["sleep", prompts[1].answer, "sleep", "no"])
        torch.testing.assert_close(timed.rewards, torch.tensor([math.nan, 1.5, math.nan, 0.0]), equal_nan=True)
        assert timed.metrics["reward/timeout_frac"].item() == 0.5
        with pytest.raises(RewardError, match="raised KeyError"):
            pooled.score(prompts[:1], ["raise"])
    finally:
        pooled.close()


def test_conversational_prompts_are_kept_as_messages(files):
    rows = [{"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"{i}+{i}?"}], "answer": str(2 * i)} for i in range(4)]
    (files / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = PythonRewardTask(f"{files / 'rewards.py'}:graded", str(files / "chat.jsonl"), eval_split=0.25)
    prompt = task.eval_prompts()[0]
    assert prompt.meta["messages"][0] == {"role": "system", "content": "Be brief."}
    assert prompt.text == prompt.meta["messages"][1]["content"]
    assert task.score([prompt], [prompt.answer]).rewards.item() == 1.5


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"timeout_s": 5}, "timeout_s needs workers >= 1"),
        ({"workers": -1}, "workers must be an integer >= 0"),
        ({"workers": 1, "timeout_s": -2}, "timeout_s must be a number of seconds > 0"),
        ({"prompt_template": "Q:"}, "prompt_template must contain"),
        ({"reward_weights": {"a": "x"}}, "reward_weights must map"),
        ({"prompt_field": "text"}, r"has no field 'text'; its fields are \['level', 'question'"),
        ({"eval_split": 1.5}, r"in \(0, 1\)"),
        ({"reward_kwargs": {"tolerance": 0.1}}, r"cannot be called as reward\(record, completion, tolerance=...\)"),
    ],
)
def test_bad_options_fail_before_anything_runs(files, kwargs, message):
    with pytest.raises(TaskError, match=message):
        make(files, **kwargs)


def test_a_reward_that_cannot_reach_a_worker(files):
    def local_reward(record, completion):
        return 0.0

    with pytest.raises(TaskError, match="cannot be imported by name in a worker process"):
        PythonRewardTask(local_reward, str(files / "train.jsonl"), prompt_field="question", workers=1)
    task = PythonRewardTask(local_reward, str(files / "train.jsonl"), prompt_field="question", answer_field=None)
    assert task.score(task.eval_prompts()[:1], ["x"]).rewards.tolist() == [0.0]
    with pytest.raises(TaskError, match="has no demonstration"):
        task.demonstration(task.eval_prompts()[0], None)


def test_build_task_from_config_kwargs(files):
    task = build_task(
        "python",
        reward=f"{files / 'rewards.py'}:graded",
        data=str(files / "train.jsonl"),
        prompt_field="question",
        answer_field="solution",
    )
    assert isinstance(task, PythonRewardTask) and len(task.eval_prompts()) == 1
    with pytest.raises(TaskError, match=r"task 'python' needs 'reward', 'data'"):
        build_task("python")
