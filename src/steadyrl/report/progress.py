"""Live progress over RL steps with the few numbers worth watching: a tqdm bar on a terminal, one plain line
per step when the output is a file or a pipe (a batch job's log gets no ``\\r`` frames).

Keys (each shown once its metric has been logged; the last finite-or-not value is kept):

    rew       reward/mean
    acc       eval/accuracy, else eval/pass@1 (eval steps only)
    ent       policy/entropy
    kl        kl/ref_k3: the KL penalty's estimate of KL(π_θ ‖ π_ref) (only when kl.coef > 0)
    mismatch  mismatch/kl_k3: k3 KL between the sampler's and the trainer's log-probs of the same tokens
              (train-inference mismatch; ~1e-13 when both are the same fp32 model, not a KL to a reference)
    s/it      perf/step_s

Modes: ``bar=True`` a tqdm bar, ``bar=False`` a plain line per step, ``bar=None`` (default) the bar when the
stream is a terminal, else lines. ``steps=False`` prints no per-step output at all (``logging.progress:
false``) but still prints the lines given to ``write`` (eval results). Only rank 0 reports: build it with
``enabled=False`` elsewhere and every call is silent.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

# short key -> metric names in order of preference
POSTFIX_SOURCES: dict[str, tuple[str, ...]] = {
    "rew": ("reward/mean",),
    "acc": ("eval/accuracy", "eval/pass@1"),
    "ent": ("policy/entropy",),
    "kl": ("kl/ref_k3",),
    "mismatch": ("mismatch/kl_k3",),
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


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class ProgressBar:
    """``update(step, metrics)`` moves the bar to ``step`` (or prints the step's line) and refreshes the keys.

    Args:
        total_steps: the run's last step.
        enabled: False = silent (non-zero ranks).
        initial: the step a resumed run starts from.
        bar: True a tqdm bar, False plain lines, None the bar only when ``stream`` is a terminal.
        steps: False = no per-step output (logging.progress off); ``write`` still prints.
        stream: where to write (default sys.stderr, looked up when the bar is built).
    """

    def __init__(
        self,
        total_steps: int,
        *,
        enabled: bool = True,
        initial: int = 0,
        desc: str = "train",
        bar: bool | None = None,
        steps: bool = True,
        stream: TextIO | None = None,
    ) -> None:
        self.enabled = enabled
        self.total_steps = total_steps
        self.stream = stream if stream is not None else sys.stderr
        self._postfix: dict[str, str] = {}
        self._bar = None
        self._lines = False
        self._initial = initial
        self._started = time.monotonic()
        if not enabled or not steps:
            return
        if bar is None:
            bar = _is_terminal(self.stream)
        if bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=total_steps,
                initial=initial,
                desc=desc,
                unit="step",
                dynamic_ncols=True,
                file=self.stream,
            )
        else:
            self._lines = True

    def update(self, step: int, metrics: Mapping[str, Any] | None = None) -> None:
        new = postfix_from_metrics(metrics or {})
        self._postfix.update(new)
        if self._bar is not None:
            self._bar.n = int(step)
            # set_postfix refreshes the bar, so the new position is drawn too.
            self._bar.set_postfix(self._ordered(), refresh=True)
        elif self._lines:
            self._print(self.line(step))

    def _ordered(self) -> dict[str, str]:
        return {k: self._postfix[k] for k in POSTFIX_SOURCES if k in self._postfix}

    def line(self, step: int) -> str:
        """The plain line of ``step``: ``step 12/60  rew=0.41 ent=1.2 mismatch=1e-13 s/it=0.52  [0:06 elapsed,
        ~0:25 left]`` (the time left extrapolates the steps run in this process)."""
        keys = " ".join(f"{k}={v}" for k, v in self._ordered().items())
        elapsed = time.monotonic() - self._started
        done = int(step) - self._initial
        left = elapsed / done * (self.total_steps - int(step)) if done > 0 else None
        timing = f"[{_clock(elapsed)} elapsed" + (f", ~{_clock(left)} left]" if left is not None else "]")
        return "  ".join(part for part in (f"step {int(step)}/{self.total_steps}", keys, timing) if part)

    @property
    def postfix(self) -> dict[str, str]:
        """The short-key values shown now (for tests and for a final log line)."""
        return dict(self._postfix)

    def write(self, msg: str) -> None:
        """Print a line (above the bar, without breaking it, when there is one)."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(msg, file=self.stream)
        else:
            self._print(msg)

    def _print(self, msg: str) -> None:
        print(msg, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._lines = False

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
