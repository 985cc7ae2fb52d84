"""PNG plots of a run's ``metrics.jsonl`` rows: one figure per panel, noisy curves with an EMA overlay.

Only dense series (a value at nearly every step, i.e. the training metrics) get the EMA; a sparse one (eval
every N steps, retention) is drawn point to point, since an average over evals 10 steps apart lags the
real value by tens of steps (a debiased EMA over 7 evals ending at 0.835 ends near 0.76).

Core panels (skipped and reported as "not logged" when none of their metrics is present):

    reward       reward/mean (± reward/std band)
    accuracy     held-out eval/accuracy (greedy), eval/pass@1, eval/pass@k
    entropy      policy/entropy
    grad_norm    grad/norm (log scale when it spans decades)
    clip_frac    ratio/clip_frac_low, ratio/clip_frac_high
    mismatch_kl  mismatch/kl_k1, mismatch/kl_k3 (and mismatch/kl)

Every other numeric metric goes to an "extras" figure per namespace (``extras_kl.png``, ``extras_capo.png``,
``extras_pcr.png`` ...), one small subplot per metric.

matplotlib is imported lazily and used through ``Figure`` + ``FigureCanvasAgg`` directly: no pyplot, no
global backend switch, so calling this from a notebook or a thread changes nothing else.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

NON_METRIC_KEYS = frozenset({"step", "wall_s"})


@dataclass(frozen=True)
class Panel:
    name: str  # file stem of the PNG
    title: str
    pattern: str  # regex (fullmatch) over metric names
    ylabel: str = ""
    smooth: bool = True  # raw faint + EMA; False for sparse eval curves
    band: str | None = None  # metric drawn as ± band around the first series (reward/std)
    log_y: bool = False  # log scale when all values are > 0 and span two decades

    def keys(self, available: Sequence[str]) -> list[str]:
        return sorted(k for k in available if re.fullmatch(self.pattern, k))


CORE_PANELS: tuple[Panel, ...] = (
    Panel("reward", "Reward", r"reward/mean", "mean reward", band="reward/std"),
    Panel("accuracy", "Held-out accuracy", r"eval/(accuracy|pass@\d+)", "accuracy", smooth=False),
    Panel("entropy", "Policy entropy", r"policy/entropy", "nats / token"),
    Panel("grad_norm", "Gradient norm", r"grad/norm", "‖g‖ before clipping", log_y=True),
    Panel("clip_frac", "Clip fractions", r"ratio/clip_frac_(low|high)", "fraction of tokens"),
    Panel("mismatch_kl", "Rollout-trainer mismatch KL", r"mismatch/kl(_k\d)?", "KL(μ‖π_old)"),
)


@dataclass
class PlotFile:
    name: str  # file stem
    title: str
    path: Path
    keys: list[str]
    wide: bool = False  # a grid of subplots: the report gives it the page's full width


@dataclass
class PlotResult:
    files: list[PlotFile] = field(default_factory=list)
    not_logged: list[tuple[str, str]] = field(default_factory=list)  # (panel title, reason)


def ema(values: Sequence[float], smoothing: float = 0.9) -> list[float]:
    """Debiased exponential moving average, as TensorBoard draws it.

        mₙ = s·mₙ₋₁ + (1 − s)·xₙ,  m₀ = 0;   smoothedₙ = mₙ / (1 − sⁿ)

    where n counts finite values only. A non-finite xₙ gives NaN at that position and leaves the average
    untouched, so one bad step does not poison the rest of the curve. ``smoothing=0`` returns the input.
    """
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}.")
    out: list[float] = []
    average, count = 0.0, 0
    low, high = math.inf, -math.inf
    for x in values:
        if not math.isfinite(x):
            out.append(float("nan"))
            continue
        count += 1
        low, high = min(low, x), max(high, x)
        average = smoothing * average + (1.0 - smoothing) * x
        # The result is a convex combination of the values seen; clamping removes rounding jitter
        # (a constant series stays exactly constant instead of wobbling in the last bit).
        out.append(min(max(average / (1.0 - smoothing**count), low), high))
    return out


def _as_float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def numeric_keys(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Metric names that hold a number (or null/NaN) in at least one row; ``step`` and ``wall_s`` excluded."""
    keys: set[str] = set()
    for row in rows:
        for key, value in row.items():
            if key not in NON_METRIC_KEYS and (value is None or _as_float(value) is not None):
                keys.add(key)
    return sorted(keys)


def metric_series(rows: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the rows that carry ``key``; null / NaN / ±inf become NaN."""
    steps: list[int] = []
    values: list[float] = []
    for row in rows:
        if key not in row or "step" not in row:
            continue
        x = _as_float(row[key])
        steps.append(int(row["step"]))
        values.append(x if x is not None and math.isfinite(x) else float("nan"))
    return steps, values


def _has_finite(values: Sequence[float]) -> bool:
    return any(math.isfinite(v) for v in values)


def _new_figure(
    nrows: int = 1, ncols: int = 1, width: float = 6.4, height: float = 3.6, title_in: float = 0.45
):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    # Fixed margins instead of a layout engine: constrained layout costs more than the drawing itself.
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.flat:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are integers
    top = 1.0 - title_in / height  # room for the (sup)title
    fig.subplots_adjust(left=0.95 / width, right=0.97, bottom=0.5 / height, top=top, hspace=0.55, wspace=0.3)
    return fig, [ax for row in axes for ax in row]


DENSE_FRACTION = 0.9
"""A series is dense, and gets an EMA overlay, when it has a value at this fraction of the steps it spans."""


def is_dense(steps: Sequence[int]) -> bool:
    """Whether ``steps`` covers at least DENSE_FRACTION of the integer steps from its first to its last."""
    distinct = set(steps)
    if len(distinct) < 3:
        return False
    return len(distinct) >= DENSE_FRACTION * (max(distinct) - min(distinct) + 1)


def _draw_series(ax, steps, values, *, label: str, color: str, smooth: bool, smoothing: float) -> None:
    sparse = len(steps) <= 20
    marker = "o" if sparse else None
    if smooth and is_dense(steps):
        ax.plot(steps, values, color=color, alpha=0.3, linewidth=1.0, marker=marker, markersize=3)
        ax.plot(
            steps, ema(values, smoothing), color=color, linewidth=1.8, label=f"{label} (EMA {smoothing:g})"
        )
    else:
        ax.plot(steps, values, color=color, linewidth=1.5, marker=marker or ".", markersize=5, label=label)


def _finish_axes(ax, steps: Sequence[int]) -> None:
    if steps and max(steps) - min(steps) < 2:  # one or two steps: a readable integer x range
        ax.set_xlim(min(steps) - 1, max(steps) + 1)
    if ax.get_yscale() == "linear":
        ax.ticklabel_format(axis="y", useOffset=False)
    ax.grid(True, alpha=0.3)


def _maybe_log_scale(ax, series: list[list[float]]) -> None:
    finite = [v for values in series for v in values if math.isfinite(v)]
    if finite and min(finite) > 0 and max(finite) / min(finite) > 100:
        ax.set_yscale("log")


def _plot_panel(panel: Panel, rows, keys: list[str], path: Path, smoothing: float) -> None:
    fig, (ax,) = _new_figure()
    colors = [f"C{i}" for i in range(10)]
    drawn: list[list[float]] = []
    all_steps: list[int] = []
    for i, key in enumerate(keys):
        steps, values = metric_series(rows, key)
        all_steps += steps
        _draw_series(
            ax, steps, values, label=key, color=colors[i % 10], smooth=panel.smooth, smoothing=smoothing
        )
        drawn.append(values)
        if i == 0 and panel.band is not None:
            _draw_band(ax, rows, key, panel.band, colors[0])
    if panel.log_y:
        _maybe_log_scale(ax, drawn)
    ax.set_title(panel.title)
    ax.set_xlabel("step")
    ax.set_ylabel(panel.ylabel)
    _finish_axes(ax, all_steps)
    ax.legend(fontsize="small")
    fig.savefig(path, dpi=100)


def _draw_band(ax, rows, key: str, band_key: str, color: str) -> None:
    steps, lows, highs = [], [], []
    for row in rows:
        mean, spread = _as_float(row.get(key)), _as_float(row.get(band_key))
        if mean is None or spread is None or not (math.isfinite(mean) and math.isfinite(spread)):
            continue
        steps.append(int(row["step"]))
        lows.append(mean - spread)
        highs.append(mean + spread)
    if len(steps) >= 2:
        ax.fill_between(steps, lows, highs, color=color, alpha=0.12, linewidth=0, label=f"± {band_key}")


def _plot_group(title: str, rows, keys: list[str], path: Path, smoothing: float) -> None:
    ncols = min(3, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig, axes = _new_figure(nrows, ncols, width=4.0 * ncols, height=2.8 * nrows, title_in=0.75)
    for ax, key in zip(axes, keys):
        steps, values = metric_series(rows, key)
        _draw_series(ax, steps, values, label=key, color="C0", smooth=True, smoothing=smoothing)
        ax.set_title(key, fontsize="medium")
        ax.set_xlabel("step", fontsize="small")
        _finish_axes(ax, steps)
    for ax in axes[len(keys) :]:
        ax.set_visible(False)
    fig.suptitle(title)
    fig.savefig(path, dpi=100)


def _file_stem(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or "other"


def make_plots(rows: Sequence[dict[str, Any]], out_dir: str | Path, *, smoothing: float = 0.9) -> PlotResult:
    """Write one PNG per core panel with data and one per extra namespace into ``out_dir``.

    A panel none of whose metrics is present, or whose metrics hold no finite value, is not drawn and
    appears in ``PlotResult.not_logged`` with the reason.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = PlotResult()
    available = numeric_keys(rows)
    used: set[str] = set()
    for panel in CORE_PANELS:
        keys = panel.keys(available)
        used.update(keys)
        if panel.band is not None and panel.band in available and keys:
            used.add(panel.band)
        finite_keys = [k for k in keys if _has_finite(metric_series(rows, k)[1])]
        if not keys:
            result.not_logged.append((panel.title, "not logged"))
            continue
        if not finite_keys:
            result.not_logged.append((panel.title, "logged, but no finite value"))
            continue
        path = out_dir / f"{panel.name}.png"
        _plot_panel(panel, rows, finite_keys, path, smoothing)
        result.files.append(PlotFile(panel.name, panel.title, path, finite_keys))

    groups: dict[str, list[str]] = {}
    for key in available:
        if key not in used:
            groups.setdefault(key.split("/", 1)[0] if "/" in key else "other", []).append(key)
    for group, keys in sorted(groups.items()):
        finite_keys = [k for k in keys if _has_finite(metric_series(rows, k)[1])]
        title = f"Extras: {group}/"
        if not finite_keys:
            result.not_logged.append((title, "logged, but no finite value"))
            continue
        name = f"extras_{_file_stem(group)}"
        path = out_dir / f"{name}.png"
        _plot_group(title, rows, finite_keys, path, smoothing)
        result.files.append(PlotFile(name, title, path, finite_keys, wide=len(finite_keys) > 1))
    return result
