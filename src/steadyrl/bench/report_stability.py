"""The collapse map's report: report.md, report.html (one page), heatmap.png and curves.png from results.jsonl.

    steadyrl bench stability --report-only --out runs/stability-quick      # re-render from results.jsonl

Every number comes from the results rows (bench/stability.py → report/collapse.py). Aggregates are over the
seeds of a (method, lr) pair: final accuracy as mean [min, max], collapses as k/n, completions to target as
the median over the seeds that reached it (with how many did). The "findings" section is computed, not
written: it states the collapse regime of plain GRPO and what every other row did there.
"""

from __future__ import annotations

import html
import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

BASELINE = "grpo"
GUARD = "grpo_guard"


def read_results(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _num(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and value is not None and math.isfinite(value) else math.nan


def _ordered(rows: Sequence[dict[str, Any]], key: str) -> list[Any]:
    seen: list[Any] = []
    for row in rows:
        if row[key] not in seen:
            seen.append(row[key])
    return sorted(seen) if key == "lr" else seen


def aggregate(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, float], dict[str, Any]]:
    """(method, lr) → seeds, collapsed k, errors, final / best accuracy, completions to target (over the runs
    that did not collapse), roughness ..."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["method"], float(row["lr"])), []).append(row)
    out = {}
    for key, cell_rows in groups.items():
        judged = [r for r in cell_rows if r.get("collapsed") is not None]
        finals = [_num(r.get("final_acc")) for r in judged]
        finals = [v for v in finals if not math.isnan(v)]
        # a run that met the target and then collapsed did not reach it in any useful sense
        reached = [r["completions_to_target"] for r in judged if r.get("completions_to_target") is not None and not r.get("collapsed")]

        def mean_of(name: str, rs=judged) -> float:
            values = [_num(r.get(name)) for r in rs]
            values = [v for v in values if not math.isnan(v)]
            return sum(values) / len(values) if values else math.nan

        out[key] = {
            "n": len(cell_rows),
            "judged": len(judged),
            "collapsed": sum(1 for r in judged if r.get("collapsed")),
            "errors": sum(1 for r in cell_rows if r.get("status") == "error"),
            "final_mean": sum(finals) / len(finals) if finals else math.nan,
            "final_min": min(finals, default=math.nan),
            "final_max": max(finals, default=math.nan),
            "best_mean": mean_of("best_acc"),
            "start": mean_of("start_acc"),
            "target": mean_of("target_acc"),
            "reached": len(reached),
            "completions_median": statistics.median(reached) if reached else None,
            "roughness": mean_of("roughness"),
            "clip_frac": mean_of("clip_frac"),
            "rejected_frac": mean_of("rejected_frac"),
            "entropy_final": mean_of("entropy_final"),
            "wall_s": mean_of("wall_s", cell_rows),
            "rollbacks": sum(int(r.get("rollbacks") or 0) for r in cell_rows),
            "cells_with_rollback": sum(1 for r in cell_rows if (r.get("rollbacks") or 0) > 0),
            "steps": sum(int(r.get("steps_done") or 0) for r in cell_rows),
        }
    return out


# ----------------------------------------------------------------------------- findings


def findings(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Plain sentences about the map: GRPO's collapse regime, who held there, sample efficiency, the guard."""
    agg = aggregate(rows)
    methods, lrs = _ordered(rows, "method"), _ordered(rows, "lr")
    lines: list[str] = []
    if BASELINE not in methods:
        return ["No plain GRPO row: the findings compare every method with it, so none are computed."]
    base = {lr: agg[(BASELINE, lr)] for lr in lrs if (BASELINE, lr) in agg}
    collapse_lrs = [lr for lr, a in base.items() if a["judged"] and a["collapsed"] * 2 > a["judged"]]
    stable_lrs = [lr for lr, a in base.items() if a["judged"] and a["collapsed"] == 0]
    if collapse_lrs:
        lines.append(
            "Plain GRPO collapses in most seeds at lr "
            + ", ".join(f"{lr:g} ({base[lr]['collapsed']}/{base[lr]['judged']})" for lr in collapse_lrs)
            + "."
        )
    else:
        lines.append("Plain GRPO does not collapse in most seeds at any learning rate of this map: the grid does "
                     "not reach its collapse regime, so no method can show it holds there.")
    best_lr = max(stable_lrs, key=lambda lr: base[lr]["final_mean"], default=None)
    if best_lr is not None:
        b = base[best_lr]
        cost = f"{b['completions_median']:.0f} completions (median, {b['reached']}/{b['judged']} seeds reached it)" if b["completions_median"] is not None else "never within the run"
        lines.append(f"GRPO's best stable lr is {best_lr:g}: final accuracy {b['final_mean']:.3f}; target "
                     f"{b['target']:.3f} reached after {cost}.")
    for lr in collapse_lrs:
        held, fell = [], []
        for method in methods:
            a = agg.get((method, lr))
            if method == BASELINE or a is None or not a["judged"]:
                continue
            label = f"{method} ({a['collapsed']}/{a['judged']}, final {a['final_mean']:.2f})"
            (fell if a["collapsed"] * 2 > a["judged"] else held).append(label)
        lines.append(f"At lr {lr:g}: held (collapsed in at most half the seeds): {', '.join(held) or 'none'}; "
                     f"collapsed too: {', '.join(fell) or 'none'}.")
        if best_lr is not None and base[best_lr]["completions_median"] is not None:
            ref = base[best_lr]["completions_median"]
            faster = []
            for method in methods:
                a = agg.get((method, lr))
                if method == BASELINE or a is None or a["completions_median"] is None or a["collapsed"] * 2 > a["judged"]:
                    continue
                verdict = "fewer" if a["completions_median"] < ref else ("as many" if a["completions_median"] == ref else "more")
                faster.append(f"{method} {a['completions_median']:.0f} ({verdict}, {a['reached']}/{a['judged']} seeds)")
            lines.append(f"Completions to target at lr {lr:g} vs GRPO's {ref:.0f} at lr {best_lr:g}: "
                         f"{', '.join(faster) or 'no method that held reached the target'}.")
    if GUARD in methods:
        stable_cells = [r for r in rows if r["method"] == GUARD and float(r["lr"]) in stable_lrs]
        if stable_cells:
            alarmed = sum(1 for r in stable_cells if (r.get("rollbacks") or 0) > 0)
            total_rb = sum(int(r.get("rollbacks") or 0) for r in stable_cells)
            steps = sum(int(r.get("steps_done") or 0) for r in stable_cells)
            lines.append(
                f"Guard false alarms (rollbacks at the lrs where plain GRPO never collapses, "
                f"{', '.join(f'{lr:g}' for lr in stable_lrs)}): {alarmed}/{len(stable_cells)} runs rolled back, "
                f"{total_rb} rollbacks in {steps} steps ({100.0 * total_rb / max(steps, 1):.1f} per 100 steps)."
            )
        for lr in collapse_lrs:
            g = agg.get((GUARD, lr))
            if g is not None and g["judged"]:
                lines.append(f"GRPO + guard at lr {lr:g}: collapsed {g['collapsed']}/{g['judged']} (plain GRPO "
                             f"{base[lr]['collapsed']}/{base[lr]['judged']}), {g['rollbacks']} rollbacks, final "
                             f"{g['final_mean']:.3f} vs {base[lr]['final_mean']:.3f}.")
    errors = [r for r in rows if r.get("status") == "error"]
    if errors:
        lines.append(f"{len(errors)} cell(s) raised an error: " + "; ".join(
            f"{r['method']} lr={float(r['lr']):g} seed={r['seed']}: {r.get('error')}" for r in errors[:5]))
    return lines


# ----------------------------------------------------------------------------- figures


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def plot_heatmap(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Method × LR; colour = mean final accuracy; text = mean and collapsed k/n; majority-collapsed cells hatched."""
    from matplotlib.patches import Rectangle

    agg = aggregate(rows)
    methods, lrs = _ordered(rows, "method"), _ordered(rows, "lr")
    fig = _figure(1.6 + 1.25 * len(lrs), 0.9 + 0.48 * len(methods))
    ax = fig.add_subplot(1, 1, 1)
    grid = [[agg[(m, lr)]["final_mean"] if (m, lr) in agg else math.nan for lr in lrs] for m in methods]
    image = ax.imshow(grid, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    for i, m in enumerate(methods):
        for j, lr in enumerate(lrs):
            a = agg.get((m, lr))
            if a is None:
                continue
            value = a["final_mean"]
            dark = math.isnan(value) or value < 0.55
            text = "err" if math.isnan(value) else f"{value:.2f}"
            text += f"\n✗ {a['collapsed']}/{a['judged']}" if a["collapsed"] else f"\n{a['judged']} ok"
            if m == GUARD and a["rollbacks"]:
                text += f" ↺{a['rollbacks']}"
            ax.text(j, i, text, ha="center", va="center", fontsize=7.5, color="white" if dark else "black")
            if a["judged"] and a["collapsed"] * 2 > a["judged"]:
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="///", edgecolor="red", linewidth=1.5))
    ax.set_xticks(range(len(lrs)), [f"{lr:g}" for lr in lrs])
    ax.set_yticks(range(len(methods)), methods)
    ax.set_xlabel("learning rate")
    ax.set_title("Final held-out accuracy, mean over seeds\n✗ k/n: seeds collapsed (hatched: most); ↺: guard rollbacks", fontsize=8.5)
    fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02)
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_curves(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Held-out accuracy vs completions: a panel per (method, lr), seeds overlaid; dashed = target, dotted = start."""
    methods, lrs = _ordered(rows, "method"), _ordered(rows, "lr")
    fig = _figure(0.6 + 2.6 * len(lrs), 0.6 + 1.7 * len(methods))
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
    for i, m in enumerate(methods):
        for j, lr in enumerate(lrs):
            ax = fig.add_subplot(len(methods), len(lrs), i * len(lrs) + j + 1)
            cells = [r for r in rows if r["method"] == m and float(r["lr"]) == lr]
            for k, r in enumerate(sorted(cells, key=lambda r: r["seed"])):
                curve = r.get("curve") or {}
                per_step = r.get("completions_per_step") or 0
                xs = [s * per_step / 1000 for s in curve.get("eval_steps", [])]
                ys = [_num(y) for y in curve.get("eval_acc", [])]
                style = "--" if r.get("collapsed") else "-"
                ax.plot(xs, ys, style, color=colors[k % len(colors)], linewidth=1.1, label=f"seed {r['seed']}")
            if cells:
                start, target = _num(cells[0].get("start_acc")), _num(cells[0].get("target_acc"))
                ax.axhline(target, color="grey", linestyle="--", linewidth=0.7)
                ax.axhline(start, color="grey", linestyle=":", linewidth=0.7)
            ax.set_ylim(-0.03, 1.0)
            ax.tick_params(labelsize=6.5)
            if i == 0:
                ax.set_title(f"lr {lr:g}", fontsize=8.5)
            if j == 0:
                ax.set_ylabel(m, fontsize=8)
            if i == len(methods) - 1:
                ax.set_xlabel("completions (thousands)", fontsize=7)
            if i == 0 and j == len(lrs) - 1 and cells:
                ax.legend(fontsize=6, loc="lower right")
    fig.suptitle("Held-out greedy accuracy vs completions sampled (dashed line: collapsed run)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    return path


# ----------------------------------------------------------------------------- tables and pages


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return "—" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def summary_table(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    agg = aggregate(rows)
    header = ["method", "lr", "collapsed", "final acc mean [min, max]", "best acc", "completions to target (median, reached)",
              "roughness", "clip frac", "rejected frac", "entropy end", "rollbacks", "wall s / run"]
    body = []
    for m in _ordered(rows, "method"):
        for lr in _ordered(rows, "lr"):
            a = agg.get((m, lr))
            if a is None:
                continue
            completions = f"{a['completions_median']:.0f} ({a['reached']}/{a['judged']})" if a["completions_median"] is not None else f"not reached (0/{a['judged']})"
            collapsed = f"{a['collapsed']}/{a['judged']}" + (f" (+{a['errors']} err)" if a["errors"] > a["collapsed"] else "")
            body.append([m, f"{lr:g}", collapsed, f"{_fmt(a['final_mean'])} [{_fmt(a['final_min'], 2)}, {_fmt(a['final_max'], 2)}]",
                         _fmt(a["best_mean"]), completions, _fmt(a["roughness"]), _fmt(a["clip_frac"]), _fmt(a["rejected_frac"]),
                         _fmt(a["entropy_final"]), str(a["rollbacks"]) if m == GUARD else "—", _fmt(a["wall_s"], 0)])
    return header, body


def cell_table(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    header = ["method", "lr", "seed", "collapsed", "why", "start", "final", "best", "to target", "roughness", "rollbacks", "wall s"]
    body = []
    for r in sorted(rows, key=lambda r: (_ordered(rows, "method").index(r["method"]), float(r["lr"]), r["seed"])):
        verdict = {True: "yes", False: "no", None: "error"}[r.get("collapsed")]
        why = "; ".join(r.get("collapse_reasons") or []) or ("" if r.get("status") != "error" else str(r.get("error")))
        body.append([r["method"], f"{float(r['lr']):g}", str(r["seed"]), verdict, why, _fmt(r.get("start_acc")), _fmt(r.get("final_acc")),
                     _fmt(r.get("best_acc")), _fmt(r.get("completions_to_target")), _fmt(r.get("roughness")),
                     str(r.get("rollbacks") or 0), _fmt(r.get("wall_s"), 0)])
    return header, body


def _md_table(header: list[str], body: list[list[str]]) -> str:
    esc = lambda s: s.replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in body]
    return "\n".join(lines)


def _html_table(header: list[str], body: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _run_facts(meta: dict[str, Any], rows: Sequence[dict[str, Any]]) -> list[str]:
    spec, machine = meta.get("spec", {}), meta.get("machine", {})
    facts = [f"command: `{meta.get('command', '?')}`"]
    if "train_wall_s" in meta:
        facts.append(f"wall time (all cells, before this report): {meta['train_wall_s']:.0f} s = {meta['train_wall_s'] / 60:.1f} min")
    facts.append(f"cells: {len(rows)} = {len(_ordered(rows, 'method'))} methods × {len(_ordered(rows, 'lr'))} LRs × "
                 f"{len(_ordered(rows, 'seed'))} seeds; {spec.get('steps', '?')} RL steps each; workers {spec.get('workers', '?')}")
    if spec.get("model"):
        facts.append(f"model: {spec['model']}")
    if machine:
        load = machine.get("load_avg_start")
        facts.append(f"machine: {machine.get('cpu_count')} CPUs, {machine.get('cuda') or 'no GPU'}, torch {machine.get('torch')}, "
                     f"{machine.get('platform')}" + (f"; load average at start {load[0]:.1f}" if load else ""))
    if rows:
        r = rows[0]
        gain = _num(r.get("target_acc")) - _num(r.get("start_acc"))
        facts.append(f"start accuracy {_fmt(r.get('start_acc'))}; target (start + {_fmt(gain, 2)}) {_fmt(r.get('target_acc'))}; "
                     f"{r.get('completions_per_step', '?')} completions per RL step")
    return facts


DEFINITION = (
    "A run collapsed when its final held-out accuracy is below max(0.5 × start, start − 0.2), or a training "
    "metric is non-finite / more than 10 % of steps were skipped, or the entropy blew up (last 5 steps > "
    "max(4 × first 5, 1 nat)) or froze below 0.01 without an accuracy gain, or completions shrank below half "
    "their start length / more than half ran out of tokens; a cell that crashed after training began counts "
    "as collapsed. Roughness = mean |Δ reward/mean| between consecutive steps. Full definition: "
    "docs/stability-lab.md."
)


def render_markdown(rows: Sequence[dict[str, Any]], meta: dict[str, Any]) -> str:
    parts = ["# Stability lab: collapse map", ""]
    parts += [f"- {fact}" for fact in _run_facts(meta, rows)]
    parts += ["", "## Findings", ""] + [f"- {line}" for line in findings(rows)]
    parts += ["", "![heat map](heatmap.png)", "", DEFINITION, "", "## Per method and learning rate", ""]
    parts += [_md_table(*summary_table(rows)), "", "![curves](curves.png)", "", "## Every cell", "", _md_table(*cell_table(rows)), ""]
    return "\n".join(parts)


def render_html(rows: Sequence[dict[str, Any]], meta: dict[str, Any]) -> str:
    style = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;font-size:12px;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 6px;"
             "text-align:left}th{background:#f3f3f3}img{max-width:100%}code{background:#f3f3f3;padding:1px 3px}")
    facts = "".join(f"<li>{html.escape(f).replace('`', '')}</li>" for f in _run_facts(meta, rows))
    found = "".join(f"<li>{html.escape(line)}</li>" for line in findings(rows))
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>steadyrl stability lab</title><style>{style}</style></head>"
        f"<body><h1>Stability lab: collapse map</h1><ul>{facts}</ul><h2>Findings</h2><ul>{found}</ul>"
        f"<img src='heatmap.png' alt='heat map'><p>{html.escape(DEFINITION)}</p>"
        f"<h2>Per method and learning rate</h2>{_html_table(*summary_table(rows))}"
        f"<img src='curves.png' alt='curves'><h2>Every cell</h2>{_html_table(*cell_table(rows))}</body></html>"
    )


def write_report(out: str | Path, rows: Sequence[dict[str, Any]], meta: dict[str, Any] | None = None) -> list[Path]:
    """Write report.md, report.html, heatmap.png, curves.png into ``out``; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta = meta or {}
    paths = [plot_heatmap(rows, out / "heatmap.png"), plot_curves(rows, out / "curves.png")]
    (out / "report.md").write_text(render_markdown(rows, meta))
    (out / "report.html").write_text(render_html(rows, meta))
    return [out / "report.md", out / "report.html", *paths]
