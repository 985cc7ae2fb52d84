"""`steadyrl bench stability`: the collapse map. Methods × learning rates × seeds, one Trainer run per cell.

    steadyrl bench stability --quick                       # CPU, 2 workers, ≤ 30 min on 2 cores
    steadyrl bench stability --methods grpo,capo --lrs 3e-4,3e-3 --seeds 0,1,2 --steps 100 --out runs/map

Each cell is a base recipe ``configs/stability/<method>.yaml`` plus overrides (``optim.lr``, ``run.seed``,
``run.output_dir``, and with ``--quick`` fewer steps and a smaller greedy-only eval). Cells run in parallel
worker processes (multiprocessing spawn, one intra-op thread each), each in its own run directory
``OUT/runs/<method>_lr<lr>_s<seed>/`` (its eval lines and warnings in ``OUT/runs/<cell>.log``). A cell that raises is recorded with its error and the matrix goes
on; a worker process that dies is replaced and its cells retried (twice at most). A cell whose
``result.json`` exists is not run again (``--force`` reruns it), so an interrupted map resumes.

Outputs in OUT: ``results.jsonl`` (one line per cell, report/collapse.py's metrics + curves), ``meta.json``
(command, machine, wall time), and the report: ``report.md``, ``report.html``, ``heatmap.png``,
``curves.png`` (bench/report_stability.py). docs/stability-lab.md explains how to read them.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import shutil
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from steadyrl._io import atomic_write_text
from steadyrl.config import ConfigError

QUICK_METHODS = ("grpo", "grpo_guard", "capo", "minirl", "dppo_binary_tv", "cispo", "lco_kld")
FULL_METHODS = (*QUICK_METHODS, "gspo", "clip_cov", "kl_cov", "steer", "pcr")
QUICK_LRS = (3e-4, 1e-3, 3e-3)
FULL_LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
# Cells that cost more per step start first, so the pool does not end waiting on one slow cell.
_COST = {"pcr": 4.0, "minirl": 2.0, "capo": 2.0}
# Overrides every quick cell gets: a 100-prompt greedy-only eval.
QUICK_OVERRIDES = ("eval.num_prompts=100", "eval.pass_k=0", "eval.greedy=true")
COMMON_OVERRIDES = (
    "logging.progress=false",
    "logging.report=false",
    "logging.tensorboard=false",
    "checkpoint.save_final_model=false",
    "checkpoint.every=0",
)


@dataclass(frozen=True)
class BenchSpec:
    methods: tuple[str, ...] = QUICK_METHODS
    lrs: tuple[float, ...] = QUICK_LRS
    seeds: tuple[int, ...] = (0, 1)
    steps: int = 40
    out: str = "runs/stability-quick"
    workers: int = 2
    quick: bool = True
    model: str | None = None
    """model.name_or_path for every cell (None: the recipes' own, embedded:tiny-adder)."""
    device: str | None = None
    """run.device for every cell (None: the recipes' auto; --quick uses cpu)."""
    configs_dir: str | None = None
    eval_every: int = 2
    """Held-out eval interval in RL steps: the resolution of completions-to-target (2 × 256 = 512)."""
    extra: tuple[str, ...] = ()
    """More ``key=value`` overrides for every cell (``--set``)."""
    force: bool = False


@dataclass(frozen=True)
class Cell:
    method: str
    lr: float
    seed: int
    config: str
    overrides: tuple[str, ...] = field(default_factory=tuple)
    run_dir: str = ""

    @property
    def name(self) -> str:
        return f"{self.method}_lr{self.lr:g}_s{self.seed}"


def quick_spec(**changes: Any) -> BenchSpec:
    return replace(BenchSpec(), **changes)


def full_spec(**changes: Any) -> BenchSpec:
    base = BenchSpec(
        methods=FULL_METHODS, lrs=FULL_LRS, seeds=(0, 1, 2), steps=100, out="runs/stability",
        workers=os.cpu_count() or 1, quick=False,
    )
    return replace(base, **changes)


def find_configs_dir(explicit: str | None = None) -> Path:
    """The base recipes: ``explicit``, else the ones shipped in the package (steadyrl/configs/stability, which
    the repository's configs/stability links to), so the bench runs from any directory and any install."""
    if explicit is None:
        from importlib import resources

        return Path(str(resources.files("steadyrl") / "configs" / "stability"))
    if not Path(explicit).is_dir():
        raise ConfigError(f"--configs {explicit} is not a directory; pass a directory holding <method>.yaml recipes.")
    return Path(explicit)


def plan_cells(spec: BenchSpec) -> list[Cell]:
    """Every (method, lr, seed) cell with its overrides, most expensive methods first."""
    configs = find_configs_dir(spec.configs_dir)
    missing = [m for m in spec.methods if not (configs / f"{m}.yaml").is_file()]
    if missing:
        have = sorted(p.stem for p in configs.glob("*.yaml"))
        raise ConfigError(f"no recipe for method(s) {', '.join(missing)} in {configs}; available: {', '.join(have)}.")
    if spec.steps < 1 or not spec.lrs or not spec.seeds or not spec.methods:
        raise ConfigError("bench stability needs at least one method, learning rate and seed, and steps >= 1.")
    common = [*COMMON_OVERRIDES, f"optim.steps={spec.steps}", f"eval.every={spec.eval_every}"]
    if spec.quick:
        common += QUICK_OVERRIDES
    if spec.model:
        common.append(f"model.name_or_path={spec.model}")
    device = spec.device or ("cpu" if spec.quick else None)
    if device:
        common.append(f"run.device={device}")
    cells = []
    for method in sorted(spec.methods, key=lambda m: -_COST.get(m, 1.0)):
        for lr in spec.lrs:
            for seed in spec.seeds:
                cell = Cell(method, float(lr), int(seed), str(configs / f"{method}.yaml"))
                run_dir = Path(spec.out) / "runs" / cell.name
                overrides = (*common, f"optim.lr={lr:g}", f"run.seed={seed}", f"run.output_dir={run_dir}", *spec.extra)
                cells.append(replace(cell, overrides=tuple(overrides), run_dir=str(run_dir)))
    return cells


# ----------------------------------------------------------------------------- one cell (in a worker)


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def run_cell(cell: Cell) -> dict[str, Any]:
    """Train one cell and return its results row; never raises (an error becomes the row's ``error``)."""
    from steadyrl.config_load import load_config
    from steadyrl.report import read_metrics
    from steadyrl.report.collapse import cell_metrics

    started = time.perf_counter()
    row: dict[str, Any] = {"method": cell.method, "lr": cell.lr, "seed": cell.seed, "run_dir": cell.run_dir}
    steps, per_step = 0, 0
    try:
        cfg = load_config(cell.config, list(cell.overrides))
        steps, per_step = cfg.optim.steps, cfg.rollout.prompts_per_step * cfg.rollout.group_size
        row.update(status="ok", error=None)
        shutil.rmtree(cell.run_dir, ignore_errors=True)  # a fresh run: never resume a half-finished cell
        from steadyrl.train.trainer import Trainer

        log = Path(f"{cell.run_dir}.log")  # the cell's eval lines and warnings, beside its run directory
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            Trainer(cfg).train()
    except Exception as exc:  # recorded, the matrix goes on
        row.update(status="error", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc(limit=6))
    row["wall_s"] = round(time.perf_counter() - started, 2)
    row.update(steps=steps, completions_per_step=per_step)
    rows = read_metrics(cell.run_dir) if (Path(cell.run_dir) / "metrics.jsonl").is_file() else []
    row.update(cell_metrics(rows, steps=steps, completions_per_step=per_step))
    if row["status"] == "error":
        trained = row["steps_done"] > 0
        # A crash after training began (e.g. NaN sampling probabilities) is a collapse; a set-up error is not.
        row["collapsed"] = True if trained else None
        row["collapse_reasons"] = [f"crashed: {row['error']}"] if trained else []
    Path(cell.run_dir).mkdir(parents=True, exist_ok=True)
    (Path(cell.run_dir) / "result.json").write_text(json.dumps(_json_safe(row)))
    return row


def _json_safe(value: Any) -> Any:
    """NaN / inf → None, recursively, so every results line is strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


# ----------------------------------------------------------------------------- the matrix


def _cached(cell: Cell) -> dict[str, Any] | None:
    path = Path(cell.run_dir) / "result.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def run_matrix(cells: list[Cell], workers: int, *, force: bool = False, log=print, max_attempts: int = 3) -> list[dict[str, Any]]:
    """Run every cell in ``workers`` spawned processes (in this process when workers <= 1); results in cell order."""
    results: dict[str, dict[str, Any]] = {}
    todo = []
    for cell in cells:
        cached = None if force else _cached(cell)
        if cached is not None:
            results[cell.name] = cached
            log(f"[cached] {cell.name}")
        else:
            todo.append(cell)
    total, attempts = len(cells), {c.name: 0 for c in todo}

    def finish(cell: Cell, row: dict[str, Any]) -> None:
        results[cell.name] = row
        log(f"[{len(results)}/{total}] {_summary_line(row)}")

    if workers <= 1:
        _init_worker()
        for cell in todo:
            finish(cell, run_cell(cell))
    import multiprocessing

    os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the spawned workers
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    while workers > 1 and todo:
        retry: list[Cell] = []
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=ctx, initializer=_init_worker) as pool:
            futures = {pool.submit(run_cell, cell): cell for cell in todo}
            for future in as_completed(futures):
                cell = futures[future]
                try:
                    finish(cell, future.result())
                except BrokenProcessPool as exc:
                    attempts[cell.name] += 1
                    if attempts[cell.name] < max_attempts:
                        retry.append(cell)
                    else:
                        finish(cell, _died_row(cell, exc))
                except Exception as exc:  # run_cell catches its own; this is pickling / transport
                    finish(cell, _died_row(cell, exc))
        todo = retry
    return [results[c.name] for c in cells]


def _died_row(cell: Cell, exc: BaseException) -> dict[str, Any]:
    return {
        "method": cell.method, "lr": cell.lr, "seed": cell.seed, "run_dir": cell.run_dir, "status": "error",
        "error": f"worker process died: {type(exc).__name__}: {exc}", "collapsed": None, "collapse_reasons": [],
    }


def _summary_line(row: dict[str, Any]) -> str:
    head = f"{row['method']} lr={row['lr']:g} seed={row['seed']}"
    if row.get("status") == "error" and row.get("collapsed") is None:
        return f"{head}: ERROR {row.get('error')}"
    final, start = row.get("final_acc"), row.get("start_acc")
    acc = f"acc {start:.2f} -> {final:.2f}" if isinstance(final, float) and isinstance(start, float) else "acc n/a"
    verdict = "COLLAPSED (" + "; ".join(row.get("collapse_reasons", [])) + ")" if row.get("collapsed") else "stable"
    extra = f", {row['rollbacks']} rollback(s)" if row.get("rollbacks") else ""
    return f"{head}: {acc}, {verdict}{extra}, {row.get('wall_s', 0):.0f}s"


def machine_info() -> dict[str, Any]:
    import torch

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    if hasattr(os, "getloadavg"):
        info["load_avg_start"] = [round(x, 2) for x in os.getloadavg()]
    return info


def write_results(out: Path, rows: list[dict[str, Any]]) -> Path:
    return atomic_write_text(out / "results.jsonl", "".join(json.dumps(_json_safe(r)) + "\n" for r in rows))


def run_stability(spec: BenchSpec, *, command: str | None = None, log=print) -> dict[str, Any]:
    """Plan, run, and report the map; returns meta (with the report paths)."""
    from steadyrl.bench.report_stability import write_report

    started = time.perf_counter()
    out = Path(spec.out)
    cells = plan_cells(spec)
    out.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {
        "command": command or " ".join(["steadyrl", *sys.argv[1:]]),
        "spec": asdict(spec),
        "cells": len(cells),
        "machine": machine_info(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    log(f"stability map: {len(spec.methods)} methods x {len(spec.lrs)} LRs x {len(spec.seeds)} seeds = {len(cells)} "
        f"cells, {spec.steps} steps each, {spec.workers} worker(s) -> {out}")
    rows = run_matrix(cells, spec.workers, force=spec.force, log=log)
    order = {m: i for i, m in enumerate(spec.methods)}  # the report lists methods as asked, not by cost
    rows.sort(key=lambda r: (order.get(r["method"], len(order)), float(r["lr"]), int(r["seed"])))
    write_results(out, rows)
    meta["train_wall_s"] = round(time.perf_counter() - started, 1)
    paths = write_report(out, rows, meta)  # the report's own time is in wall_s below, not in its text
    meta["wall_s"] = round(time.perf_counter() - started, 1)
    if hasattr(os, "getloadavg"):
        meta["machine"]["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    (out / "meta.json").write_text(json.dumps(_json_safe(meta), indent=2))
    log(f"done in {meta['wall_s']:.0f}s: {', '.join(str(p) for p in paths)}")
    return meta
