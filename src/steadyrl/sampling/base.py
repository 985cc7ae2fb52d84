"""One protocol per kind of sampling-layer component, and what the layer hands them.

Every component is a class registered in ``steadyrl.registry`` (families ``prompt_selector``, ``group_filter``,
``group_augmenter``, ``reward_shaper``, ``layer_advantage``) and built once per run with
``registry.build(family, spec, **context)``; stateful ones have ``state_dict`` / ``load_state_dict`` and are
restored by a checkpoint and by a guard rollback (``SamplingLayer`` is in ``Trainer.training_state()``).

Every decision must be the same on every rank: components see global rewards, draw randomness only from
seeded generators keyed by (run seed, step), and never from a rank-dependent source.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from steadyrl.sampling.groups import Groups
from steadyrl.tasks import Prompt
from steadyrl.types import AdvantageResult, Metrics


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class PromptSelector(Stateful, Protocol):
    def select(self, step: int, n: int, round: int) -> list[Prompt]:
        """``n`` prompts for generation round ``round`` of ``step`` (the same list on every rank)."""
        ...

    def observe(self, step: int, prompts: list[Prompt], rewards: Tensor) -> None:
        """The step's generated groups (rewards (P·G,), NaN = missing), once the step's rows are final."""
        ...


class GroupFilter(Stateful, Protocol):
    refill: bool
    """True: a group the filter drops is replaced by a newly generated one (DAPO's over-sampling)."""

    def keep(self, groups: Groups) -> Tensor:
        """(rows,) bool: the rows that stay; a group with no row left is dropped."""
        ...


class GroupAugmenter(Stateful, Protocol):
    def augment(self, step: int, groups: Groups, layer: Any) -> Groups:
        """The groups with some rows replaced (replayed or regenerated); ``layer`` offers ``generate_rows``,
        ``score`` and ``decode``."""
        ...

    def observe(self, step: int, groups: Groups) -> None:
        """Every policy-sampled group of the step, once its rows are final (to store trajectories)."""
        ...


class RewardShaper(Stateful, Protocol):
    def shape(self, step: int, groups: Groups, layer: Any) -> Groups:
        """The groups with ``rewards`` (and possibly ``keep``) changed; ``task_rewards`` stay as scored."""
        ...


@dataclass
class AdvantageContext:
    """What a layer advantage reads, global over ranks."""

    step: int
    rewards: Tensor  # (B,) NaN = missing or filtered out
    group_size: int
    prompts: list[Prompt]  # (P,)
    lengths: Tensor  # (B,) completion lengths in tokens (EOS included)
    answers: list[str | None] | None  # (B,) the answer each completion gives, when the estimator asks for it
    store: Any  # the layer's PromptStore


class LayerAdvantage(Stateful, Protocol):
    needs_answers: bool

    def __call__(self, ctx: AdvantageContext) -> AdvantageResult: ...


def first_word(completion: str) -> str | None:
    """The arithmetic task's answer rule: the completion cut at its first whitespace; None when empty."""
    words = completion.split(maxsplit=1)
    return words[0] if words else None


def extract_answer(task: Any, completion: str) -> str | None:
    """The task's own ``extract_answer(completion)`` when it has one, else ``first_word`` [INF: a task that
    needs another rule should define the method]."""
    fn = getattr(task, "extract_answer", None)
    return fn(completion) if callable(fn) else first_word(completion)


def answer_entropy(answers: list[str | None], group_size: int, device: torch.device | None = None) -> Tensor:
    """(P,) entropy in bits of each group's answer distribution (COPO's H); a missing answer (None) counts
    as an answer of its own, as an unparsable string does in the official code."""
    out = []
    for start in range(0, len(answers), group_size):
        counts = Counter(answers[start : start + group_size]).values()
        total = sum(counts)
        out.append(-sum(c / total * math.log2(c / total) for c in counts) if total else 0.0)
    return torch.tensor(out, dtype=torch.float32, device=device)


def no_metrics() -> Metrics:
    return {}
