"""The stability lab's collapse definition and per-cell metrics, computed from a run's ``metrics.jsonl`` rows.

Everything here is plain Python on lists of numbers (no torch), so the definition can be read, tested on
hand-made curves and applied to any run directory after the fact. docs/stability-lab.md explains the choices.

A run (one cell of the map) **collapsed** when any of these holds:

    accuracy   final held-out accuracy  a_T < max(acc_rel · a_0, a_0 − acc_drop)        (0.5, 0.2)
    numerical  a non-finite reward / loss / entropy / gradient norm in a training row, or more than
               skipped_frac_max of the RL steps skipped an optimizer step for a non-finite gradient
    entropy    last-window mean entropy H_T > max(entropy_ratio_max · H_0, entropy_abs_max)   (blow-up: gibberish)
               or H_T < entropy_floor while a_T ≤ a_0                                    (frozen without progress)
    length     final held-out completion length < len_ratio_min · start length           (answers shrink to nothing)
               or last-window rollout/truncated_frac > truncated_max, the first window's not  (run-on, no EOS)

a_0 is the held-out accuracy before RL and a_T the last one; H_0 and H_T are means over the first and last
``window`` training rows. The accuracy rule is the primary one: it is what a user loses. The others catch a
run that is about to lose it (or whose eval is too small to say) and name the failure mode.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

PRIMARY_EVAL = "eval/accuracy"
# Fractions of tokens a method leaves out of its gradient (masks / rejections), by method.
REJECTION_KEYS = (
    "capo/rejected_frac",
    "dppo/masked_frac",
    "minirl/masked_frac",
    "mismatch/masked_frac",
    "clipcov/selected_frac",
    "klcov/selected_frac",
)
NUMERIC_KEYS = ("reward/mean", "policy/loss", "policy/entropy", "grad/norm")


@dataclass(frozen=True)
class CollapseCriteria:
    """Thresholds of the collapse definition (module docstring); the defaults are the lab's."""

    acc_rel: float = 0.5
    """Collapsed when the final accuracy is below acc_rel × start ..."""
    acc_drop: float = 0.2
    """... or below start − acc_drop; the threshold is the larger of the two (the milder test)."""
    entropy_ratio_max: float = 4.0
    """Entropy blow-up: last-window entropy above this multiple of the first window's ..."""
    entropy_abs_max: float = 1.0
    """... and above this many nats / token."""
    entropy_floor: float = 0.01
    """Frozen policy: last-window entropy below this (nats / token) with no accuracy gain."""
    len_ratio_min: float = 0.5
    """Held-out completion length below this fraction of its start."""
    truncated_max: float = 0.5
    """Last-window fraction of rollouts that hit max_new_tokens."""
    skipped_frac_max: float = 0.1
    """Fraction of RL steps whose optimizer step was skipped (non-finite gradient)."""
    window: int = 5
    """Training rows averaged for the first / last window."""
    target_gain: float = 0.2
    """Sample-efficiency target: start accuracy + target_gain (0.51 → 0.71 on the embedded model, whose stable
    runs end near 0.85: a target +0.15 was met at the first eval by nearly every stable run)."""


@dataclass(frozen=True)
class Verdict:
    collapsed: bool
    reasons: tuple[str, ...] = ()
    dipped: bool = False
    """Some eval fell below the accuracy threshold (a collapse that recovered when not ``collapsed``)."""


@dataclass
class RunCurves:
    """A run's series, split out of ``metrics.jsonl`` rows (eval rows carry ``eval/*`` keys only)."""

    train: list[dict[str, float]] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_acc: list[float] = field(default_factory=list)
    eval_len: list[float] = field(default_factory=list)

    @classmethod
    def from_rows(cls, rows: Sequence[dict[str, Any]]) -> RunCurves:
        curves = cls()
        for row in rows:
            if PRIMARY_EVAL in row:
                curves.eval_steps.append(int(row["step"]))
                curves.eval_acc.append(float(row[PRIMARY_EVAL]))
                curves.eval_len.append(float(row.get("eval/len_mean", math.nan)))
            elif "reward/mean" in row:
                curves.train.append(row)
        return curves

    def series(self, key: str) -> list[float]:
        return [float(r[key]) if r.get(key) is not None else math.nan for r in self.train]


def _is_finite_number(value: Any) -> bool:
    return value is not None and math.isfinite(float(value))


def _finite(values: Sequence[float]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def _mean(values: Sequence[float]) -> float:
    good = _finite(values)
    return sum(good) / len(good) if good else math.nan


def accuracy_threshold(start: float, criteria: CollapseCriteria = CollapseCriteria()) -> float:
    """max(acc_rel · a_0, a_0 − acc_drop): e.g. a_0 = 0.52 → max(0.26, 0.32) = 0.32."""
    return max(criteria.acc_rel * start, start - criteria.acc_drop)


def collapse_verdict(curves: RunCurves, steps: int, criteria: CollapseCriteria = CollapseCriteria()) -> Verdict:
    """Apply the collapse definition (module docstring) to one run; ``steps`` = RL steps the run was asked for."""
    reasons: list[str] = []
    dipped = False
    if curves.eval_acc:
        start, final = curves.eval_acc[0], curves.eval_acc[-1]
        threshold = accuracy_threshold(start, criteria)
        dipped = any(a < threshold or not math.isfinite(a) for a in curves.eval_acc[1:])
        if not math.isfinite(final) or final < threshold:
            reasons.append(f"accuracy {final:.3f} < {threshold:.3f}")
        start_len, final_len = curves.eval_len[0], curves.eval_len[-1]
        if math.isfinite(start_len) and math.isfinite(final_len) and final_len < criteria.len_ratio_min * start_len:
            reasons.append(f"eval length {final_len:.2f} < {criteria.len_ratio_min} x {start_len:.2f}")
    for key in NUMERIC_KEYS:
        bad = [r["step"] for r in curves.train if key in r and not _is_finite_number(r[key])]
        if bad:
            reasons.append(f"non-finite {key} at step {int(bad[0])}")
    skipped = _finite(curves.series("train/skipped_steps"))
    if skipped and steps > 0 and skipped[-1] / steps > criteria.skipped_frac_max:
        reasons.append(f"{int(skipped[-1])} of {steps} steps skipped")
    entropy = curves.series("policy/entropy")
    w = max(1, criteria.window)
    if len(_finite(entropy)) >= 2:
        first, last = _mean(entropy[:w]), _mean(entropy[-w:])
        if last > max(criteria.entropy_ratio_max * first, criteria.entropy_abs_max):
            reasons.append(f"entropy blow-up {first:.3f} -> {last:.3f}")
        no_gain = not curves.eval_acc or curves.eval_acc[-1] <= curves.eval_acc[0]
        if last < criteria.entropy_floor and no_gain:
            reasons.append(f"entropy {last:.4f} < floor {criteria.entropy_floor} without accuracy gain")
    truncated = curves.series("rollout/truncated_frac")
    # a policy that never ended its answers from the start (an untrained model) did not collapse into it
    became_run_on = _finite(truncated) and _mean(truncated[:w]) <= criteria.truncated_max
    if became_run_on and _mean(truncated[-w:]) > criteria.truncated_max:
        reasons.append(f"truncated fraction {_mean(truncated[-w:]):.2f} > {criteria.truncated_max}")
    return Verdict(bool(reasons), tuple(reasons), dipped)


def completions_to_target(
    eval_steps: Sequence[int], eval_acc: Sequence[float], completions_per_step: int, target: float
) -> int | None:
    """Completions sampled before the first held-out eval with accuracy ≥ ``target``: step · P · G.

    The resolution is the eval interval; None when the target is never reached. A run whose start already
    meets the target needs 0.
    """
    for step, acc in zip(eval_steps, eval_acc):
        if math.isfinite(acc) and acc >= target:
            return int(step) * completions_per_step
    return None


def roughness(values: Sequence[float], scale: float = 1.0) -> float:
    """Mean absolute first difference of a series, over consecutive finite pairs, divided by ``scale``:

        R = (1 / (n − 1)) Σ_t |x_t − x_{t−1}| / scale

    For reward/mean with 0/1 rewards ``scale`` = 1 (the reward range). NaN when fewer than two finite values.
    """
    diffs = [
        abs(b - a) for a, b in zip(values[:-1], values[1:]) if a is not None and b is not None and math.isfinite(a) and math.isfinite(b)
    ]
    return sum(diffs) / len(diffs) / scale if diffs else math.nan


def mean_fractions(curves: RunCurves) -> dict[str, float]:
    """Mean over RL steps of the clip fraction (low + high) and of every rejection / mask fraction logged."""
    out: dict[str, float] = {}
    low, high = curves.series("ratio/clip_frac_low"), curves.series("ratio/clip_frac_high")
    if _finite(low) or _finite(high):
        out["clip_frac"] = _mean([(a if math.isfinite(a) else 0.0) + (b if math.isfinite(b) else 0.0) for a, b in zip(low, high)])
    for key in REJECTION_KEYS:
        values = _finite(curves.series(key))
        if values:
            out[key] = sum(values) / len(values)
    rejected = [out[k] for k in REJECTION_KEYS if k in out]
    out["rejected_frac"] = max(rejected) if rejected else 0.0
    return out


def cell_metrics(
    rows: Sequence[dict[str, Any]],
    *,
    steps: int,
    completions_per_step: int,
    criteria: CollapseCriteria = CollapseCriteria(),
) -> dict[str, Any]:
    """Everything the map reports for one run, as a JSON-ready dict (see docs/stability-lab.md)."""
    curves = RunCurves.from_rows(rows)
    verdict = collapse_verdict(curves, steps, criteria)
    start = curves.eval_acc[0] if curves.eval_acc else math.nan
    target = start + criteria.target_gain
    entropy = curves.series("policy/entropy")
    w = max(1, criteria.window)
    rollbacks = _finite(curves.series("guard/rollbacks"))
    lr_scale = _finite(curves.series("guard/lr_scale"))
    return {
        "collapsed": verdict.collapsed,
        "collapse_reasons": list(verdict.reasons),
        "dipped": verdict.dipped,
        "start_acc": start,
        "final_acc": curves.eval_acc[-1] if curves.eval_acc else math.nan,
        "best_acc": max(_finite(curves.eval_acc), default=math.nan),
        "target_acc": target,
        "completions_to_target": completions_to_target(curves.eval_steps, curves.eval_acc, completions_per_step, target),
        "roughness": roughness(curves.series("reward/mean")),
        "entropy_start": _mean(entropy[:w]),
        "entropy_final": _mean(entropy[-w:]),
        "steps_done": len(curves.train),
        "skipped_steps": int(max(_finite(curves.series("train/skipped_steps")), default=0)),
        "rollbacks": int(rollbacks[-1]) if rollbacks else 0,
        "lr_scale": lr_scale[-1] if lr_scale else 1.0,
        **mean_fractions(curves),
        "curve": {
            "eval_steps": curves.eval_steps,
            "eval_acc": curves.eval_acc,
            "reward": curves.series("reward/mean"),
            "entropy": entropy,
        },
    }
