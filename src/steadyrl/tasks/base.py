"""The Task protocol: prompts with gold answers, a verifiable reward, and SFT demonstrations.

A task owns its data and its reward (as in nanochat's ``tasks/``): the trainer asks for prompts, decodes the
completions, and calls :func:`score_completions`, which turns the task's per-completion rewards into one
float tensor and makes every failure loud:

  * ``None`` or NaN from ``task.reward`` means "could not score this one"; it becomes NaN in the tensor and
    the trainer counts and masks it (``AdvantageResult.sample_mask``), it is never silently treated as 0;
  * a reward function that raises, or returns something that is not a finite number, stops the run with a
    :class:`RewardError` naming the prompt, the completion and the original exception.

Named reward components (GDPO, arXiv 2601.05242) come two ways, both as :class:`TaskScores` ``components``
(name -> (B,)) from :func:`score_batch`: a task with a batch scorer ``task.score(prompts, completions)``
returns them itself (the python task), or ``task.reward`` returns a mapping of named numbers per completion,
e.g. ``{"correct": 1.0, "format": 0.1}``. In the second case the reward is the sum of the present components
(NaN only when every one is missing), and the components keep the order of the task's optional
``reward_components`` tuple, else their sorted names; every mapping of a batch must carry exactly those keys
(a missing component is ``None`` / NaN) and numbers and mappings do not mix in a batch. An advantage
estimator registered with ``reads_components`` (gdpo) receives the components as (B, K) columns in that
order (train/collect.py); everything else sees the reward.
"""

from __future__ import annotations

import json
import math
import numbers
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from steadyrl.config import ConfigError

_COMPLETION_PREVIEW_CHARS = 200


class TaskError(ConfigError):
    """A task is configured wrongly (bad option, missing file, unusable data); the message says what to fix."""


class RewardError(RuntimeError):
    """A reward function raised or returned something that is not a number."""


@dataclass(frozen=True)
class Prompt:
    """One problem. Equality and hashing use ``id`` and ``text`` only (``meta`` is a free-form dict)."""

    id: str
    text: str
    answer: str = field(compare=False)
    meta: dict[str, Any] = field(default_factory=dict, compare=False)


@runtime_checkable
class Task(Protocol):
    """What the trainer needs from a task.

    ``sample`` and ``eval_prompts`` are deterministic; the eval set is held out (no train prompt has the
    same text as an eval prompt).
    """

    name: str

    def sample(self, split: str, n: int, seed: int) -> list[Prompt]:
        """``n`` prompts from ``split`` in {"train", "eval"}, the same list for the same seed."""
        ...

    def eval_prompts(self) -> list[Prompt]:
        """The fixed held-out evaluation set."""
        ...

    def reward(self, prompt: Prompt, completion: str) -> float | None | Mapping[str, float | None]:
        """Reward of ``completion`` (decoded text after the prompt); None / NaN = could not be scored."""
        ...

    def demonstration(self, prompt: Prompt, rng: random.Random) -> str:
        """A completion for SFT warm start (without EOS; the trainer appends the EOS token)."""
        ...


def check_split(split: str) -> None:
    if split not in ("train", "eval"):
        raise TaskError(f"split must be 'train' or 'eval', got {split!r}")


def draw_from_pool(pool: list[Prompt], n: int, seed: int) -> list[Prompt]:
    """``n`` prompts from ``pool``: a seeded shuffle, taken in order, reshuffled for each further pass.

    Without replacement while ``n <= len(pool)``; every prompt appears ⌊n/len⌋ or ⌈n/len⌉ times otherwise.
    """
    if n < 0:
        raise TaskError(f"n must be >= 0, got {n}")
    if not pool:
        raise TaskError("cannot sample from an empty prompt pool")
    rng = random.Random(seed)
    drawn: list[Prompt] = []
    while len(drawn) < n:
        order = list(range(len(pool)))
        rng.shuffle(order)
        drawn.extend(pool[i] for i in order[: n - len(drawn)])
    return drawn


def _preview(text: str) -> str:
    if len(text) <= _COMPLETION_PREVIEW_CHARS:
        return repr(text)
    return repr(text[:_COMPLETION_PREVIEW_CHARS]) + f"... ({len(text)} chars)"


def _as_reward(value: object) -> float | None:
    """The value as a float, NaN for None; None when it is not a number at all."""
    if value is None:
        return math.nan
    if isinstance(value, Tensor):
        return float(value.item()) if value.numel() == 1 and not value.is_complex() else None
    if isinstance(value, numbers.Real):  # bool, int, float, most numpy scalars
        return float(value)
    if (
        getattr(value, "ndim", None) == 0
        and hasattr(value, "__float__")
        and not isinstance(value, (str, bytes))
    ):
        return float(value)  # numpy.bool_ and other 0-d array-likes
    return None


def describe_call(task: Task, prompt: Prompt, completion: str) -> str:
    """"task 'x', prompt id 'p' (text '...'), completion '...'": what a reward error names."""
    return (
        f"task {getattr(task, 'name', type(task).__name__)!r}, prompt id {prompt.id!r} "
        f"(text {_preview(prompt.text)}), completion {_preview(completion)}"
    )


def score_completions(
    task: Task,
    prompts: list[Prompt],
    completions: list[str],
) -> Tensor:  # (B,) float32
    """``task.reward`` of each (prompt, completion) pair as a float32 tensor, NaN where unscorable; for a reward
    of named components, their sum (module docstring).

    Raises:
      RewardError: the reward function raised, or returned a non-number or ±inf.
      ValueError: ``prompts`` and ``completions`` differ in length.
    """
    return _score_each(task, prompts, completions).rewards


def _score_each(task: Task, prompts: list[Prompt], completions: list[str]) -> TaskScores:
    """``task.reward`` per completion: plain numbers, or mappings of named components."""
    if len(prompts) != len(completions):
        raise ValueError(
            f"got {len(prompts)} prompts but {len(completions)} completions; pass one prompt per completion"
        )
    names: tuple[str, ...] | None = tuple(getattr(task, "reward_components", None) or ()) or None
    rows: list[list[float]] = []
    named: bool | None = None
    for prompt, completion in zip(prompts, completions):
        where = describe_call(task, prompt, completion)
        try:
            value = task.reward(prompt, completion)
        except Exception as error:
            raise RewardError(
                f"the reward function raised {type(error).__name__}: {error} -- for {where}. Fix the reward "
                "function (return None or NaN for a completion it cannot score)."
            ) from error
        is_mapping = isinstance(value, Mapping)
        if named is not None and is_mapping != named:
            raise RewardError(
                f"the reward function returned {value!r} for {where} after returning "
                f"{'mappings' if named else 'numbers'} for earlier completions; return one kind for every completion."
            )
        named = is_mapping
        if is_mapping:
            names = names or tuple(sorted(str(k) for k in value))
            if set(map(str, value)) != set(names):
                raise RewardError(
                    f"the reward function returned components {sorted(map(str, value))} for {where}, expected "
                    f"{list(names)}; return every component (None where it cannot be scored)."
                )
            rows.append([_checked_reward(value[name], where, f" (component {name!r})") for name in names])
        else:
            rows.append([_checked_reward(value, where, "")])
    if not named:
        return TaskScores(torch.tensor([r[0] for r in rows], dtype=torch.float32))
    columns = torch.tensor(rows, dtype=torch.float32).reshape(len(rows), len(names))
    missing = torch.isnan(columns)
    total = torch.where(missing, 0.0, columns).sum(dim=1)
    total = torch.where(missing.all(dim=1), torch.full_like(total, math.nan), total)
    components = {name: columns[:, k] for k, name in enumerate(names)}
    return TaskScores(total, components, {f"reward/{name}_mean": c.nanmean() for name, c in components.items()})


def _checked_reward(value: object, where: str, what: str) -> float:
    reward = _as_reward(value)
    if reward is None or math.isinf(reward):
        raise RewardError(
            f"the reward function returned {value!r} ({type(value).__name__}){what} for {where}; fix the reward "
            "function to return a finite float (or None / NaN when the completion cannot be scored)."
        )
    return reward


@dataclass
class TaskScores:
    """The rewards of a batch of completions, as a task with its own batch scorer returns them."""

    rewards: Tensor  # (B,) float32, NaN = could not be scored
    components: dict[str, Tensor] = field(default_factory=dict)
    """Named rewards (B,) float32 of a multi-reward task, whose weighted sum is ``rewards`` (plain sum for
    per-completion mappings), in column order; empty otherwise."""
    metrics: dict[str, Tensor] = field(default_factory=dict)
    """Scalar metrics of the scoring (e.g. ``reward/timeout_frac``), as 0-d tensors."""


def score_batch(task: Task, prompts: list[Prompt], completions: list[str]) -> TaskScores:
    """``task.score(prompts, completions)`` when the task scores whole batches (a worker pool, several named
    rewards), else ``task.reward`` per completion (numbers, or mappings of named components). Both raise
    RewardError for a reward that raised or returned a non-number, and give NaN for an unscorable completion."""
    scorer = getattr(task, "score", None)
    if scorer is None:
        return _score_each(task, prompts, completions)
    if len(prompts) != len(completions):
        raise ValueError(
            f"got {len(prompts)} prompts but {len(completions)} completions; pass one prompt per completion"
        )
    scores = scorer(prompts, completions)
    if scores.rewards.shape != (len(prompts),):
        raise ValueError(
            f"{type(task).__name__}.score returned rewards of shape {tuple(scores.rewards.shape)} for "
            f"{len(prompts)} completions; return one reward per completion"
        )
    return scores


def jsonl_objects(path: Path):
    """(line number, JSON object) of each non-blank line of a JSONL file; a line that is not a JSON object is a
    TaskError naming the file and the line."""
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise TaskError(f"{path} line {line_number} is not valid JSON ({error.msg})") from error
            if not isinstance(row, dict):
                raise TaskError(f"{path} line {line_number} is a JSON {type(row).__name__}, not an object")
            yield line_number, row
