"""What the sampling layer buys: every recipe of configs/sampling/ × seeds, on the harder arithmetic setting.

    OMP_NUM_THREADS=1 python benchmarks/sampling_layer.py --seeds 0,1,2 --workers 2 --out runs/bench-sampling

Per method (mean over seeds, 95% t-interval over seeds for the accuracy):
  * zero-var: fraction of the groups it *generated* whose rewards were all equal (dead for GRPO);
  * gen/trained: completions generated per completion that reached the loss; gen/informative: per completion
    with a non-zero advantage (the cost of a useful gradient term);
  * generated: completions generated over the run (rounds, hints and momentum co-samples included);
  * held-out greedy accuracy at the start and the end, and against the completions generated so far.
Every run is `steadyrl train <recipe> --set run.seed=S run.output_dir=...` in its own process; the numbers are
read back from its metrics.jsonl.  ``--smoke`` (2 steps, 1 seed, 2 recipes) checks the script end to end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "configs" / "sampling"
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
"""Two-sided 95% Student-t quantiles by degrees of freedom (n − 1)."""


def interval(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% t-interval); half-width 0 for a single value."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, T975.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))


def summarise(rows: list[dict]) -> dict:
    """One run's numbers from its metrics rows."""
    steps = [r for r in rows if "sampling/generated" in r]
    evals = [r for r in rows if "eval/accuracy" in r]
    generated = sum(r["sampling/generated"] for r in steps)
    trained = sum(r["sampling/trained"] for r in steps)
    informative = sum(r["sampling/trained"] * r["sampling/informative_frac"] for r in steps)
    cumulative, curve = 0.0, []
    by_step = {r["step"]: r["sampling/generated"] for r in steps}
    for r in sorted(evals, key=lambda r: r["step"]):
        cumulative = sum(v for s, v in by_step.items() if s <= r["step"])
        curve.append((r["step"], cumulative, r["eval/accuracy"]))
    return {
        "zero_var": statistics.fmean(r["sampling/zero_var_generated_frac"] for r in steps),
        "gen_per_trained": generated / max(trained, 1.0),
        "gen_per_informative": generated / max(informative, 1.0),
        "generated": generated,
        "acc_start": curve[0][2] if curve else float("nan"),
        "acc_end": curve[-1][2] if curve else float("nan"),
        "curve": curve,
    }


def _run(recipe: Path, seed: int, out: Path, extra: list[str]) -> dict:
    run_dir = out / recipe.stem / f"seed{seed}"
    if not (run_dir / "summary.json").is_file():
        cmd = [sys.executable, "-m", "steadyrl.cli", "train", str(recipe), "--set", f"run.seed={seed}",
               f"run.output_dir={run_dir}", "run.resume=false", *extra]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        with open(run_dir.parent / f"seed{seed}.log", "w") as log:
            subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"method": recipe.stem, "seed": seed, **summarise(rows)}


def table(results: list[dict]) -> str:
    methods = list(dict.fromkeys(r["method"] for r in results))
    base = [r["acc_end"] for r in results if r["method"] == "grpo"]
    lines = [
        "| method | seeds | zero-var groups generated | gen / trained | gen / informative | completions generated "
        "| accuracy start | accuracy end (95% CI) | end − GRPO |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m in methods:
        rs = [r for r in results if r["method"] == m]
        mean, half = interval([r["acc_end"] for r in rs])
        delta = f"{mean - statistics.fmean(base):+.3f}" if base and m != "grpo" else "—"
        lines.append(
            f"| {m} | {len(rs)} | {statistics.fmean(r['zero_var'] for r in rs):.2f} | "
            f"{statistics.fmean(r['gen_per_trained'] for r in rs):.2f} | {statistics.fmean(r['gen_per_informative'] for r in rs):.2f} | "
            f"{statistics.fmean(r['generated'] for r in rs):.0f} | {statistics.fmean(r['acc_start'] for r in rs):.3f} | "
            f"{mean:.3f} ± {half:.3f} | {delta} |"
        )
    return "\n".join(lines)


def curves(results: list[dict]) -> str:
    """Accuracy against completions generated, mean over seeds at each evaluation."""
    methods = list(dict.fromkeys(r["method"] for r in results))
    lines = ["| method | (completions generated, held-out accuracy) at each evaluation, mean over seeds |", "|---|---|"]
    for m in methods:
        rs = [r["curve"] for r in results if r["method"] == m]
        points = []
        for k in range(min(len(c) for c in rs)):
            points.append(f"({statistics.fmean(c[k][1] for c in rs):.0f}, {statistics.fmean(c[k][2] for c in rs):.3f})")
        lines.append(f"| {m} | {' '.join(points)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="", help="comma-separated recipe names of configs/sampling/ (default: all)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default="runs/bench-sampling")
    p.add_argument("--smoke", action="store_true", help="2 steps, 1 seed, grpo and dapo_dynamic_sampling")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override for every run")
    args = p.parse_args(argv)
    names = [m for m in args.methods.split(",") if m] or sorted(f.stem for f in RECIPES.glob("*.yaml"))
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    extra = list(args.set)
    if args.smoke:
        names, seeds = ["grpo", "dapo_dynamic_sampling"], seeds[:1]
        extra += ["optim.steps=2", "eval.every=1", "eval.num_prompts=8", "rollout.prompts_per_step=4"]
    recipes = [RECIPES / f"{n}.yaml" for n in names]
    missing = [str(r) for r in recipes if not r.is_file()]
    if missing:
        raise SystemExit(f"no recipe {', '.join(missing)}; choose among {', '.join(sorted(f.stem for f in RECIPES.glob('*.yaml')))}.")
    out = Path(args.out)
    started = time.perf_counter()
    jobs = [(r, s) for r in recipes for s in seeds]
    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        results = list(pool.map(lambda job: _run(job[0], job[1], out, extra), jobs))
    report = (f"{table(results)}\n\n{curves(results)}\n\nwall time {time.perf_counter() - started:.0f} s, "
              f"{len(jobs)} runs, {args.workers} workers\n")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "report.md").write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
