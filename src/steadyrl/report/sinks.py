"""Metric sinks: ``metrics.jsonl`` (always), TensorBoard (default on), Weights & Biases (opt-in).

``metrics.jsonl`` is the run's source of truth; plots and reports are made from it alone. One JSON object a
line, ``{"step": int, "wall_s": float, <name>: float | null, ...}``. Eval rows are their own lines (the
trainer logs them with a separate ``log`` call at the same step).

Non-finite values (NaN, ±inf) are written as JSON ``null``, so every line is valid strict JSON that any
reader (``jq``, pandas, a browser) accepts; ``read_metrics`` turns ``null`` back into ``float('nan')``.
The sign of an infinity is lost on purpose: for a diagnostic, "not a finite number" is what matters.

``samples.jsonl`` holds a few held-out completions per eval, one JSON object a line: ``{"step", "prompt",
"answer", "completion", "reward" (null when unscorable), "greedy"}`` (``MetricLogger.log_samples``).

Only rank 0 writes: build the logger with ``enabled=False`` on every other rank and it touches no file.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from steadyrl._io import atomic_write_text
from steadyrl.config import ConfigError

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"
TB_DIR = "tb"

_warned_no_tensorboard = False


def _to_float(name: str, value: Any) -> float:
    try:
        return float(value)  # float, int, bool, numpy scalar, 0-d tensor
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"metric {name!r} must be a number (or a 0-d tensor), got {type(value).__name__}."
        ) from err


def _json_value(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _parse_lines(text: str, path: Path) -> list[dict[str, Any]]:
    lines = text.split("\n")
    complete, tail = lines[:-1], lines[-1]  # ``tail`` is "" when the file ends with a newline
    rows: list[dict[str, Any]] = []
    for number, line in enumerate(complete, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{path}:{number} is not valid JSON ({err.msg}); the metrics file is corrupt."
            ) from err
    if tail.strip():
        with contextlib.suppress(json.JSONDecodeError):  # a line cut short by a crash mid-write
            rows.append(json.loads(tail))
    return rows


def require_wandb() -> None:
    """Raise ConfigError, before anything is loaded, when W&B logging is asked for but wandb is missing."""
    loaded = sys.modules.get("wandb", False)
    if loaded is None or (loaded is False and importlib.util.find_spec("wandb") is None):
        raise ConfigError(
            "logging.wandb_project is set but wandb is not installed; run `pip install wandb` (or "
            "`pip install steadyrl[wandb]`), or remove logging.wandb_project."
        )


def read_samples(run_dir: str | Path) -> list[dict[str, Any]]:
    """Rows of ``RUN_DIR/samples.jsonl`` in file order; ``[]`` when the file does not exist."""
    path = Path(run_dir) / SAMPLES_FILE
    return _parse_lines(path.read_text(encoding="utf-8"), path) if path.exists() else []


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """Rows of ``RUN_DIR/metrics.jsonl`` in file order; ``[]`` when the file does not exist.

    ``null`` values come back as ``float('nan')``; ``step`` stays an int. A truncated last line (the process
    died while writing it) is ignored; a malformed line anywhere else is an error naming the line.
    """
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    rows = _parse_lines(path.read_text(encoding="utf-8"), path)
    for row in rows:
        for key, value in row.items():
            if value is None:
                row[key] = float("nan")
    return rows


class MetricLogger:
    """Write one row of scalar metrics per ``log`` call to every configured sink.

    Args:
        run_dir: the run directory; ``metrics.jsonl`` and ``tb/`` are created inside it.
        tensorboard: also write TensorBoard scalars to ``RUN_DIR/tb`` (skipped with one warning when
            ``torch.utils.tensorboard`` cannot be imported).
        wandb: keyword arguments for ``wandb.init`` (``{"project": ..., "name": ..., ...}``); None = off.
            ``wandb`` is imported only when this is given.
        enabled: False on non-zero ranks: every call is a no-op and no file is created.
        resume_step: the step a resumed run restarts from. Rows with ``step > resume_step`` are dropped from
            ``metrics.jsonl`` (the file is rewritten atomically), TensorBoard events after it are purged, and
            ``wall_s`` continues from the last kept row.

    ``wall_s`` is the seconds since the logger was created (plus the resumed offset), unless the caller
    passes its own ``wall_s`` in ``metrics``.
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        tensorboard: bool = True,
        wandb: Mapping[str, Any] | None = None,
        enabled: bool = True,
        resume_step: int | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self._closed = False
        self._file = None
        self._tb = None
        self._wandb_run = None
        self._wall_offset = 0.0
        self._start = time.monotonic()
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        self._prepare_file(resume_step)
        self._prepare_samples(resume_step)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        if tensorboard:
            self._tb = self._open_tensorboard(resume_step)
        if wandb is not None:
            self._wandb_run = self._open_wandb(dict(wandb), resume_step)

    # ------------------------------------------------------------------ set-up

    def _prepare_file(self, resume_step: int | None) -> None:
        """Drop rows after ``resume_step`` and any half-written last line, so appends start clean."""
        if not self.path.exists():
            return
        text = self.path.read_text(encoding="utf-8")
        rows = _parse_lines(text, self.path)
        if resume_step is not None:
            rows = [row for row in rows if int(row["step"]) <= resume_step]
            walls = [row["wall_s"] for row in rows if isinstance(row.get("wall_s"), int | float)]
            self._wall_offset = max(walls, default=0.0)
            atomic_write_text(self.path, "".join(json.dumps(row) + "\n" for row in rows))
        elif text and not text.endswith("\n"):
            # Appending to a cut-off line would glue two rows into one corrupt line.
            atomic_write_text(self.path, "".join(json.dumps(row) + "\n" for row in rows))

    def _prepare_samples(self, resume_step: int | None) -> None:
        """Like metrics.jsonl: samples of steps after ``resume_step`` belong to an abandoned attempt."""
        path = self.run_dir / SAMPLES_FILE
        if resume_step is None or not path.exists():
            return
        rows = [row for row in _parse_lines(path.read_text(encoding="utf-8"), path) if int(row["step"]) <= resume_step]
        atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in rows))

    def _open_tensorboard(self, resume_step: int | None):
        global _warned_no_tensorboard
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            if not _warned_no_tensorboard:
                warnings.warn(
                    f"TensorBoard logging skipped: {err}. Install it with `pip install tensorboard`.",
                    stacklevel=3,
                )
                _warned_no_tensorboard = True
            return None
        purge_step = None if resume_step is None else resume_step + 1
        return SummaryWriter(log_dir=str(self.run_dir / TB_DIR), purge_step=purge_step)

    def _open_wandb(self, init_kwargs: dict[str, Any], resume_step: int | None):
        require_wandb()
        import wandb

        init_kwargs.setdefault("dir", str(self.run_dir))
        if resume_step is not None:
            init_kwargs.setdefault("resume", "allow")
        return wandb.init(**init_kwargs)

    # ------------------------------------------------------------------ logging

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Append one row ``{"step", "wall_s", **metrics}`` to every sink; the jsonl file is flushed."""
        if not self.enabled:
            return
        if self._closed:
            raise RuntimeError("MetricLogger.log called after close().")
        if "step" in metrics:
            raise ValueError("'step' is reserved: pass it as the first argument of log(), not in metrics.")
        values = {name: _to_float(name, value) for name, value in metrics.items()}
        wall_s = values.pop("wall_s", self._wall_offset + time.monotonic() - self._start)
        row: dict[str, Any] = {"step": int(step), "wall_s": _json_value(wall_s)}
        row.update((name, _json_value(value)) for name, value in values.items())
        self._file.write(json.dumps(row, allow_nan=False) + "\n")
        self._file.flush()
        if self._tb is not None:
            for name, value in values.items():
                self._tb.add_scalar(name, value, global_step=int(step))
        if self._wandb_run is not None:
            self._wandb_run.log(values, step=int(step))

    def log_samples(self, step: int, samples: list[Mapping[str, Any]]) -> None:
        """Append ``samples`` (dicts of prompt, answer, completion, reward, greedy) to samples.jsonl at ``step``."""
        if not self.enabled or not samples:
            return
        rows = []
        for sample in samples:
            reward = sample.get("reward")
            reward = None if reward is None or not math.isfinite(float(reward)) else float(reward)
            rows.append(json.dumps({"step": int(step), **sample, "reward": reward}, allow_nan=False) + "\n")
        with open(self.run_dir / SAMPLES_FILE, "a", encoding="utf-8") as f:
            f.write("".join(rows))

    def flush(self) -> None:
        if self._file is not None and not self._closed:
            self._file.flush()
            os.fsync(self._file.fileno())
        if self._tb is not None and not self._closed:
            self._tb.flush()

    def close(self) -> None:
        """Flush and close every sink; safe to call twice."""
        if self._closed or not self.enabled:
            self._closed = True
            return
        self.flush()
        self._closed = True
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb_run is not None:
            self._wandb_run.finish()

    def __enter__(self) -> MetricLogger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
