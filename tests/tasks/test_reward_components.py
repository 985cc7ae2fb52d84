"""Named reward components (tasks/base.py): a task's reward may be a mapping of named numbers; their sum is the
reward, and the components (``TaskScores.components``, as a batch-scoring task returns them too) reach the
estimators registered with ``reads_components`` (GDPO) as (B, K) columns, end to end.

    .venv/bin/python -m pytest -q tests/tasks/test_reward_components.py
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from steadyrl import registry
from steadyrl.ops.advantages_multi import gdpo_advantages
from steadyrl.tasks import ArithmeticTask, Prompt, RewardError, TaskScores, score_batch, score_completions
from steadyrl.train.trainer import Trainer

P = Prompt("p", "1+1=", "2")


class Components:
    """reward(completion) = the mapping the completion names in TABLE."""

    name = "components"
    TABLE = {
        "both": {"correct": 1.0, "format": 0.5},
        "format": {"correct": 0.0, "format": 0.5},
        "none": {"correct": 0.0, "format": 0.0},
        "half_missing": {"correct": None, "format": 0.5},
        "all_missing": {"correct": float("nan"), "format": None},
        "other_order": {"format": 0.5, "correct": 1.0},
        "extra": {"correct": 1.0, "format": 0.5, "length": 1.0},
        "number": 1.0,
        "infinite": {"correct": math.inf, "format": 0.0},
    }

    def __init__(self, declared=None):
        if declared is not None:
            self.reward_components = declared

    def reward(self, prompt, completion):
        return self.TABLE[completion]


def _columns(scores: TaskScores) -> torch.Tensor:
    return torch.stack(list(scores.components.values()), dim=1)


def test_components_are_columns_and_their_sum_is_the_reward():
    completions = ["other_order", "format", "none", "half_missing", "all_missing", "both"]
    scores = score_batch(Components(), [P] * 6, completions)
    assert tuple(scores.components) == ("correct", "format")  # sorted names (the first mapping's order is not used)
    nan = math.nan
    expected = torch.tensor([[1, 0.5], [0, 0.5], [0, 0], [nan, 0.5], [nan, nan], [1, 0.5]])
    torch.testing.assert_close(_columns(scores), expected, equal_nan=True)
    # sum of the present components; NaN only when every one is missing
    torch.testing.assert_close(scores.rewards, torch.tensor([1.5, 0.5, 0.0, 0.5, nan, 1.5]), equal_nan=True)
    torch.testing.assert_close(score_completions(Components(), [P] * 6, completions), scores.rewards, equal_nan=True)
    # logged as the batch scorer of the python task logs them: mean over the scored completions
    assert scores.metrics["reward/correct_mean"].item() == pytest.approx(0.5)  # (1 + 0 + 0 + 1) / 4
    assert scores.metrics["reward/format_mean"].item() == pytest.approx(0.4)  # (0.5 · 4) / 5


def test_a_declared_order_sets_the_columns():
    scores = score_batch(Components(declared=("format", "correct")), [P, P], ["both", "none"])
    assert tuple(scores.components) == ("format", "correct")
    torch.testing.assert_close(_columns(scores), torch.tensor([[0.5, 1.0], [0.0, 0.0]]))


def test_plain_numbers_have_no_components():
    scores = score_batch(Components(), [P, P], ["number", "number"])
    assert scores.components == {} and scores.metrics == {}
    torch.testing.assert_close(scores.rewards, torch.ones(2))


@pytest.mark.parametrize(
    ("completions", "match"),
    [
        (["both", "extra"], "expected \\['correct', 'format'\\]"),
        (["both", "number"], "return one kind for every completion"),
        (["number", "both"], "return one kind for every completion"),
        (["infinite"], "component 'correct'"),
    ],
)
def test_inconsistent_components_fail_with_the_fix(completions, match):
    with pytest.raises(RewardError, match=match):
        score_batch(Components(), [P] * len(completions), completions)


def test_arithmetic_format_component():
    task = ArithmeticTask(format_reward=0.1)
    prompt = task.sample("train", 1, seed=3)[0]
    assert task.reward_components == ("correct", "format")
    assert task.reward(prompt, prompt.answer) == {"correct": 1.0, "format": 0.1}
    assert task.reward(prompt, "1" + prompt.answer + " x") == {"correct": 0.0, "format": 0.1}  # well formed, wrong
    assert task.reward(prompt, "0" + prompt.answer) == {"correct": 0.0, "format": 0.0}  # leading zero
    assert task.reward(prompt, "") == {"correct": 0.0, "format": 0.0}
    assert ArithmeticTask().reward(prompt, prompt.answer) == 1.0  # no components by default
    assert ArithmeticTask(answer_format="reversed", format_reward=0.1).reward(prompt, "01")["format"] == 0.1
    with pytest.raises(Exception, match="format_reward must be in"):
        ArithmeticTask(format_reward=1.0)


class _Sevens:
    """Two components any random policy scores on: share of '7's and of '1's (tests/sevens_task.py style)."""

    name = "sevens2"
    reward_components = ("sevens", "ones")

    def sample(self, split, n, seed):
        rng = random.Random(seed)
        return [Prompt(f"{split}-{seed}-{i}", f"{rng.randint(0, 99)}+{rng.randint(0, 99)}=", "7") for i in range(n)]

    def eval_prompts(self):
        return self.sample("eval", 4, 0)

    def reward(self, prompt, completion):
        n = max(1, len(completion))
        return {"sevens": completion.count("7") / n, "ones": completion.count("1") / n}

    def demonstration(self, prompt, rng):
        return "7"


def test_gdpo_reads_the_components_in_the_trainer(tiny_config):
    assert registry.lookup("advantage", "gdpo").reads_components
    trainer = Trainer(tiny_config("advantage={name: gdpo, weights: [1.0, 0.5]}", "rollout.temperature=2.0"), task=_Sevens())
    collected = trainer.collector.collect(1)
    batch = collected.batch
    texts = collected.completions
    columns = torch.tensor([[t.count("7") / max(1, len(t)), t.count("1") / max(1, len(t))] for t in texts])
    torch.testing.assert_close(batch.rewards, columns.sum(1))
    expected = gdpo_advantages(columns, 4, weights=[1.0, 0.5]).advantages
    assert expected.abs().sum() > 0
    torch.testing.assert_close(batch.advantages[:, 0], expected)
    assert {"reward/sevens_mean", "reward/ones_mean"} <= set(collected.metrics)
    assert set(collected.reward_components) == {"sevens", "ones"}
    # with the summed reward the estimate differs: the components are what reached GDPO
    assert not torch.allclose(gdpo_advantages(columns.sum(1), 4).advantages, expected)


def test_gdpo_weights_must_match_the_declared_components(tiny_config):
    with pytest.raises(Exception, match="one weight per component"):
        Trainer(tiny_config("advantage={name: gdpo, weights: [1.0]}"), task=_Sevens())
