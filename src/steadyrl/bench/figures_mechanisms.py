"""The mechanism lab's figures (small PNGs, matplotlib through Figure + FigureCanvasAgg, no pyplot).

    formulation_mismatch.png   relative error of the expected gradient vs the sampler's k3 mismatch (N = 1)
    formulation_staleness.png  relative error vs N at the fixed stale θ, per sampler, with the noise floor
    routing.png                relative error vs N for none / R2 / R3
    capo.png                   held-out per-step KL (p99) vs lr; rejection rate by sampled-token probability
    pcr.png                    plasticity gain vs retention loss per method
    lco.png                    Fisher cosine to the target (on-policy / stale) and gradient-norm roughness
Error bars are 95 % t-intervals over seeds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from steadyrl.bench.lab_stats import mean_ci, ordered, select, values

COLORS = {"none": "#d62728", "tis": "#1f77b4", "minirl": "#2ca02c", "ppo_clip": "#ff7f0e", "seq_is": "#7f7f7f",
          "R2": "#1f77b4", "R3": "#2ca02c", "nomask": "#7f7f7f", "capo": "#d62728", "capo_true": "#1f77b4"}


def _figure(ncols: int = 1, width: float = 4.2, height: float = 3.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), dpi=90)
    FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    return path


def _line(ax, xs, rows_per_x, key, label, color=None, style="-", log_y=False):
    stats = [mean_ci(values(r, key)) for r in rows_per_x]
    ys = [s[0] for s in stats]
    err = [s[1] if s[2] > 1 else 0.0 for s in stats]
    # on a log axis the lower bar stops just above 0 (a t-interval over 3 seeds often reaches below it)
    low = [min(e, 0.95 * y) if log_y else e for e, y in zip(err, ys)]
    ax.errorbar(xs, ys, yerr=[low, err], label=label, color=color, linestyle=style, marker="o", ms=3, capsize=2, lw=1.2)


def formulation_figures(out: Path, rows: list[dict[str, Any]]) -> list[Path]:
    f = select(rows, item="formulation")
    paths = []
    axis, setup = select(f, kind="mismatch"), select(f, kind="setup")
    if axis and setup:
        fig, (ax,) = _figure(width=4.6)
        k3 = {(r["seed"], m): v["k3"] for r in setup for m, v in r["mismatch"].items()}
        floor = values(axis, "rel_err", mismatch="fp32", method="none", agg="sum")
        for method, marker in (("none", "o"), ("tis", "s"), ("seq_is", "^")):
            pts = [(k3[(r["seed"], r["mismatch"])], r["rel_err"]) for r in select(axis, method=method, agg="sum")
                   if r["mismatch"] != "fp32" and (r["seed"], r["mismatch"]) in k3]
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=14, marker=marker, color=COLORS.get(method), label=method)
        if floor:
            ax.axhline(max(floor), color="#bbbbbb", ls=":", lw=1, label="fp32 floor (max over seeds)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("sampler's k3 mismatch per token (one point per seed)")
        ax.set_ylabel("‖E g − c∇J‖ / ‖c∇J‖")
        ax.set_title("N = 1, sum aggregation: bias vs mismatch", fontsize=9)
        ax.legend(fontsize=6)
        paths.append(_save(fig, out / "formulation_mismatch.png"))
    fixed, noise = select(f, kind="fixed"), select(f, kind="noise")
    if fixed:
        samplers = ordered(fixed, "mismatch", ("fp32", "bf16", "fp8", "noise1", "noise3"))
        fig, axes = _figure(len(samplers))
        for ax, m in zip(axes, samplers):
            ns = ordered(fixed, "N", sort=int)
            for method in ordered(fixed, "method", ("none", "tis", "minirl", "ppo_clip")):
                _line(ax, ns, [select(fixed, mismatch=m, N=n, method=method, agg="sum") for n in ns], "rel_err", method,
                      COLORS.get(method), log_y=True)
            if noise:
                _line(ax, ns, [select(noise, N=n, agg="sum") for n in ns], "noise_rel", "one-batch noise", "#bbbbbb", ":",
                      log_y=True)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("N (mini-batches per rollout batch)")
            ax.set_ylabel("relative error at θ_{N−1}")
            ax.set_title(f"staleness, sampler {m}, sum aggregation", fontsize=9)
            ax.legend(fontsize=6)
        paths.append(_save(fig, out / "formulation_staleness.png"))
    return paths


def routing_figure(out: Path, rows: list[dict[str, Any]]) -> list[Path]:
    last = [r for r in select(rows, item="routing", kind="trajectory") if r["k"] == r["N"] - 1]
    if not last:
        return []
    fig, (ax,) = _figure()
    ns = ordered(last, "N", sort=int)
    for replay in ordered(last, "replay", ("none", "R2", "R3")):
        _line(ax, ns, [select(last, N=n, replay=replay) for n in ns], "rel_err", replay, COLORS.get(replay))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("N")
    ax.set_ylabel("relative error at θ_{N−1}")
    ax.set_title("tiny MoE, FP8 sampler, MiniRL", fontsize=9)
    ax.legend(fontsize=7)
    return [_save(fig, out / "routing.png")]


def capo_figure(out: Path, rows: list[dict[str, Any]]) -> list[Path]:
    steps, summ = select(rows, item="capo", kind="step"), select(rows, item="capo", kind="summary")
    if not steps:
        return []
    fig, (a1, a2) = _figure(2)
    lrs = ordered(steps, "lr", sort=float)
    for v in ordered(steps, "variant", ("nomask", "capo", "capo_true")):
        per = [[{"x": mean_ci(values(steps, "heldout_kl_p99", lr=lr, variant=v, seed=s))[0]} for s in ordered(steps, "seed")]
               for lr in lrs]
        _line(a1, lrs, per, "x", v, COLORS.get(v))
    a1.set_xscale("log")
    a1.set_yscale("log")
    a1.set_xlabel("lr")
    a1.set_ylabel("held-out per-step KL, p99")
    a1.legend(fontsize=7)
    bins = [k.removeprefix("rejected_rate_") for k in summ[0] if k.startswith("rejected_rate_p")]
    for i, v in enumerate(ordered(summ, "variant", ("nomask", "capo", "capo_true"))):
        ys = [mean_ci(values(summ, f"rejected_rate_{b}", variant=v))[0] for b in bins]
        a2.bar([j + 0.27 * (i - 1) for j in range(len(bins))], ys, width=0.27, label=v, color=COLORS.get(v))
    a2.set_xticks(range(len(bins)), [b.removeprefix("p") for b in bins], fontsize=7)
    a2.set_xlabel("sampled token's probability")
    a2.set_ylabel("rejected by the official rule")
    a2.legend(fontsize=7)
    return [_save(fig, out / "capo.png")]


def pcr_figure(out: Path, rows: list[dict[str, Any]]) -> list[Path]:
    p = select(rows, item="pcr", kind="run")
    if not p:
        return []
    fig, (ax,) = _figure()
    for m in ordered(p, "method"):
        gx, gy = mean_ci(values(p, "retention_loss", method=m)), mean_ci(values(p, "plasticity_gain", method=m))
        ax.errorbar([gx[0]], [gy[0]], xerr=[gx[1] if gx[2] > 1 else 0], yerr=[gy[1] if gy[2] > 1 else 0], marker="o",
                    capsize=2, label=m)
    ax.set_xlabel("retention loss (subtraction acc.)")
    ax.set_ylabel("plasticity gain (addition acc.)")
    ax.legend(fontsize=7)
    return [_save(fig, out / "pcr.png")]


def lco_figure(out: Path, rows: list[dict[str, Any]]) -> list[Path]:
    s = select(rows, item="lco", kind="summary")
    if not s:
        return []
    fig, (a1, a2) = _figure(2)
    methods = ordered(s, "method")
    for i, key in enumerate(("cos_on_policy", "cos_stale")):
        stats = [mean_ci(values(s, key, method=m)) for m in methods]
        a1.bar([j + 0.4 * (i - 0.5) for j in range(len(methods))], [x[0] for x in stats], width=0.4,
               yerr=[x[1] if x[2] > 1 else 0 for x in stats], capsize=2, label=key.removeprefix("cos_"))
    a1.set_xticks(range(len(methods)), methods, fontsize=7, rotation=20)
    a1.set_ylabel("Fisher cosine to the target")
    a1.axhline(0, color="k", lw=0.5)
    a1.legend(fontsize=7)
    stats = [mean_ci(values(s, "grad_norm_roughness", method=m)) for m in methods]
    a2.bar(range(len(methods)), [x[0] for x in stats], yerr=[x[1] if x[2] > 1 else 0 for x in stats], capsize=2)
    a2.set_xticks(range(len(methods)), methods, fontsize=7, rotation=20)
    a2.set_ylabel("grad-norm roughness")
    return [_save(fig, out / "lco.png")]


def write_figures(out: Path, rows: list[dict[str, Any]]) -> list[Path]:
    paths: list[Path] = []
    for make in (formulation_figures, routing_figure, capo_figure, pcr_figure, lco_figure):
        try:
            paths += make(out, rows)
        except Exception as exc:  # a figure must never lose the tables
            print(f"figure {make.__name__} failed: {type(exc).__name__}: {exc}")
    return paths
