"""Run reports: ``RUN_DIR/report/{index.html, summary.md, *.png}`` from the files a run leaves behind.

Inputs (each optional; a missing one is said so in the report rather than failing):
    metrics.jsonl   rows of scalar metrics (see ``report.sinks``)
    summary.json    {"steps", "wall_s", "eval_start", "eval_end", ...}; nested dicts are flattened a.b
    config.yaml     the resolved config, shown verbatim
    guard.jsonl     the stability guard's rollbacks and alarms (listed) and snapshots (counted)
    samples.jsonl   a few held-out completions with their rewards per eval (first and last eval shown)

The page opens with a headline, e.g. "accuracy 0.500 → 0.835 in 60 steps", and uses the window's width.

``index.html`` is one self-contained page (inline CSS, no scripts, images by relative path), so the whole
``report/`` folder can be copied or served as is.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from steadyrl.report.plots import PlotResult, make_plots, metric_series, numeric_keys
from steadyrl.report.sinks import read_metrics, read_samples

REPORT_DIR = "report"

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 1.5em 2em; color: #222; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
.meta { color: #666; font-size: 0.9em; }
.headline { font-size: 1.35em; margin: 0.4em 0 0.8em; }
.banner { background: #fde8e8; border: 1px solid #c0392b; padding: 0.6em 0.9em; margin: 0.6em 0; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f5f5f5; }
.plots { display: grid; grid-template-columns: repeat(auto-fill, minmax(520px, 1fr)); gap: 1em; }
figure { margin: 0; } figure img { width: 100%; height: auto; border: 1px solid #eee; }
figure.wide { grid-column: 1 / -1; } figure.wide img { width: auto; max-width: 100%; }
td.text { font-family: ui-monospace, Menlo, Consolas, monospace; white-space: pre-wrap; }
figcaption { font-size: 0.85em; color: #555; }
pre { background: #f7f7f7; padding: 1em; overflow-x: auto; font-size: 0.85em; border: 1px solid #eee; }
.missing { color: #999; }
"""


def _format(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list | tuple):
        return json.dumps(value)
    return str(value)


def flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists and scalars are kept as they are."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, prefix=f"{name}."))
        else:
            flat[name] = value
    return flat


def metric_overview(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per metric: rows carrying it, first / last / min / max finite value (NaN when it has none)."""
    overview = []
    for key in numeric_keys(rows):
        steps, values = metric_series(rows, key)
        finite = [v for v in values if math.isfinite(v)]
        nan = float("nan")
        overview.append(
            {
                "metric": key,
                "rows": len(values),
                "non_finite": len(values) - len(finite),
                "first": finite[0] if finite else nan,
                "last": finite[-1] if finite else nan,
                "min": min(finite) if finite else nan,
                "max": max(finite) if finite else nan,
                "last_step": steps[-1] if steps else None,
            }
        )
    return overview


def _read_summary(run_dir: Path) -> tuple[dict[str, Any], str | None]:
    path = run_dir / "summary.json"
    if not path.exists():
        return {}, "summary.json not found (the run may still be going, or it crashed)."
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        return {}, f"summary.json is not valid JSON ({err.msg})."
    if not isinstance(summary, dict):
        return {}, "summary.json does not hold a JSON object."
    return summary, None


def _read_config(run_dir: Path) -> str | None:
    path = run_dir / "config.yaml"
    return path.read_text(encoding="utf-8") if path.exists() else None


_OVERVIEW_COLUMNS = ("metric", "rows", "non_finite", "first", "last", "min", "max")


def headline(summary: dict[str, Any], rows: Sequence[dict[str, Any]]) -> str | None:
    """"accuracy 0.500 → 0.835 in 60 steps": the primary held-out metric before and after training, from
    summary.json, else from the first and last eval rows of metrics.jsonl; None when no eval ran."""
    name = summary.get("eval_metric")
    start, end = _as_number(summary.get("eval_start")), _as_number(summary.get("eval_end"))
    steps = summary.get("steps")
    if start is None or end is None:
        keys = numeric_keys(rows)
        name = next((k for k in ("eval/accuracy", "eval/pass@1") if k in keys), None)
        if name is None:
            return None
        points = [(s, v) for s, v in zip(*metric_series(rows, name)) if math.isfinite(v)]
        if not points:
            return None
        (first_step, start), (steps, end) = points[0], points[-1]
        if steps == first_step:
            return f"{name.removeprefix('eval/')} {start:.3f} at step {steps}"
    label = (name or "eval/accuracy").removeprefix("eval/")
    return f"{label} {start:.3f} → {end:.3f} in {steps} steps"


def _as_number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def failure_banner(summary: dict[str, Any]) -> list[str]:
    """A banner above everything when the run failed (summary.json's verdict) or warned along the way."""
    verdict, warnings = summary.get("verdict") or {}, summary.get("warnings") or []
    failed = verdict.get("collapsed") or verdict.get("unscorable")
    if not failed and not warnings:
        return []
    head = ("This run failed: " + "; ".join(verdict.get("reasons", [])) + ". The final model was not exported."
            if failed else f"{len(warnings)} warning(s) during the run.")
    items = "".join(f"<li>{html.escape(w)}</li>" for w in warnings[-10:])
    return [f'<div class="banner"><strong>{html.escape(head)}</strong>' + (f"<ul>{items}</ul>" if items else "") + "</div>"]


def read_guard_events(run_dir: Path) -> list[dict[str, Any]]:
    """Lines of RUN_DIR/guard.jsonl (a line cut short by a crash is skipped)."""
    path = run_dir / "guard.jsonl"
    if not path.is_file():
        return []
    events = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events


def _guard_section(events: list[dict[str, Any]]) -> list[str]:
    esc = html.escape
    shown = [e for e in events if e.get("event") != "snapshot"]
    snapshots = len(events) - len(shown)
    counts = ", ".join(f"{sum(e.get('event') == k for e in shown)} {k}(s)" for k in ("rollback", "alarm"))
    parts = ["<h2>Stability guard</h2>", f"<p>{esc(counts)}, {snapshots} snapshot(s) (RUN_DIR/guard.jsonl)</p>"]
    if shown:
        columns = ("step", "event", "reasons", "restored_step", "lr", "lr_scale", "clip_scale", "why_no_rollback")
        parts.append("<table><tr>" + "".join(f"<th>{c}</th>" for c in columns) + "</tr>")
        for event in shown:
            cells = []
            for c in columns:
                value = event.get(c, "")
                text = ", ".join(map(str, value)) if isinstance(value, list) else _format(value) if value != "" else ""
                cells.append(f"<td>{esc(text)}</td>")
            parts.append(f"<tr>{''.join(cells)}</tr>")
        parts.append("</table>")
    return parts


def _samples_section(samples: list[dict[str, Any]]) -> list[str]:
    esc = html.escape
    steps = sorted({int(s["step"]) for s in samples if "step" in s})
    parts = ["<h2>Sample completions</h2>"]
    for step in dict.fromkeys([steps[0], steps[-1]]):
        chosen = [s for s in samples if s.get("step") == step]
        kind = "greedy" if all(s.get("greedy") for s in chosen) else "sampled"
        parts.append(f"<h3>eval at step {step} ({kind})</h3>")
        parts.append("<table><tr><th>prompt</th><th>answer</th><th>completion</th><th>reward</th></tr>")
        for s in chosen:
            reward = s.get("reward")
            parts.append(
                f'<tr><td class="text">{esc(str(s.get("prompt", "")))}</td><td class="text">{esc(str(s.get("answer", "")))}'
                f'</td><td class="text">{esc(str(s.get("completion", "")))}</td>'
                f'<td class="num">{esc("unscorable" if reward is None else _format(float(reward)))}</td></tr>'
            )
        parts.append("</table>")
    return parts


def render_html(
    run_dir: Path,
    summary: dict[str, Any],
    summary_note: str | None,
    config_text: str | None,
    overview: list[dict[str, Any]],
    plots: PlotResult,
    *,
    title_line: str | None = None,
    guard_events: list[dict[str, Any]] | None = None,
    samples: list[dict[str, Any]] | None = None,
) -> str:
    """The whole index.html as a string; image paths are relative to the report folder."""
    esc = html.escape
    now = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>steadyrl report: {esc(run_dir.name)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>steadyrl run report: {esc(run_dir.name)}</h1>",
        f'<p class="meta">{esc(str(run_dir))} &middot; generated {esc(now)}</p>',
    ]
    if title_line:
        parts.append(f'<p class="headline">{esc(title_line)}</p>')
    parts += failure_banner(summary)
    parts.append("<h2>Summary</h2>")
    if summary_note:
        parts.append(f'<p class="missing">{esc(summary_note)}</p>')
    if summary:
        parts.append("<table><tr><th>key</th><th>value</th></tr>")
        for key, value in flatten(summary).items():
            parts.append(f'<tr><td>{esc(key)}</td><td class="num">{esc(_format(value))}</td></tr>')
        parts.append("</table>")

    parts.append("<h2>Plots</h2>")
    if plots.files:
        parts.append('<div class="plots">')
        for plot in plots.files:
            caption = esc(", ".join(plot.keys))
            wide = ' class="wide"' if plot.wide else ""
            parts.append(
                f'<figure id="{esc(plot.name)}"{wide}><img src="{esc(plot.path.name)}" alt="{esc(plot.title)}">'
                f"<figcaption>{esc(plot.title)}: {caption}</figcaption></figure>"
            )
        parts.append("</div>")
    else:
        parts.append('<p class="missing">No metric with a finite value was logged.</p>')
    if plots.not_logged:
        parts.append("<h3>Not plotted</h3><ul>")
        for title, reason in plots.not_logged:
            parts.append(f'<li class="missing">{esc(title)}: {esc(reason)}</li>')
        parts.append("</ul>")

    if guard_events:
        parts += _guard_section(guard_events)
    if samples:
        parts += _samples_section(samples)

    parts.append("<h2>Metrics</h2>")
    if overview:
        header = "".join(f"<th>{esc(c)}</th>" for c in _OVERVIEW_COLUMNS)
        parts.append(f"<table><tr>{header}</tr>")
        for item in overview:
            cells = [f"<td>{esc(item['metric'])}</td>"]
            cells += [f'<td class="num">{esc(_format(item[c]))}</td>' for c in _OVERVIEW_COLUMNS[1:]]
            parts.append(f"<tr>{''.join(cells)}</tr>")
        parts.append("</table>")
    else:
        parts.append('<p class="missing">metrics.jsonl is missing or empty.</p>')

    parts.append("<h2>Config</h2>")
    if config_text is None:
        parts.append('<p class="missing">config.yaml not found.</p>')
    else:
        parts.append(f"<pre>{esc(config_text)}</pre>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _md_cell(value: Any) -> str:
    return _format(value).replace("|", "\\|").replace("\n", " ")


def render_markdown(
    run_dir: Path,
    summary: dict[str, Any],
    summary_note: str | None,
    overview: list[dict[str, Any]],
    plots: PlotResult,
    *,
    title_line: str | None = None,
) -> str:
    """A short markdown summary: the summary table, per-metric overview, plot links and what is missing."""
    lines = [f"# steadyrl run report: {run_dir.name}", ""]
    if title_line:
        lines += [f"**{title_line}**", ""]
    if summary_note:
        lines += [f"_{summary_note}_", ""]
    if summary:
        lines += ["| key | value |", "|---|---|"]
        lines += [f"| {_md_cell(k)} | {_md_cell(v)} |" for k, v in flatten(summary).items()]
        lines.append("")
    if overview:
        lines += [
            "## Metrics",
            "",
            "| " + " | ".join(_OVERVIEW_COLUMNS) + " |",
            "|---" * len(_OVERVIEW_COLUMNS) + "|",
        ]
        lines += ["| " + " | ".join(_md_cell(item[c]) for c in _OVERVIEW_COLUMNS) + " |" for item in overview]
        lines.append("")
    if plots.files:
        lines += ["## Plots", ""]
        lines += [f"- [{plot.title}]({plot.path.name})" for plot in plots.files]
        lines.append("")
    if plots.not_logged:
        lines += ["## Not plotted", ""]
        lines += [f"- {title}: {reason}" for title, reason in plots.not_logged]
        lines.append("")
    return "\n".join(lines)


def make_report(run_dir: str | Path, *, smoothing: float = 0.9) -> Path:
    """Write ``RUN_DIR/report/`` (PNGs, index.html, summary.md) and return the path of index.html.

    PNGs left by an earlier report are removed first, so the folder always matches the page.
    """
    run_dir = Path(run_dir).resolve()
    if not run_dir.is_dir():
        raise FileNotFoundError(
            f"run directory {run_dir} does not exist; pass the RUN_DIR of a steadyrl run."
        )
    out_dir = run_dir / REPORT_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*.png"):
        old.unlink()

    rows = read_metrics(run_dir)
    summary, summary_note = _read_summary(run_dir)
    config_text = _read_config(run_dir)
    plots = make_plots(rows, out_dir, smoothing=smoothing)
    overview = metric_overview(rows)
    title_line = headline(summary, rows)

    index = out_dir / "index.html"
    index.write_text(
        render_html(
            run_dir, summary, summary_note, config_text, overview, plots, title_line=title_line,
            guard_events=read_guard_events(run_dir), samples=read_samples(run_dir),
        ),
        encoding="utf-8",
    )
    (out_dir / "summary.md").write_text(
        render_markdown(run_dir, summary, summary_note, overview, plots, title_line=title_line), encoding="utf-8"
    )
    return index
