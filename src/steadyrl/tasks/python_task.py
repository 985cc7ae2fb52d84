"""The ``python`` task: your data and your reward function, named in the YAML config.

    task:
      name: python
      kwargs:
        reward: my_rewards.py:exact_match        # or package.module:function
        data: data/train.jsonl                   # file, directory, {split: file} or a hub name (tasks/hf_data.py)
        eval_split: 0.1                          # a split name, or a seeded fraction of the train rows
        prompt_field: question
        answer_field: answer
        workers: 4                               # 0 = call the reward in this process
        timeout_s: 10                            # per call, needs workers >= 1; a timed-out call is unscorable

The reward is called as ``reward(record, completion, **reward_kwargs)`` (steadyrl.rewards): ``record`` is the
prompt's data row with ``id``, ``prompt``, ``answer`` (and ``reference`` when ``reference_field`` is set)
filled in from the mapped fields. It returns a float, None / NaN (unscorable: the completion is masked and
counted in ``reward/nan_frac``), or a dict of named floats. Named rewards are combined as

    r = Σ_k w_k · r_k        (w_k = reward_weights[k], default 1; r = NaN when any r_k is NaN)

(TRL's default ``sum_then_normalize`` with ``reward_weights``, except that a missing component makes the whole
reward missing instead of counting as 0), and each r_k is kept (``TaskScores.components``) and logged as
``reward/<name>_mean``. A reward that raises, returns a non-number, or kills its worker stops the run with a
RewardError naming the prompt and the completion; a call past ``timeout_s`` is unscorable and counted in
``reward/timeout_frac``.

A prompt field holding a conversation (a list of ``{"role", "content"}`` messages, TRL's conversational
format) is kept as messages and rendered with the chat template (models/chat.py).
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Callable
from typing import Any

import torch

from steadyrl.rewards import (
    CallFailed,
    CallTimedOut,
    RewardFunctionError,
    RewardPool,
    check_reward_signature,
    load_reward_function,
    reward_spec_of,
)
from steadyrl.rewards.functions import absolute_spec
from steadyrl.rewards.pool import call_reward
from steadyrl.tasks.base import (
    Prompt,
    RewardError,
    TaskError,
    TaskScores,
    check_split,
    describe_call,
    draw_from_pool,
)
from steadyrl.tasks.hf_data import hold_out, load_rows

MESSAGES_KEY = "messages"
"""Prompt.meta key of a conversational prompt's messages (read by the chat renderer)."""
_FRAME_RE = re.compile(r'File "([^"]+)", line (\d+), in (\S+)')


def _messages(value: Any) -> list[dict[str, str]] | None:
    """The value as chat messages when it is a list of {role, content} dicts, else None."""
    if not isinstance(value, list) or not value:
        return None
    if all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    return None


class PythonRewardTask:
    """Prompts from ``data``, rewards from your function ``reward`` (see the module docstring)."""

    name = "python"

    def __init__(
        self,
        reward: str | Callable[..., Any],
        data: str | dict[str, Any],
        *,
        split: str = "train",
        eval_split: str | float = 0.1,
        data_config: str | None = None,
        prompt_field: str = "prompt",
        answer_field: str | None = "answer",
        id_field: str | None = "id",
        reference_field: str | None = None,
        prompt_template: str = "{prompt}",
        reward_kwargs: dict[str, Any] | None = None,
        reward_weights: dict[str, float] | None = None,
        workers: int = 0,
        timeout_s: float | None = None,
        streaming: bool = False,
        max_rows: int | None = None,
        seed: int = 0,
        cache_dir: str | None = None,
    ) -> None:
        if not isinstance(workers, int) or workers < 0:
            raise TaskError(f"workers must be an integer >= 0 (0 = call the reward in this process), got {workers!r}")
        if timeout_s is not None and workers == 0:
            raise TaskError(
                "timeout_s needs workers >= 1: a call can only be stopped in a worker process; set workers"
            )
        if timeout_s is not None and not (isinstance(timeout_s, (int, float)) and timeout_s > 0):
            raise TaskError(f"timeout_s must be a number of seconds > 0 (or null), got {timeout_s!r}")
        if "{prompt}" not in prompt_template:
            raise TaskError(f"prompt_template must contain '{{prompt}}', got {prompt_template!r}")
        if reward_weights is not None:
            bad = {k: v for k, v in reward_weights.items() if not isinstance(v, (int, float)) or not math.isfinite(v)}
            if not reward_weights or bad:
                raise TaskError(f"reward_weights must map reward names to finite numbers, got {reward_weights!r}")
        if isinstance(eval_split, bool) or not isinstance(eval_split, (str, int, float)):
            raise TaskError(f"eval_split must be a split name or a fraction in (0, 1), got {eval_split!r}")
        self.reward_kwargs = dict(reward_kwargs or {})
        self.reward_weights = {k: float(v) for k, v in reward_weights.items()} if reward_weights else None
        self.workers, self.timeout_s = workers, timeout_s
        self.prompt_field, self.answer_field = prompt_field, answer_field
        self.id_field, self.reference_field = id_field, reference_field
        self.prompt_template = prompt_template
        self._function, self.reward_name = self._load_reward(reward)
        # how a worker process finds the function: the spec it was named by, or its module and name
        self._spec = absolute_spec(reward) if isinstance(reward, str) else reward_spec_of(self._function)
        self._pool: RewardPool | None = None
        self._names: list[str] | None = None

        load = dict(data_config=data_config, streaming=streaming, max_rows=max_rows, cache_dir=cache_dir)
        train_rows = load_rows(data, split, **load)
        if isinstance(eval_split, str):
            eval_rows = load_rows(data, eval_split, **load)
        else:
            train_rows, eval_rows = hold_out(train_rows, float(eval_split), seed)
        split_of_eval = eval_split if isinstance(eval_split, str) else split
        self._eval = [self._prompt(row, split_of_eval, i) for i, row in enumerate(eval_rows)]
        held_out = {self._key(p) for p in self._eval}
        self._train = [
            p for p in (self._prompt(row, split, i) for i, row in enumerate(train_rows)) if self._key(p) not in held_out
        ]
        if not self._train:
            raise TaskError(f"every prompt of {data} also appears in the eval split; nothing is left to train on")

    # ------------------------------------------------------------------ construction

    def _load_reward(self, reward: str | Callable[..., Any]) -> tuple[Callable[..., Any], str]:
        try:
            if callable(reward):
                function, name = reward, reward_spec_of(reward) or getattr(reward, "__qualname__", repr(reward))
                if self.workers and reward_spec_of(reward) is None:
                    raise TaskError(
                        f"reward {name} cannot be imported by name in a worker process (defined in __main__, a "
                        "lambda or a nested function); pass it as 'path/to/file.py:function', or set workers=0"
                    )
            elif isinstance(reward, str):
                function, name = load_reward_function(reward), reward
            else:
                raise TaskError(f"reward must be 'path/to/file.py:function' or 'module:function', got {reward!r}")
            check_reward_signature(function, self.reward_kwargs, name)
        except RewardFunctionError as error:
            raise TaskError(str(error)) from error
        return function, name

    def _field(self, row: dict[str, Any], field_name: str, role: str, where: str) -> Any:
        if field_name not in row:
            raise TaskError(f"{where} has no field {field_name!r}; its fields are {sorted(row)} (set `{role}`)")
        return row[field_name]

    def _prompt(self, row: dict[str, Any], split: str, index: int) -> Prompt:
        where = f"row {index} of split {split!r}"
        value = self._field(row, self.prompt_field, "prompt_field", where)
        messages = _messages(value)
        if messages is None and not isinstance(value, str):
            raise TaskError(
                f"{where}: field {self.prompt_field!r} holds a {type(value).__name__}; it must be text or a list of "
                "{role, content} messages"
            )
        if messages is None:
            text = self.prompt_template.replace("{prompt}", value)
        else:
            text = next((m["content"] for m in reversed(messages) if m["role"] == "user"), messages[-1]["content"])
        answer = "" if self.answer_field is None else self._field(row, self.answer_field, "answer_field", where)
        prompt_id = str(row[self.id_field]) if self.id_field and row.get(self.id_field) is not None else f"{split}:{index}"
        record = dict(row)
        record.update(id=prompt_id, prompt=value if messages is not None else text, answer=answer)
        if self.reference_field is not None:
            record["reference"] = self._field(row, self.reference_field, "reference_field", where)
        if messages is not None:
            record[MESSAGES_KEY] = messages
        return Prompt(id=prompt_id, text=text, answer="" if answer is None else str(answer), meta=record)

    @staticmethod
    def _key(prompt: Prompt) -> str:
        messages = prompt.meta.get(MESSAGES_KEY)
        return json.dumps(messages) if messages is not None else prompt.text

    # ------------------------------------------------------------------ Task protocol

    def sample(self, split: str, n: int, seed: int) -> list[Prompt]:
        check_split(split)
        return draw_from_pool(self._train if split == "train" else self._eval, n, seed)

    def eval_prompts(self) -> list[Prompt]:
        return list(self._eval)

    def reward(self, prompt: Prompt, completion: str) -> float:
        return float(self.score([prompt], [completion]).rewards[0])

    def demonstration(self, prompt: Prompt, rng: random.Random) -> str:
        text = prompt.meta.get("reference") if self.reference_field else prompt.answer
        if not text:
            raise TaskError(
                f"prompt {prompt.id!r} has no demonstration for SFT; set `reference_field` to a field with a "
                "worked solution (or `answer_field` to the answer)"
            )
        return str(text)

    # ------------------------------------------------------------------ scoring

    def _record(self, prompt: Prompt) -> dict[str, Any]:
        return prompt.meta or {"id": prompt.id, "prompt": prompt.text, "answer": prompt.answer}

    def _outcomes(self, prompts: list[Prompt], completions: list[str]) -> list[Any]:
        records = [self._record(p) for p in prompts]
        if self.workers == 0:
            return [call_reward(self._function, r, c, self.reward_kwargs) for r, c in zip(records, completions)]
        if self._pool is None:
            self._pool = RewardPool(self._spec, self.reward_kwargs, workers=self.workers, timeout_s=self.timeout_s)
        try:
            return self._pool.map(records, completions)
        except RewardFunctionError as error:
            raise RewardError(str(error)) from error

    def score(self, prompts: list[Prompt], completions: list[str]) -> TaskScores:
        """Rewards, named components and ``reward/timeout_frac`` of a batch (one call per completion)."""
        outcomes = self._outcomes(prompts, completions)
        first_named = next((o for o in outcomes if isinstance(o, dict)), None)
        if first_named is not None and self._names is None:
            self._names = sorted(first_named)  # later batches must return the same names
        # the components' order: reward_weights' order when given, else sorted names; None = one number each
        names = list(self.reward_weights or self._names or []) or None
        totals: list[float] = []
        components: dict[str, list[float]] = {}
        timeouts = 0
        for prompt, completion, outcome in zip(prompts, completions, outcomes):
            where = describe_call(self, prompt, completion)
            if isinstance(outcome, CallFailed):
                raise RewardError(self._failure_message(outcome, where))
            if isinstance(outcome, CallTimedOut):
                timeouts += 1
                totals.append(math.nan)
                for name in names or []:
                    components.setdefault(name, []).append(math.nan)
                continue
            if isinstance(outcome, dict):
                if names is None or sorted(outcome) != sorted(names):
                    raise RewardError(
                        f"the reward function returned the rewards {sorted(outcome)} for {where}, but "
                        f"{'reward_weights names' if self.reward_weights else 'other completions returned'} "
                        f"{sorted(names)}; return the same names every time"
                    )
                weights = self.reward_weights or {}
                totals.append(sum(weights.get(k, 1.0) * v for k, v in outcome.items()))  # NaN in, NaN out
                for name in names:
                    components.setdefault(name, []).append(outcome[name])
            else:
                if names is not None:
                    raise RewardError(
                        f"the reward function returned one number for {where}, but named rewards are expected "
                        f"({sorted(names)}); return a dict of named rewards every time"
                    )
                totals.append(outcome)
        rewards = torch.tensor(totals, dtype=torch.float32)
        named = {k: torch.tensor(v, dtype=torch.float32) for k, v in components.items()}
        metrics = {f"reward/{k}_mean": v.nanmean() for k, v in named.items()}
        if self.timeout_s is not None:
            metrics["reward/timeout_frac"] = torch.tensor(timeouts / max(1, len(prompts)), dtype=torch.float32)
        return TaskScores(rewards, named, metrics)

    def _failure_message(self, failure: CallFailed, where: str) -> str:
        if failure.kind == "invalid":
            return (
                f"the reward function {failure.message} for {where}; fix the reward function to return a finite "
                "float or a dict of named finite floats (or None / NaN when the completion cannot be scored)."
            )
        if failure.kind == "died":
            return (
                f"{failure.message} -- for {where}; the reward function crashed its process (a segfault, os._exit, "
                "or out of memory): fix the reward function."
            )
        frames = _FRAME_RE.findall(failure.traceback)
        at = f" at {frames[-1][0]}:{frames[-1][1]} in {frames[-1][2]}" if frames else ""
        return (
            f"the reward function raised {failure.error_type}: {failure.message}{at} -- for {where}. Fix the reward "
            "function (return None or NaN for a completion it cannot score)."
        )

    def close(self) -> None:
        """Stop the reward workers (a later call starts new ones)."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None
