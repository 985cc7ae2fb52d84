"""Any reasoning-gym procedural dataset as a Task (https://github.com/open-thought/reasoning-gym).

Train entries come from ``create_dataset(name, size=size, seed=seed, **config)`` and eval entries from the
same call with ``size=eval_size, seed=seed + EVAL_SEED_OFFSET``; train entries whose question also appears in
eval are dropped, so the held-out set is disjoint from train (duplicates *within* train are kept: they are
part of the dataset's distribution).

Reward: ``dataset.score_answer(extracted, entry)``, where ``extracted`` is the content of the last
``<answer_tag>...</answer_tag>`` in the completion (``reasoning_gym.utils.extract_answer``; None when there
is no tag, which reasoning-gym scores 0), or the stripped completion when ``answer_tag`` is None.
Demonstration: the entry's gold answer wrapped in the tag.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any

from steadyrl.tasks.base import Prompt, TaskError, check_split, draw_from_pool

EVAL_SEED_OFFSET = 10_000_019


def import_reasoning_gym() -> Any:
    try:
        import reasoning_gym
    except ImportError as error:
        raise TaskError(
            "the reasoning_gym task needs the reasoning-gym package; install it with "
            "pip install 'steadyrl[tasks]'"
        ) from error
    return reasoning_gym


def _valid_config_keys(reasoning_gym: Any, dataset: str) -> list[str]:
    registered = getattr(reasoning_gym.factory, "DATASETS", {}).get(dataset)
    if registered is None or not dataclasses.is_dataclass(registered[1]):
        return []
    return sorted(f.name for f in dataclasses.fields(registered[1]) if f.name not in ("size", "seed"))


class ReasoningGymTask:
    """A reasoning-gym dataset with a held-out eval split and tag-based answer extraction."""

    def __init__(
        self,
        dataset: str,
        *,
        size: int = 1000,
        eval_size: int = 100,
        seed: int = 0,
        config: dict[str, Any] | None = None,
        prompt_template: str = "{question}\nAnswer: ",
        answer_tag: str | None = "answer",
    ) -> None:
        reasoning_gym = import_reasoning_gym()
        config = dict(config or {})
        if {"size", "seed"} & config.keys():
            raise TaskError(
                "put size and seed in the task's own `size`, `eval_size` and `seed`, not in `config`"
            )
        if "{question}" not in prompt_template:
            raise TaskError(f"prompt_template must contain '{{question}}', got {prompt_template!r}")
        if size < 1 or eval_size < 1:
            raise TaskError(f"size and eval_size must be >= 1, got {size} and {eval_size}")
        self.name = f"reasoning_gym/{dataset}"
        self.dataset_name, self.prompt_template, self.answer_tag = dataset, prompt_template, answer_tag
        self._train_dataset = self._create(reasoning_gym, dataset, size, seed, config)
        self._eval_dataset = self._create(reasoning_gym, dataset, eval_size, seed + EVAL_SEED_OFFSET, config)
        self._extract_answer = reasoning_gym.utils.extract_answer

        self._eval = [self._prompt("eval", i, entry) for i, entry in enumerate(self._eval_dataset)]
        eval_texts = {prompt.text for prompt in self._eval}
        train = (self._prompt("train", i, entry) for i, entry in enumerate(self._train_dataset))
        self._train = [prompt for prompt in train if prompt.text not in eval_texts]
        self.num_dropped_duplicates = size - len(self._train)
        if not self._train:
            raise TaskError(
                f"every train entry of {dataset!r} also appears in eval; raise `size` or change `config`"
            )
        self._entries = {prompt.id: prompt.meta["entry"] for prompt in self._train + self._eval}

    @staticmethod
    def _create(reasoning_gym: Any, dataset: str, size: int, seed: int, config: dict[str, Any]) -> Any:
        try:
            return reasoning_gym.create_dataset(dataset, size=size, seed=seed, **config)
        except TypeError as error:
            raise TaskError(
                f"bad config for reasoning-gym dataset {dataset!r} ({error}); valid keys: "
                f"{_valid_config_keys(reasoning_gym, dataset)}"
            ) from error
        except (ValueError, AssertionError) as error:
            if dataset not in getattr(reasoning_gym.factory, "DATASETS", {dataset: None}):
                valid = sorted(reasoning_gym.factory.DATASETS)
                raise TaskError(f"unknown reasoning-gym dataset {dataset!r}; valid names: {valid}") from error
            raise TaskError(f"bad config for reasoning-gym dataset {dataset!r}: {error}") from error

    def _prompt(self, split: str, index: int, entry: dict[str, Any]) -> Prompt:
        return Prompt(
            id=f"{self.dataset_name}/{split}/{index}",
            text=self.prompt_template.replace("{question}", entry["question"]),
            answer=str(entry["answer"]),
            meta={"entry": entry},
        )

    # Task protocol ----------------------------------------------------------------------------------

    def sample(self, split: str, n: int, seed: int) -> list[Prompt]:
        check_split(split)
        return draw_from_pool(self._train if split == "train" else self._eval, n, seed)

    def eval_prompts(self) -> list[Prompt]:
        return list(self._eval)

    def extract(self, completion: str) -> str | None:
        if self.answer_tag is None:
            return completion.strip()
        return self._extract_answer(completion, tag_name=self.answer_tag)

    def reward(self, prompt: Prompt, completion: str) -> float:
        entry = prompt.meta.get("entry") or self._entries.get(prompt.id)
        if entry is None:
            raise TaskError(f"prompt {prompt.id!r} does not come from this task ({self.name})")
        return float(self._train_dataset.score_answer(self.extract(completion), entry))

    def demonstration(self, prompt: Prompt, rng: random.Random) -> str:
        if self.answer_tag is None:
            return prompt.answer
        return f"<{self.answer_tag}>{prompt.answer}</{self.answer_tag}>"
