"""The Task protocol: prompts with gold answers, a verifiable reward, and SFT demonstrations.

A task owns its data and its reward (as in nanochat's ``tasks/``): the trainer asks for prompts, decodes the
completions, and calls :func:`score_completions`, which turns the task's per-completion rewards into one
float tensor and makes every failure loud:

  * ``None`` or NaN from ``task.reward`` means "could not score this one"; it becomes NaN in the tensor and
    the trainer counts and masks it (``AdvantageResult.sample_mask``), it is never silently treated as 0;
  * a reward function that raises, or returns something that is not a finite number, stops the run with a
    :class:`RewardError` naming the prompt, the completion and the original exception.

Named reward components (GDPO, arXiv 2601.05242): ``task.reward`` may return a mapping of named numbers,
e.g. ``{"correct": 1.0, "format": 0.1}``, instead of one number. :func:`score_rewards` then returns the
components as columns of a (B, K) tensor and their sum as the reward (for metrics, evaluation and every
estimator that takes one reward); an estimator registered with ``reads_components`` (gdpo) receives the
columns. The column order is the task's optional ``reward_components`` attribute (a tuple of names), else
the key order of the first mapping; every mapping of a batch must carry exactly those keys (a missing
component is ``None`` / NaN, left out of that component's statistics), and one batch may not mix numbers and
mappings. Declare ``reward_components`` when training on several processes, so every rank stacks the same
columns.
"""

from __future__ import annotations

import math
import numbers
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
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
        """Reward of ``completion`` (decoded text after the prompt); None / NaN = could not be scored.
        A mapping of named numbers gives the reward's components (module docstring)."""
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


@dataclass(frozen=True)
class RewardScores:
    """What :func:`score_rewards` returns for B completions."""

    total: Tensor  # (B,) float32: the reward, or the sum of its components (NaN when every one is missing)
    components: Tensor  # (B, K) float32: the named components; K = 1 (the total) for plain-number rewards
    names: tuple[str, ...]  # the components' names in column order; () for plain-number rewards


def score_completions(task: Task, prompts: list[Prompt], completions: list[str]) -> Tensor:  # (B,) float32
    """``task.reward`` of each (prompt, completion) pair as a float32 tensor, NaN where unscorable; the sum of
    the components for a task that returns named components (``score_rewards(...).total``).

    Raises:
      RewardError: the reward function raised, or returned a non-number or ±inf.
      ValueError: ``prompts`` and ``completions`` differ in length.
    """
    return score_rewards(task, prompts, completions).total


def score_rewards(task: Task, prompts: list[Prompt], completions: list[str]) -> RewardScores:
    """Rewards and their named components (module docstring); errors as :func:`score_completions`."""
    if len(prompts) != len(completions):
        raise ValueError(
            f"got {len(prompts)} prompts but {len(completions)} completions; pass one prompt per completion"
        )
    names: tuple[str, ...] | None = getattr(task, "reward_components", None) or None
    rows: list[list[float]] = []
    named: bool | None = None
    for prompt, completion in zip(prompts, completions):
        where = (
            f"task {getattr(task, 'name', type(task).__name__)!r}, prompt id {prompt.id!r} "
            f"(text {_preview(prompt.text)}), completion {_preview(completion)}"
        )
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
            names = names or tuple(str(k) for k in value)
            if set(value) != set(names):
                raise RewardError(
                    f"the reward function returned components {sorted(map(str, value))} for {where}, expected "
                    f"{list(names)}; return every component (None where it cannot be scored)."
                )
            rows.append([_checked_reward(value[name], where, f" (component {name!r})") for name in names])
        else:
            rows.append([_checked_reward(value, where, "")])
    if not named:
        total = torch.tensor([r[0] for r in rows], dtype=torch.float32)
        return RewardScores(total, total[:, None], ())
    components = torch.tensor(rows, dtype=torch.float32).reshape(len(rows), len(names))
    missing = torch.isnan(components)
    total = torch.where(missing, 0.0, components).sum(dim=1)
    total = torch.where(missing.all(dim=1), torch.full_like(total, math.nan), total)
    return RewardScores(total, components, tuple(names))


def _checked_reward(value: object, where: str, what: str) -> float:
    reward = _as_reward(value)
    if reward is None or math.isinf(reward):
        raise RewardError(
            f"the reward function returned {value!r} ({type(value).__name__}){what} for {where}; fix the reward "
            "function to return a finite float (or None / NaN when the completion cannot be scored)."
        )
    return reward
