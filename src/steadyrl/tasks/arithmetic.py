"""Procedural integer arithmetic ("47+38=" -> "85"): the offline stability lab's task.

Design (kept flexible on purpose; the lab tunes it):

* **Problems.** Each operand gets a digit count drawn uniformly from [min_digits, max_digits], then a value
  uniformly among the numbers with that many digits (0..9 for one digit). The operation is drawn uniformly
  from ``operations`` ⊆ {+, -, *}. With ``allow_negative=False`` the operands of a subtraction are ordered
  so the answer is ≥ 0. Difficulty knobs: digits and operations.
* **Prompt / completion.** Prompt text ``"47+38="``; the completion is the answer digits ``"85"`` and the
  model's EOS ends it (the trainer appends EOS to demonstrations; :meth:`demonstration` returns the text).
  ``answer_format="reversed"`` writes the answer least-significant digit first (``"58"``; sign in front),
  which small transformers learn more easily because carries then flow left to right.
* **Scratchpad** (``scratchpad=True``, addition only): the completion works the column addition least
  significant column first, one ``x+y+c=s`` per column (``c`` the carry into it, a missing digit written 0),
  then the answer in parentheses: ``"347+85="`` -> ``"7+5+0=12 4+8+1=13 3+0+1=4 (432)"``. It uses only the
  embedded character vocabulary (digits, ``+ = ( )`` and space) and makes completions 20-33 characters for
  2-3 digit operands (+ EOS) instead of 1-4. Reward: the number in the *first* ``(...)`` against the answer,
  exactly as below (text after it is ignored, as plain mode ignores text after the first word); the columns
  are not checked. Demonstration errors act on the worked columns: ``ignore_carries`` writes every carry-in
  as 0, ``drop_carry`` one of them, so the parenthesised answer is the plain mode's corrupted value;
  ``off_by_one`` keeps the columns right and moves the final answer.
* **Reward.** 1.0 if the completion, stripped and cut at its first whitespace, equals the answer string
  exactly, else 0.0 (so ``"085"`` and ``"85 "`` are wrong and right respectively). With
  ``format_reward`` > 0 the reward has two named components (GDPO's multi-reward setting, tasks/base.py):
  ``{"correct": that 0/1, "format": format_reward if the first word is a well-formed integer (optional
  minus sign, digits, no leading zero unless reversed) else 0}``; below 1, so a well-formed wrong answer never reaches an
  evaluation's full marks.
* **Held-out split.** A problem belongs to eval iff ``blake2b("a op b") mod eval_modulus == 0``; the hash
  depends only on the problem, so the split is the same for every seed, and :meth:`sample` for train
  rejects eval problems. :meth:`eval_prompts` draws ``eval_size`` distinct eval problems from ``seed``
  (fewer when the whole eval bucket is smaller, e.g. one-digit addition has only ~10; the search stops
  after 200·eval_modulus draws in a row find no new eval problem).
* **Imperfect demonstrations.** With probability ``demo_error_rate`` a demonstration is corrupted in a way
  a policy can pick up as a habit that the reward then penalises:
    - ``"drop_carry"``: one carry (chosen with ``rng`` among the columns that produce one) is not
      propagated. For + and * this gives ``answer - c_k·10^(k+1)`` (c_k the carry out of column k, counted
      from the least significant, over the long-multiplication column sums for *); for - a forgotten
      borrow gives ``answer + 10^(k+1)``. A problem without any carry / borrow keeps a correct demo.
    - ``"ignore_carries"``: every carry (+) or borrow (-) is ignored: each answer digit is the column's
      digit sum (difference) mod 10, a consistent "habit" rather than a one-off slip; * falls back to
      ``drop_carry``. This is the embedded default's habit (see docs/quickstart.md).
    - ``"off_by_one"``: answer ± 1 (never negative when ``allow_negative=False``).
  ``demo_error_ops`` limits the corruption to some operations (e.g. ``"+"``), so a mixed warm start can keep
  another skill clean (the retention set of the stability lab).
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Container

from steadyrl.tasks.base import Prompt, TaskError, check_split, draw_from_pool

OPERATIONS = ("+", "-", "*")
DEMO_ERRORS = ("drop_carry", "ignore_carries", "off_by_one")
ANSWER_FORMATS = ("plain", "reversed")
_PROBLEM_RE = re.compile(r"^(\d+)([+\-*])(\d+)=$")
_INTEGER_RE = {"plain": re.compile(r"-?(0|[1-9]\d*)"), "reversed": re.compile(r"-?\d+")}
_MARKER_RE = re.compile(r"\(([^()]*)\)")


def _digits(value: int) -> list[int]:
    """Decimal digits, least significant first."""
    return [int(ch) for ch in reversed(str(value))]


def column_carries(a: int, op: str, b: int) -> list[int]:
    """Carry (for + and *) or borrow (for -, on max - min) out of each column, least significant first."""
    if op == "-":
        big, small = _digits(max(a, b)), _digits(min(a, b))
        small += [0] * (len(big) - len(small))
        borrows, borrow = [], 0
        for top, bottom in zip(big, small):
            borrow = 1 if top - borrow < bottom else 0
            borrows.append(borrow)
        return borrows
    da, db = _digits(a), _digits(b)
    width = len(da) + len(db)
    if op == "+":
        column_sums = [(da[k] if k < len(da) else 0) + (db[k] if k < len(db) else 0) for k in range(width)]
    elif op == "*":
        column_sums = [0] * width
        for i, x in enumerate(da):
            for j, y in enumerate(db):
                column_sums[i + j] += x * y
    else:
        raise TaskError(f"unknown operation {op!r}; valid: {list(OPERATIONS)}")
    carries, carry = [], 0
    for column_sum in column_sums:
        carry = (column_sum + carry) // 10
        carries.append(carry)
    return carries


def _ignore_carries(a: int, op: str, b: int) -> int:
    """Column-wise digit sum (+) or |difference| with every borrow forgotten (-), each column mod 10."""
    hi, lo = (a, b) if op == "+" or a >= b else (b, a)
    result, place = 0, 1
    while hi or lo:
        x, y = hi % 10, lo % 10
        result += ((x + y) % 10 if op == "+" else (x - y) % 10) * place
        hi, lo, place = hi // 10, lo // 10, place * 10
    return result if op == "+" or a >= b else -result


def column_addition(a: int, b: int, forgotten: Container[int] = ()) -> tuple[list[str], int]:
    """The worked columns of a + b, least significant first (``"x+y+c=s"``, c the carry into the column), and
    the value they spell. The carry out of a column in ``forgotten`` is written as 0 in the next column (or
    dropped from the front when it is the last column), as a pupil who forgets it would."""
    da, db = _digits(a), _digits(b)
    columns, carry, value = [], 0, 0
    for k in range(max(len(da), len(db))):
        x, y = (da[k] if k < len(da) else 0), (db[k] if k < len(db) else 0)
        total = x + y + carry
        columns.append(f"{x}+{y}+{carry}={total}")
        value += (total % 10) * 10**k
        carry = 0 if k in forgotten else total // 10
    return columns, value + carry * 10 ** len(columns)


def _evaluate(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


class ArithmeticTask:
    """Integer arithmetic with a hash-held-out eval split and optionally imperfect demonstrations."""

    name = "arithmetic"

    def __init__(
        self,
        min_digits: int = 1,
        max_digits: int = 3,
        operations: str = "+",
        eval_size: int = 200,
        seed: int = 0,
        demo_error_rate: float = 0.0,
        demo_error: str = "drop_carry",
        demo_error_ops: str | None = None,
        answer_format: str = "plain",
        allow_negative: bool = False,
        eval_modulus: int = 10,
        format_reward: float = 0.0,
        scratchpad: bool = False,
    ) -> None:
        if not 1 <= min_digits <= max_digits:
            raise TaskError(
                f"need 1 <= min_digits <= max_digits, got min_digits={min_digits}, max_digits={max_digits}"
            )
        ops = tuple(dict.fromkeys(operations))
        if not ops or any(op not in OPERATIONS for op in ops):
            raise TaskError(
                f"operations must be a non-empty string over {''.join(OPERATIONS)!r}, got {operations!r}"
            )
        if not 0.0 <= demo_error_rate <= 1.0:
            raise TaskError(f"demo_error_rate must be in [0, 1], got {demo_error_rate}")
        if demo_error not in DEMO_ERRORS:
            raise TaskError(f"demo_error must be one of {list(DEMO_ERRORS)}, got {demo_error!r}")
        if answer_format not in ANSWER_FORMATS:
            raise TaskError(f"answer_format must be one of {list(ANSWER_FORMATS)}, got {answer_format!r}")
        if not 0.0 <= format_reward < 1.0:
            raise TaskError(f"format_reward must be in [0, 1) (below a correct answer's 1), got {format_reward}")
        if scratchpad and tuple(dict.fromkeys(operations)) != ("+",):
            raise TaskError(f"scratchpad=True works addition columns only; set operations='+' (got {operations!r}).")
        if eval_size < 1 or eval_modulus < 2:
            raise TaskError(f"need eval_size >= 1 and eval_modulus >= 2, got {eval_size} and {eval_modulus}")
        self.min_digits, self.max_digits, self.operations = min_digits, max_digits, ops
        self.eval_size, self.seed, self.eval_modulus = eval_size, seed, eval_modulus
        self.demo_error_rate, self.demo_error = demo_error_rate, demo_error
        self.demo_error_ops = set(demo_error_ops if demo_error_ops is not None else OPERATIONS)
        if not self.demo_error_ops <= set(OPERATIONS):
            raise TaskError(f"demo_error_ops must only contain {''.join(OPERATIONS)}, got {demo_error_ops!r}")
        self.answer_format, self.allow_negative = answer_format, allow_negative
        self.format_reward, self.scratchpad = format_reward, scratchpad
        self.reward_components = ("correct", "format") if format_reward > 0 else None
        self._eval = self._build_eval_set()

    # problems ---------------------------------------------------------------------------------------

    def format_answer(self, value: int) -> str:
        digits = str(abs(value))
        if self.answer_format == "reversed":
            digits = digits[::-1]
        return ("-" if value < 0 else "") + digits

    def is_eval_problem(self, a: int, op: str, b: int) -> bool:
        digest = hashlib.blake2b(f"{a}{op}{b}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") % self.eval_modulus == 0

    def _random_operand(self, rng: random.Random) -> int:
        num_digits = rng.randint(self.min_digits, self.max_digits)
        low = 0 if num_digits == 1 else 10 ** (num_digits - 1)
        return rng.randint(low, 10**num_digits - 1)

    def _random_problem(self, rng: random.Random) -> tuple[int, str, int]:
        op = rng.choice(self.operations)
        a, b = self._random_operand(rng), self._random_operand(rng)
        if op == "-" and not self.allow_negative and a < b:
            a, b = b, a
        return a, op, b

    def make_prompt(self, a: int, op: str, b: int) -> Prompt:
        value = _evaluate(a, op, b)
        return Prompt(
            id=f"arithmetic/{a}{op}{b}",
            text=f"{a}{op}{b}=",
            answer=self.format_answer(value),
            meta={"a": a, "op": op, "b": b, "value": value},
        )

    def _build_eval_set(self) -> list[Prompt]:
        rng = random.Random(f"arithmetic-eval-{self.seed}")
        chosen: dict[tuple[int, str, int], None] = {}
        # A run of 200·M draws with nothing new means the eval bucket is exhausted (a tiny problem space);
        # in a large space such a run has probability about e^-200.
        attempts_since_new = 0
        while len(chosen) < self.eval_size and attempts_since_new < 200 * self.eval_modulus:
            problem = self._random_problem(rng)
            attempts_since_new += 1
            if problem not in chosen and self.is_eval_problem(*problem):
                chosen[problem] = None
                attempts_since_new = 0
        if not chosen:
            raise TaskError(
                "the arithmetic problem space is too small to hold out an eval set; raise max_digits or add "
                "operations"
            )
        return [self.make_prompt(*problem) for problem in chosen]

    # Task protocol ----------------------------------------------------------------------------------

    def eval_prompts(self) -> list[Prompt]:
        return list(self._eval)

    def sample(self, split: str, n: int, seed: int) -> list[Prompt]:
        """Train: ``n`` i.i.d. fresh problems outside the eval bucket. Eval: drawn from :meth:`eval_prompts`."""
        check_split(split)
        if split == "eval":
            return draw_from_pool(self._eval, n, seed)
        if n < 0:
            raise TaskError(f"n must be >= 0, got {n}")
        rng = random.Random(f"arithmetic-train-{seed}")
        prompts: list[Prompt] = []
        for _ in range(1000 * n + 1000):
            if len(prompts) == n:
                break
            problem = self._random_problem(rng)
            if not self.is_eval_problem(*problem):
                prompts.append(self.make_prompt(*problem))
        if len(prompts) < n:
            raise TaskError("could not draw train problems outside the eval bucket; raise max_digits")
        return prompts

    def final_answer(self, completion: str) -> str | None:
        """The answer a completion states: its first word, or (scratchpad) the text of its first ``(...)``."""
        if self.scratchpad:
            marker = _MARKER_RE.search(completion)
            return marker[1] if marker else None
        words = completion.split(maxsplit=1)
        return words[0] if words else None

    def reward(self, prompt: Prompt, completion: str) -> float | dict[str, float]:
        stated = self.final_answer(completion)
        correct = 1.0 if stated == prompt.answer else 0.0
        if not self.format_reward:
            return correct
        well_formed = stated is not None and _INTEGER_RE[self.answer_format].fullmatch(stated) is not None
        return {"correct": correct, "format": self.format_reward if well_formed else 0.0}

    def demonstration(self, prompt: Prompt, rng: random.Random) -> str:
        """The answer text (scratchpad: the worked columns and the answer); corrupted with probability
        ``demo_error_rate`` (``rng`` is untouched at rate 0)."""
        a, op, b = self._operands(prompt)
        value = _evaluate(a, op, b)
        corrupt = self.demo_error_rate > 0.0 and op in self.demo_error_ops and rng.random() < self.demo_error_rate
        if self.scratchpad:
            return self._scratchpad_demonstration(a, b, corrupt, rng)
        if corrupt:
            value = self._corrupt(a, op, b, value, rng)
        return self.format_answer(value)

    def solution(self, prompt: Prompt) -> str:
        """The correct completion text (what an uncorrupted demonstration writes)."""
        a, op, b = self._operands(prompt)
        if self.scratchpad:
            return self._scratchpad_text(a, b, ())
        return self.format_answer(_evaluate(a, op, b))

    def _scratchpad_text(self, a: int, b: int, forgotten: Container[int], value: int | None = None) -> str:
        columns, spelled = column_addition(a, b, forgotten)
        return " ".join(columns) + f" ({self.format_answer(spelled if value is None else value)})"

    def _scratchpad_demonstration(self, a: int, b: int, corrupt: bool, rng: random.Random) -> str:
        if not corrupt:
            return self._scratchpad_text(a, b, ())
        if self.demo_error == "off_by_one":
            return self._scratchpad_text(a, b, (), value=self._corrupt(a, "+", b, a + b, rng))
        if self.demo_error == "ignore_carries":
            return self._scratchpad_text(a, b, range(max(len(str(a)), len(str(b)))))
        columns = [k for k, carry in enumerate(column_carries(a, "+", b)) if carry]  # drop_carry
        return self._scratchpad_text(a, b, {rng.choice(columns)} if columns else ())

    # demonstrations ---------------------------------------------------------------------------------

    def _corrupt(self, a: int, op: str, b: int, value: int, rng: random.Random) -> int:
        if self.demo_error == "off_by_one":
            if value == 0 and not self.allow_negative:
                return 1
            return value + rng.choice((-1, 1))
        if self.demo_error == "ignore_carries" and op in "+-":
            return _ignore_carries(a, op, b)
        carries = column_carries(a, op, b)
        columns = [k for k, carry in enumerate(carries) if carry]
        if not columns:
            return value
        k = rng.choice(columns)
        if op == "-":  # the borrow is forgotten: the magnitude |a - b| grows by 10^(k+1)
            magnitude = abs(value) + 10 ** (k + 1)
            return magnitude if a >= b else -magnitude
        return value - carries[k] * 10 ** (k + 1)

    @staticmethod
    def _operands(prompt: Prompt) -> tuple[int, str, int]:
        if {"a", "op", "b"} <= prompt.meta.keys():
            return prompt.meta["a"], prompt.meta["op"], prompt.meta["b"]
        match = _PROBLEM_RE.match(prompt.text)
        if match is None:
            raise TaskError(
                f"prompt {prompt.id!r} text {prompt.text!r} is not an arithmetic problem like '47+38='"
            )
        return int(match[1]), match[2], int(match[3])

    @staticmethod
    def needs_carry(prompt: Prompt) -> bool:
        """True when computing the answer by hand needs a carry (+, *) or a borrow (-)."""
        a, op, b = ArithmeticTask._operands(prompt)
        return any(column_carries(a, op, b))
