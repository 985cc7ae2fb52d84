"""ReasoningGymTask on the installed basic_arithmetic and chain_sum datasets (no downloads).

Run: .venv/bin/python -m pytest -q tests/tasks/test_tasks_reasoning_gym.py
"""

from __future__ import annotations

import random
import sys

import pytest

from extras import needs_tasks_extra_gym
from steadyrl.tasks import Prompt, ReasoningGymTask, TaskError


@pytest.fixture(scope="module", params=["basic_arithmetic", "chain_sum"])
def task(request):
    return ReasoningGymTask(request.param, size=60, eval_size=20, seed=0)


@needs_tasks_extra_gym
def test_prompts_and_disjoint_eval(task):
    eval_prompts = task.eval_prompts()
    assert len(eval_prompts) == 20
    assert task.name == f"reasoning_gym/{task.dataset_name}"
    train = task.sample("train", 60, seed=0)
    assert len(train) == 60
    assert not {p.text for p in eval_prompts} & {p.text for p in train}
    assert len(task._train) + task.num_dropped_duplicates == 60
    first = eval_prompts[0]
    assert first.text == first.meta["entry"]["question"] + "\nAnswer: "
    assert first.answer == str(first.meta["entry"]["answer"])
    assert first.id == f"{task.dataset_name}/eval/0"
    assert task.sample("train", 5, seed=2) == task.sample("train", 5, seed=2)
    assert set(task.sample("eval", 30, seed=1)) <= set(eval_prompts)


@needs_tasks_extra_gym
def test_reward_and_demonstration(task):
    prompt = task.sample("train", 1, seed=0)[0]
    demo = task.demonstration(prompt, random.Random(0))
    assert demo == f"<answer>{prompt.answer}</answer>"
    assert task.reward(prompt, demo) == 1.0
    assert task.reward(prompt, f"Let me think. 1+1=2.\n<answer> {prompt.answer} </answer>") == 1.0
    assert task.reward(prompt, prompt.answer) == 0.0  # no tag -> nothing extracted
    wrong = prompt.answer + "1"
    # reasoning-gym gives partial credit to numerically close answers, so a near miss only scores < 1
    assert task.reward(prompt, f"<answer>{wrong}</answer>") < 1.0
    assert task.reward(prompt, "<answer>banana</answer>") == 0.0
    # the last tag counts
    assert task.reward(prompt, f"<answer>{wrong}</answer> no wait <answer>{prompt.answer}</answer>") == 1.0


@needs_tasks_extra_gym
def test_reward_via_id_when_meta_is_lost(task):
    prompt = task.eval_prompts()[3]
    bare = Prompt(id=prompt.id, text=prompt.text, answer=prompt.answer)
    assert task.reward(bare, f"<answer>{prompt.answer}</answer>") == 1.0
    with pytest.raises(TaskError, match="does not come from this task"):
        task.reward(Prompt(id="other/0", text="?", answer="1"), "<answer>1</answer>")


@needs_tasks_extra_gym
def test_no_answer_tag_and_template():
    task = ReasoningGymTask(
        "chain_sum", size=10, eval_size=5, answer_tag=None, prompt_template="Q: {question}\nA:"
    )
    prompt = task.eval_prompts()[0]
    assert prompt.text.startswith("Q: ") and prompt.text.endswith("\nA:")
    assert task.demonstration(prompt, random.Random(0)) == prompt.answer
    assert task.reward(prompt, f"  {prompt.answer}\n") == 1.0


@needs_tasks_extra_gym
def test_config_is_passed_and_seeds_differ():
    task = ReasoningGymTask(
        "chain_sum", size=20, eval_size=10, seed=3, config={"min_terms": 2, "max_terms": 2}
    )
    for prompt in task.eval_prompts() + task._train:
        assert prompt.meta["entry"]["metadata"]["num_terms"] == 2
    other = ReasoningGymTask(
        "chain_sum", size=20, eval_size=10, seed=4, config={"min_terms": 2, "max_terms": 2}
    )
    assert [p.text for p in other.eval_prompts()] != [p.text for p in task.eval_prompts()]


@needs_tasks_extra_gym
def test_duplicates_with_eval_are_dropped():
    # one-digit two-term sums: a small space, so train and eval overlap and must be de-duplicated
    config = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}
    task = ReasoningGymTask("chain_sum", size=300, eval_size=50, config=config)
    assert task.num_dropped_duplicates > 0
    assert not {p.text for p in task.eval_prompts()} & {p.text for p in task._train}


@needs_tasks_extra_gym
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            dict(dataset="no_such_dataset"),
            r"unknown reasoning-gym dataset 'no_such_dataset'; valid names: \[.*'chain_sum'",
        ),
        (dict(dataset="chain_sum", config={"bogus": 1}), r"valid keys: \[.*'max_terms'"),
        (dict(dataset="chain_sum", config={"min_terms": 5, "max_terms": 2}), "bad config"),
        (dict(dataset="chain_sum", config={"seed": 1}), "not in `config`"),
        (dict(dataset="chain_sum", prompt_template="no placeholder"), "prompt_template"),
        (dict(dataset="chain_sum", size=0), "size"),
    ],
)
def test_bad_configuration(kwargs, match):
    dataset = kwargs.pop("dataset")
    with pytest.raises(TaskError, match=match):
        ReasoningGymTask(dataset, size=kwargs.pop("size", 10), eval_size=5, **kwargs)


def test_missing_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "reasoning_gym", None)  # makes `import reasoning_gym` fail
    with pytest.raises(TaskError, match=r"pip install 'steadyrl\[tasks\]'"):
        ReasoningGymTask("chain_sum")
