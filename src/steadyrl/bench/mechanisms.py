"""The mechanism lab's runner: every measurement of steadyrl.lab × seeds, in worker processes, to results.jsonl.

    steadyrl bench mechanisms --quick        # CPU, 3 seeds, ≤ 30 min on 2 cores (docs/stability-lab.md)
    steadyrl bench mechanisms                # the full grid (more prompts, steps, seeds)

A *job* is one (item, seed, part) measurement that returns result rows; jobs run in ``workers`` spawned
processes (one thread each) and each job's rows are cached in OUT/jobs/<name>.json, so an interrupted run
resumes. The report (bench/report_mechanisms.py) is written from OUT/results.jsonl.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from steadyrl._io import atomic_write_text
from steadyrl.bench.stability import _json_safe, machine_info
from steadyrl.config import ConfigError

ITEMS = ("formulation", "routing", "capo", "capo_collapse", "pcr", "lco", "guard")

SCRATCHPAD_MODEL = "embedded:tiny-adder-scratchpad"
SETTINGS: dict[str, dict[str, Any]] = {
    # the embedded models on 1-3 digit addition, answers of ~3.5 tokens (the items' own defaults)
    "short": {},
    # the length axis: the scratchpad checkpoint on 2-3 digit addition worked column by column (21-34 tokens).
    # The policy alone needs 1-9 completions per prompt for 99.9 % of its mass, but the σ = 3 noise sampler
    # spreads its mass over 30 tokens: the mixture's enumeration did not finish in 400 s for 32 prompts, so it
    # is left out; 16 prompts and a cap of 500 completions per prompt bound the σ = 1 sampler's share.
    "scratchpad": {
        "items": ("formulation", "capo"),
        "out": "runs/mechanisms-scratchpad",
        "formulation": {
            "model": SCRATCHPAD_MODEL, "task_kwargs": {"min_digits": 2, "max_digits": 3, "operations": "+", "scratchpad": True},
            "max_new_tokens": 40, "num_prompts": 16, "mismatches": ("fp32", "bf16", "fp8", "noise1"), "max_rows": 500,
        },
        "capo": {"overrides": (f"model.name_or_path={SCRATCHPAD_MODEL}", "rollout.max_new_tokens=40",
                               'task.kwargs={min_digits: 2, max_digits: 3, operations: "+", scratchpad: true}')},
    },
}


@dataclass(frozen=True)
class MechanismsSpec:
    quick: bool = True
    setting: str = "short"
    """A key of SETTINGS: the model, task and item parameters the items run with (``quick_spec`` applies it)."""
    seeds: tuple[int, ...] = (0, 1, 2)
    items: tuple[str, ...] = ITEMS
    out: str = "runs/mechanisms-quick"
    workers: int = 2
    force: bool = False
    formulation: dict = field(default_factory=dict)
    routing: dict = field(default_factory=dict)
    capo: dict = field(default_factory=lambda: {"steps": 4})
    capo_collapse_steps: int = 30
    pcr: dict = field(default_factory=lambda: {"steps": 10, "eval_every": 5})
    lco: dict = field(default_factory=lambda: {"steps": 6})
    guard_results: str = "docs/results/stability/quick/results.jsonl"


def _with_setting(base: MechanismsSpec, changes: dict[str, Any]) -> MechanismsSpec:
    """``base`` with the setting's items, out and item parameters, then ``changes`` (an item's parameters merge
    key by key: the base's, the setting's, the caller's; CAPO's config overrides add up)."""
    name = changes.get("setting", base.setting)
    if name not in SETTINGS:
        raise ConfigError(f"unknown lab setting {name!r}; valid: {', '.join(SETTINGS)}.")
    setting = SETTINGS[name]
    merged: dict[str, Any] = {"setting": name}
    if "items" in setting and "items" not in changes:
        merged["items"] = setting["items"]
    if "out" in setting and "out" not in changes:
        merged["out"] = setting["out"] + ("-quick" if base.quick else "")
    for item in ("formulation", "routing", "capo", "pcr", "lco"):
        params = {**getattr(base, item), **setting.get(item, {})}
        for key, value in changes.get(item, {}).items():
            params[key] = tuple(params.get(key, ())) + tuple(value) if key == "overrides" else value
        merged[item] = params
    return replace(base, **{**changes, **merged})


def quick_spec(**changes: Any) -> MechanismsSpec:
    return _with_setting(MechanismsSpec(), changes)


def full_spec(**changes: Any) -> MechanismsSpec:
    base = MechanismsSpec(
        quick=False, seeds=(0, 1, 2, 3, 4), out="runs/mechanisms", workers=os.cpu_count() or 1,
        formulation={"every_k": (8,), "trajectory_mismatches": ("fp32", "fp8", "noise1"), "noise_batches": 16},
        capo={"steps": 12}, capo_collapse_steps=100, pcr={"steps": 60, "eval_every": 10, "eval_prompts": 200},
        lco={"steps": 20},
    )
    return _with_setting(base, changes)


@dataclass(frozen=True)
class Job:
    name: str
    item: str
    seed: int
    args: dict = field(default_factory=dict)
    cost: float = 1.0


def plan_jobs(spec: MechanismsSpec) -> list[Job]:
    unknown = sorted(set(spec.items) - set(ITEMS))
    if unknown:
        raise ConfigError(f"unknown lab item(s) {', '.join(unknown)}; valid: {', '.join(ITEMS)}.")
    if not spec.seeds:
        raise ConfigError("bench mechanisms needs at least one seed, e.g. --seeds 0,1,2.")
    allowed = SETTINGS.get(spec.setting, {}).get("items", ITEMS)
    outside = [i for i in spec.items if i not in allowed]
    if outside:
        raise ConfigError(f"the {spec.setting} setting runs only {', '.join(allowed)}; drop {', '.join(outside)} from --items "
                          "(they have no checkpoint for this setting).")
    from steadyrl.lab.capo_lab import CapoSpec
    from steadyrl.lab.formulation import FormulationSpec
    from steadyrl.lab.lco_lab import LOSSES
    from steadyrl.lab.pcr_lab import ROWS

    jobs: list[Job] = []
    for seed in spec.seeds:
        if "formulation" in spec.items:
            parts = ["axis", *(f"traj:{m}" for m in FormulationSpec(**spec.formulation).trajectory_mismatches)]
            jobs += [Job(f"formulation_{p.replace(':', '-')}_s{seed}", "formulation", seed, {"part": p}, 6.0) for p in parts]
        if "routing" in spec.items:
            jobs.append(Job(f"routing_s{seed}", "routing", seed, {}, 4.0))
        if "capo" in spec.items:
            capo = CapoSpec(**spec.capo)
            jobs += [Job(f"capo_{v}_lr{lr:g}_s{seed}", "capo", seed, {"variant": v, "lr": lr}, 2.0)
                     for v in capo.variants for lr in capo.lrs]
        if "capo_collapse" in spec.items:
            jobs += [Job(f"capo_collapse_{m}_s{seed}", "capo_collapse", seed, {"method": m}, 5.0)
                     for m in ("capo", "capo_true_fisher")]
        if "pcr" in spec.items:
            jobs += [Job(f"pcr_{m}_s{seed}", "pcr", seed, {"method": m}, 5.0) for m in ROWS]
        if "lco" in spec.items:
            jobs += [Job(f"lco_{m}_s{seed}", "lco", seed, {"method": m}, 1.5) for m in LOSSES]
    if "guard" in spec.items:
        jobs.append(Job("guard", "guard", 0, {}, 0.1))
    return sorted(jobs, key=lambda j: -j.cost)


def run_job(job: Job, spec: MechanismsSpec) -> list[dict[str, Any]]:
    """One job's rows; an exception becomes one error row (the lab goes on)."""
    started, cpu = time.perf_counter(), time.process_time()
    try:
        rows = _dispatch(job, spec)
        status = {"status": "ok"}
    except Exception as exc:  # recorded, the lab goes on
        rows, status = [], {"status": "error", "error": f"{type(exc).__name__}: {exc}",
                            "traceback": traceback.format_exc(limit=8)}
    wall, cpu = round(time.perf_counter() - started, 2), round(time.process_time() - cpu, 2)
    meta = {"item": job.item, "kind": "job", "job": job.name, "seed": job.seed, "wall_s": wall, "cpu_s": cpu, **status}
    return [{**r, "job": job.name} for r in rows] + [meta]


def _dispatch(job: Job, spec: MechanismsSpec) -> list[dict[str, Any]]:
    out = Path(spec.out)
    if job.item == "formulation":
        from steadyrl.lab.formulation import FormulationLab, FormulationSpec

        lab = FormulationLab(FormulationSpec(**spec.formulation), job.seed, log=lambda m: None)
        part = job.args["part"]
        if part == "axis":
            rows = [lab.setup_row(), *lab.noise_rows(), *lab.mismatch_rows()]
        else:
            mismatch = part.split(":", 1)[1]
            rows = [r for i, n in enumerate(lab.spec.staleness) for r in lab.trajectory_rows(mismatch, n, with_start=i == 0)]
        return [{"item": "formulation", "seed": job.seed, **r} for r in rows]
    if job.item == "routing":
        from steadyrl.lab.routing_lab import RoutingSpec, run_routing

        return run_routing(RoutingSpec(**spec.routing), job.seed, log=lambda m: None)
    if job.item == "capo":
        from steadyrl.lab.capo_lab import CapoSpec, run_capo

        return run_capo(CapoSpec(**spec.capo), job.args["variant"], job.args["lr"], job.seed)
    if job.item == "capo_collapse":
        from steadyrl.bench.stability import plan_cells, run_cell
        from steadyrl.bench.stability import quick_spec as map_quick

        cells = plan_cells(map_quick(methods=(job.args["method"],), lrs=(1e-3,), seeds=(job.seed,),
                                     steps=spec.capo_collapse_steps, out=str(out / "capo_map"), quick=spec.quick))
        row = run_cell(cells[0])
        row.pop("run_dir", None)
        return [{"item": "capo_collapse", **row, "seed": job.seed}]
    if job.item == "pcr":
        from steadyrl.lab.pcr_lab import PcrSpec, run_pcr

        return run_pcr(PcrSpec(**spec.pcr), job.args["method"], job.seed, out / "pcr_runs")
    if job.item == "lco":
        from steadyrl.lab.lco_lab import LcoSpec, run_lco

        return run_lco(LcoSpec(**spec.lco), job.args["method"], job.seed)
    if job.item == "guard":
        from steadyrl.bench.report_stability import read_results
        from steadyrl.lab.guard_lab import replay_map

        path = Path(spec.guard_results)
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found; pass the results.jsonl of a collapse map (run from the repo root).")
        return replay_map(read_results(path))
    raise ConfigError(f"unknown lab item {job.item!r}.")


def _job_path(spec: MechanismsSpec, job: Job) -> Path:
    return Path(spec.out) / "jobs" / f"{job.name}.json"


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def run_jobs(jobs: list[Job], spec: MechanismsSpec, log=print) -> list[dict[str, Any]]:
    results: dict[str, list[dict[str, Any]]] = {}
    todo = []
    for job in jobs:
        path = _job_path(spec, job)
        if path.is_file() and not spec.force:
            results[job.name] = json.loads(path.read_text())
            log(f"[cached] {job.name}")
        else:
            todo.append(job)

    def finish(job: Job, rows: list[dict[str, Any]]) -> None:
        rows = _json_safe(rows)
        results[job.name] = rows
        path = _job_path(spec, job)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(rows))
        meta = rows[-1]
        extra = f" ERROR {meta.get('error')}" if meta.get("status") == "error" else ""
        log(f"[{len(results)}/{len(jobs)}] {job.name}: {meta['wall_s']:.0f}s wall, {meta.get('cpu_s', 0):.0f}s CPU{extra}")

    if spec.workers <= 1 or len(todo) <= 1:
        _init_worker()
        for job in todo:
            finish(job, run_job(job, spec))
    else:
        import multiprocessing

        os.environ.setdefault("OMP_NUM_THREADS", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(spec.workers, len(todo)), mp_context=ctx, initializer=_init_worker) as pool:
            futures = {pool.submit(run_job, job, spec): job for job in todo}
            for future in as_completed(futures):
                job = futures[future]
                try:
                    rows = future.result()
                except Exception as exc:  # a dead worker or a pickling error
                    rows = [{"item": job.item, "kind": "job", "job": job.name, "seed": job.seed, "wall_s": 0.0,
                             "status": "error", "error": f"{type(exc).__name__}: {exc}"}]
                finish(job, rows)
    return [row for job in jobs for row in results[job.name]]


def run_mechanisms(spec: MechanismsSpec, *, command: str | None = None, log=print) -> dict[str, Any]:
    """Plan, run and report the lab; returns the run's meta (command, wall time, machine, report paths)."""
    from steadyrl.bench.report_mechanisms import write_report

    started = time.perf_counter()
    out = Path(spec.out)
    jobs = plan_jobs(spec)
    out.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {
        "command": command or " ".join(["steadyrl", *sys.argv[1:]]), "spec": asdict(spec), "jobs": len(jobs),
        "machine": machine_info(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    log(f"mechanism lab: {len(jobs)} jobs ({', '.join(spec.items)}), seeds {list(spec.seeds)}, "
        f"{spec.workers} worker(s) -> {out}")
    rows = run_jobs(jobs, spec, log=log)
    atomic_write_text(out / "results.jsonl", "".join(json.dumps(_json_safe(r)) + "\n" for r in rows))
    meta["run_wall_s"] = round(time.perf_counter() - started, 1)
    paths = write_report(out, rows, meta)
    meta["wall_s"] = round(time.perf_counter() - started, 1)
    if hasattr(os, "getloadavg"):
        meta["machine"]["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    (out / "meta.json").write_text(json.dumps(_json_safe(meta), indent=2))
    log(f"done in {meta['wall_s']:.0f}s: {', '.join(str(p) for p in paths)}")
    return meta
