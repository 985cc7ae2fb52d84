"""A tqdm progress bar over RL steps with the few numbers worth watching live.

Postfix keys (each shown once its metric has been logged; the last finite-or-not value is kept):

    rew   reward/mean
    acc   eval/accuracy, else eval/pass@1 (eval steps only)
    ent   policy/entropy
    kl    kl/ref_k3, else mismatch/kl_k3, else kl/approx_old
    s/it  perf/step_s

Only rank 0 shows a bar: build it with ``enabled=False`` elsewhere and every call is silent.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from typing import Any

# short key -> metric names in order of preference
POSTFIX_SOURCES: dict[str, tuple[str, ...]] = {
    "rew": ("reward/mean",),
    "acc": ("eval/accuracy", "eval/pass@1"),
    "ent": ("policy/entropy",),
    "kl": ("kl/ref_k3", "mismatch/kl_k3", "kl/approx_old"),
    "s/it": ("perf/step_s",),
}


def format_value(value: Any) -> str:
    """Three significant digits; 'nan' / 'inf' / '?' instead of raising."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return "?"
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.3g}"


def postfix_from_metrics(metrics: Mapping[str, Any]) -> dict[str, str]:
    """Short-key postfix for the metrics present in ``metrics`` (missing ones are left out)."""
    postfix: dict[str, str] = {}
    for short, names in POSTFIX_SOURCES.items():
        for name in names:
            if name in metrics:
                postfix[short] = format_value(metrics[name])
                break
    return postfix


class ProgressBar:
    """``update(step, metrics)`` moves the bar to ``step`` and refreshes the postfix.

    Args:
        total_steps: the run's last step.
        enabled: False = silent (non-zero ranks, or logging.progress off).
        initial: the step a resumed run starts from.
    """

    def __init__(
        self, total_steps: int, *, enabled: bool = True, initial: int = 0, desc: str = "train"
    ) -> None:
        self.enabled = enabled
        self._postfix: dict[str, str] = {}
        self._bar = None
        if enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=total_steps,
                initial=initial,
                desc=desc,
                unit="step",
                dynamic_ncols=True,
                file=sys.stderr,
            )

    def update(self, step: int, metrics: Mapping[str, Any] | None = None) -> None:
        if self._bar is None:
            return
        self._postfix.update(postfix_from_metrics(metrics or {}))
        self._bar.n = int(step)
        # set_postfix refreshes the bar, so the new position is drawn too.
        self._bar.set_postfix(
            {k: self._postfix[k] for k in POSTFIX_SOURCES if k in self._postfix}, refresh=True
        )

    @property
    def postfix(self) -> dict[str, str]:
        """The short-key values shown now (for tests and for a final log line)."""
        return dict(self._postfix)

    def write(self, msg: str) -> None:
        """Print a line above the bar without breaking it."""
        if self._bar is None:
            return
        self._bar.write(msg, file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
