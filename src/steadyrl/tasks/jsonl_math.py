"""Math problems from a JSONL file, scored with math-verify (https://github.com/huggingface/Math-Verify).

Each line is a JSON object with a question and a gold answer (field names configurable; an ``id`` field is
used as the prompt id when present). The eval split is ``eval_path`` when given, else a seeded
``eval_fraction`` of the rows; train rows whose question also appears in eval are dropped.

Answer extraction (``answer_extraction``):
  * ``"boxed_or_last"``: the content of the last ``\\boxed{...}`` in the completion, or else the last number
    (commas between digits removed, simple fractions ``a/b`` kept); nothing found -> reward 0;
  * ``"boxed"``: only the last ``\\boxed{...}``;
  * ``"math_verify"``: the whole completion goes to ``math_verify.parse`` with its default extraction.
The extracted text and the gold answer (wrapped in ``\\boxed{}`` so it is read as one expression) are parsed
with ``math_verify.parse`` and compared with
``math_verify.verify(gold, prediction)`` (so ``\\frac{1}{2}`` and ``0.5`` are equal). math-verify guards its
parsing with a timeout that uses signals, so call the reward from the main thread.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

from steadyrl.tasks.base import Prompt, TaskError, check_split, draw_from_pool, jsonl_objects

ANSWER_EXTRACTIONS = ("boxed_or_last", "boxed", "math_verify")
_NUMBER_RE = re.compile(r"-?\d+(?:\.\d+)?(?:\s*/\s*\d+)?")
_DIGIT_COMMA_RE = re.compile(r"(?<=\d),(?=\d{3}\b)")


def import_math_verify() -> Any:
    try:
        import math_verify
    except ImportError as error:
        raise TaskError(
            "the jsonl_math task needs the math-verify package; install it with pip install 'steadyrl[tasks]'"
        ) from error
    return math_verify


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced; None if there is none."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, begin = 1, i
    while i < len(text):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[begin:i]
        i += 1
    return None  # unbalanced: the completion was cut off inside the box


def last_number(text: str) -> str | None:
    matches = _NUMBER_RE.findall(_DIGIT_COMMA_RE.sub("", text))
    return matches[-1].replace(" ", "") if matches else None


def read_jsonl(path: str | Path, question_field: str, answer_field: str) -> list[dict[str, Any]]:
    """Rows of a JSONL file; blank lines are skipped; errors name the file and line number."""
    path = Path(path)
    if not path.is_file():
        raise TaskError(
            f"JSONL file {path} does not exist; pass `path` to a file with one JSON object per line"
        )
    rows = []
    for line_number, row in jsonl_objects(path):
        for field_name, role in ((question_field, "question_field"), (answer_field, "answer_field")):
            if field_name not in row:
                raise TaskError(
                    f"{path} line {line_number} has no field {field_name!r}; its keys are {sorted(row)} "
                    f"(set `{role}` to the right one)"
                )
        row["_line"] = line_number
        rows.append(row)
    if not rows:
        raise TaskError(f"JSONL file {path} has no rows")
    return rows


class JsonlMathTask:
    """Math word problems from JSONL with a math-verify reward."""

    name = "jsonl_math"

    def __init__(
        self,
        path: str | Path,
        *,
        question_field: str = "question",
        answer_field: str = "answer",
        eval_path: str | Path | None = None,
        eval_fraction: float = 0.1,
        seed: int = 0,
        prompt_template: str = "{question}\n",
        answer_extraction: str = "boxed_or_last",
    ) -> None:
        if answer_extraction not in ANSWER_EXTRACTIONS:
            raise TaskError(
                f"answer_extraction must be one of {list(ANSWER_EXTRACTIONS)}, got {answer_extraction!r}"
            )
        if "{question}" not in prompt_template:
            raise TaskError(f"prompt_template must contain '{{question}}', got {prompt_template!r}")
        if eval_path is None and not 0.0 < eval_fraction < 1.0:
            raise TaskError(
                f"eval_fraction must be in (0, 1) when eval_path is not given, got {eval_fraction}"
            )
        self._math_verify = import_math_verify()
        self.question_field, self.answer_field = question_field, answer_field
        self.prompt_template, self.answer_extraction = prompt_template, answer_extraction

        rows = read_jsonl(path, question_field, answer_field)
        train_rows = [self._prompt(Path(path), row) for row in rows]
        if eval_path is not None:
            eval_rows = [
                self._prompt(Path(eval_path), row)
                for row in read_jsonl(eval_path, question_field, answer_field)
            ]
        else:
            if len(train_rows) < 2:
                raise TaskError(
                    f"{path} has {len(train_rows)} row; need at least 2 to hold out an eval split"
                )
            order = list(range(len(train_rows)))
            random.Random(seed).shuffle(order)
            num_eval = min(max(1, round(eval_fraction * len(order))), len(order) - 1)
            eval_indices = set(order[:num_eval])
            eval_rows = [train_rows[i] for i in sorted(eval_indices)]
            train_rows = [train_rows[i] for i in range(len(train_rows)) if i not in eval_indices]
        eval_texts = {prompt.text for prompt in eval_rows}
        self._eval = eval_rows
        self._train = [prompt for prompt in train_rows if prompt.text not in eval_texts]
        if not self._train:
            raise TaskError(
                f"every question of {path} also appears in the eval set; nothing is left to train on"
            )
        self._gold_cache: dict[str, list] = {}

    def _prompt(self, path: Path, row: dict[str, Any]) -> Prompt:
        question, answer = str(row[self.question_field]), str(row[self.answer_field])
        prompt_id = str(row["id"]) if "id" in row else f"{path.name}:{row['_line']}"
        return Prompt(id=prompt_id, text=self.prompt_template.replace("{question}", question), answer=answer)

    # Task protocol ----------------------------------------------------------------------------------

    def sample(self, split: str, n: int, seed: int) -> list[Prompt]:
        check_split(split)
        return draw_from_pool(self._train if split == "train" else self._eval, n, seed)

    def eval_prompts(self) -> list[Prompt]:
        return list(self._eval)

    def extract(self, completion: str) -> str | None:
        """The answer text to parse (see the module docstring), or None when nothing was found."""
        if self.answer_extraction == "math_verify":
            return completion
        boxed = last_boxed(completion)
        if boxed is not None or self.answer_extraction == "boxed":
            return None if boxed is None else f"\\boxed{{{boxed}}}"
        return last_number(completion)

    def _parse_gold(self, answer: str) -> list:
        if answer not in self._gold_cache:
            # Boxed, the whole answer is one expression: bare parse("3\\sqrt{2}") would extract just 3.
            gold = self._math_verify.parse(f"\\boxed{{{answer}}}")
            if not any(not isinstance(item, str) for item in gold):  # only the raw string came back
                raise TaskError(
                    f"math-verify cannot parse the gold answer {answer!r}; fix it in the data file"
                )
            self._gold_cache[answer] = gold
        return self._gold_cache[answer]

    def reward(self, prompt: Prompt, completion: str) -> float:
        gold = self._parse_gold(prompt.answer)
        extracted = self.extract(completion)
        if extracted is None:
            return 0.0
        prediction = self._math_verify.parse(extracted)
        if not prediction:
            return 0.0
        return 1.0 if self._math_verify.verify(gold, prediction) else 0.0

    def demonstration(self, prompt: Prompt, rng: random.Random) -> str:
        return f"The answer is \\boxed{{{prompt.answer}}}."


_NAMES = ("Ada", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana")
_ITEMS = ("apples", "marbles", "stickers", "books", "coins", "pencils")


def write_sample_math_jsonl(path: str | Path, n: int = 20, seed: int = 0) -> Path:
    """Write ``n`` simple generated word problems (+, -, ×, ÷ and a halving fraction) with answers."""
    rng = random.Random(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for index in range(n):
        name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
        a, b = rng.randint(2, 40), rng.randint(2, 12)
        kind = index % 5
        if kind == 0:
            question, answer = (
                f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?",
                str(a + b),
            )
        elif kind == 1:
            question, answer = (
                f"{name} has {a + b} {item} and gives away {b}. How many {item} are left?",
                str(a),
            )
        elif kind == 2:
            question, answer = (
                f"{name} buys {b} boxes with {a} {item} in each box. How many {item} is that?",
                str(a * b),
            )
        elif kind == 3:
            question = f"{name} shares {a * b} {item} equally among {b} friends. How many {item} does each friend get?"
            answer = str(a)
        else:
            question = f"{name} eats {b} of {2 * b} {item}. What fraction of the {item} is eaten?"
            answer = "\\frac{1}{2}"
        lines.append(json.dumps({"id": f"sample-{index}", "question": question, "answer": answer}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
