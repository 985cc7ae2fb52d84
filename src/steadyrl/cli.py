"""``steadyrl``: train, warmstart, eval, report, methods, quickstart, bench."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from steadyrl.config import ConfigError


def _cmd_train(args: argparse.Namespace) -> int:
    from steadyrl.config import load_config

    cfg = load_config(args.config, args.set)  # before the heavy imports: a config error is reported at once
    from steadyrl.train.trainer import Trainer

    summary = Trainer(cfg).train()
    _print_summary(summary, cfg.run.output_dir)
    return 0


def _cmd_quickstart(args: argparse.Namespace) -> int:
    from steadyrl.config import load_config
    from steadyrl.train.trainer import Trainer

    path = Path(args.config) if args.config else _packaged_config("quickstart.yaml")
    overrides = [f"run.output_dir={args.out}"] + list(args.set or [])
    cfg = load_config(path, overrides)
    out = Path(cfg.run.output_dir)
    if (out / "config.yaml").is_file():  # the demo's own directory: each `make demo` is a fresh run
        print(f"replacing the previous quickstart run in {out}")
        shutil.rmtree(out)
    print(f"steadyrl quickstart: GRPO on the embedded tiny model ({cfg.model.name_or_path}), task {cfg.task.name}")
    print(f"config {path}; run directory {cfg.run.output_dir}")
    summary = Trainer(cfg).train()
    _print_summary(summary, cfg.run.output_dir)
    return 0


def _cmd_warmstart(args: argparse.Namespace) -> int:
    from steadyrl.train.sft import WarmstartConfig, check_output_dir, warmstart

    check_output_dir(args.out, args.overwrite)
    kwargs = {"output_dir": args.out, "seed": args.seed}
    if args.steps is not None:
        kwargs["steps"] = args.steps
    if args.init_from:
        kwargs["init_from"] = args.init_from
    if args.arch:
        kwargs["arch"] = args.arch
    if args.model_kwargs:
        kwargs["model_kwargs"] = _json_object(args.model_kwargs, "--model-kwargs")
    if args.task:
        kwargs["task"] = args.task
        kwargs["task_kwargs"] = _json_object(args.task_kwargs) if args.task_kwargs else {}
    elif args.task_kwargs:
        kwargs["task_kwargs"] = _json_object(args.task_kwargs)
    result = warmstart(WarmstartConfig(**kwargs), device=args.device)
    print(json.dumps({k: v for k, v in result.items()}, indent=2))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from steadyrl.models import load_model, load_tokenizer
    from steadyrl.rollout import build_backend
    from steadyrl.rollout.base import SamplingParams
    from steadyrl.tasks import build_task
    from steadyrl.train.evaluate import evaluate
    from steadyrl.train.setup import resolve_model_path

    task = build_task(args.task, **(_json_object(args.task_kwargs) if args.task_kwargs else {}))  # before loading
    path = resolve_model_path(args.model)
    tokenizer = load_tokenizer(path, pad_token=args.pad_token)
    model = load_model(path, device=args.device)
    prompts = task.eval_prompts()[: args.num_prompts or None]
    metrics = evaluate(
        build_backend("hf", model, tokenizer),
        tokenizer,
        task,
        prompts,
        sampling=SamplingParams(args.max_new_tokens, args.temperature),
        pass_k=args.pass_k,
        seed=args.seed,
        device=args.device,
    )
    print(json.dumps(metrics, indent=2))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from steadyrl.report import make_report

    run_dir = Path(args.run_dir)
    if not (run_dir / "metrics.jsonl").is_file():
        raise ConfigError(f"{run_dir} has no metrics.jsonl; pass the run directory of a `steadyrl train` run.")
    print(make_report(run_dir))
    return 0


def _cmd_methods(args: argparse.Namespace) -> int:
    from steadyrl.methods_table import methods_table

    print(methods_table(markdown=args.markdown))
    return 0


def _cmd_bench_stability(args: argparse.Namespace) -> int:
    from steadyrl.bench.stability import full_spec, quick_spec

    changes: dict = {"force": args.force, "extra": tuple(args.set or [])}
    for name, parse in (("methods", str), ("lrs", float), ("seeds", int)):
        value = getattr(args, name)
        if value:
            try:
                changes[name] = tuple(parse(v) for v in value.split(",") if v.strip())
            except ValueError as exc:
                raise ConfigError(f"--{name} {value!r} must be a comma-separated list, e.g. --lrs 3e-4,1e-3.") from exc
    for name in ("steps", "workers", "out", "model", "device", "configs"):
        value = getattr(args, name)
        if value is not None:
            changes["configs_dir" if name == "configs" else name] = value
    spec = (quick_spec if args.quick else full_spec)(**changes)
    if args.report_only:
        from steadyrl.bench.report_stability import read_results, write_report

        out = Path(spec.out)
        if not (out / "results.jsonl").is_file():
            raise ConfigError(f"{out} has no results.jsonl; pass the --out of a finished `steadyrl bench stability`.")
        meta_path = out / "meta.json"
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        print("\n".join(str(p) for p in write_report(out, read_results(out / "results.jsonl"), meta)))
        return 0
    from steadyrl.bench.stability import run_stability

    run_stability(spec, command=" ".join(["steadyrl", *sys.argv[1:]]) if sys.argv[1:2] == ["bench"] else None)
    return 0


def _cmd_bench_mechanisms(args: argparse.Namespace) -> int:
    from steadyrl.bench.mechanisms import full_spec, quick_spec

    changes: dict = {"force": args.force}
    for name, parse in (("items", str), ("seeds", int)):
        value = getattr(args, name)
        if value:
            try:
                changes[name] = tuple(parse(v) for v in value.split(",") if v.strip())
            except ValueError as exc:
                raise ConfigError(f"--{name} {value!r} must be a comma-separated list, e.g. --seeds 0,1,2.") from exc
    for name in ("out", "workers"):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    spec = (quick_spec if args.quick else full_spec)(**changes)
    if args.report_only:
        from steadyrl.bench.report_mechanisms import rerender

        print("\n".join(str(p) for p in rerender(spec.out)))
        return 0
    from steadyrl.bench.mechanisms import run_mechanisms

    run_mechanisms(spec, command=" ".join(["steadyrl", *sys.argv[1:]]) if sys.argv[1:2] == ["bench"] else None)
    return 0


def _json_object(text: str, flag: str = "--task-kwargs") -> dict:
    """A JSON-object option, or a ConfigError that shows the expected form."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{flag} {text!r} is not valid JSON ({exc.msg}); pass an object, e.g. '{{\"max_digits\": 3}}'."
        ) from exc
    if not isinstance(value, dict):
        raise ConfigError(f"{flag} must be a JSON object, got {text!r}; e.g. '{{\"max_digits\": 3}}'.")
    return value


def _packaged_config(name: str) -> Path:
    from importlib import resources

    return Path(str(resources.files("steadyrl") / "configs" / name))


def _print_summary(summary: dict, run_dir: str) -> None:
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 reports
        return
    start, end = summary.get("eval_start"), summary.get("eval_end")
    metric = summary.get("eval_metric") or "held-out accuracy"
    if start is not None and end is not None:
        print(f"\n{metric}: {start:.3f} before RL -> {end:.3f} after {summary['steps']} steps ({summary['wall_s']:.0f}s)")
    print(f"run directory: {run_dir}  (report: {run_dir}/report/index.html)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="steadyrl", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train with a YAML config")
    t.add_argument("config", help="YAML config (see configs/)")
    t.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override, e.g. optim.lr=1e-4")
    t.set_defaults(fn=_cmd_train)

    q = sub.add_parser("quickstart", help="the demo: GRPO on the embedded tiny model, on CPU, in minutes")
    q.add_argument("--out", default="runs/quickstart")
    q.add_argument("--config", default=None, help="another config instead of the packaged quickstart.yaml")
    q.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    q.set_defaults(fn=_cmd_quickstart)

    w = sub.add_parser("warmstart", help="SFT warm start on task demonstrations (builds the embedded model)")
    w.add_argument("--out", default="runs/warmstart")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--steps", type=int, default=None)
    w.add_argument("--task", default=None)
    w.add_argument("--task-kwargs", default=None, help="JSON object of task options")
    w.add_argument("--init-from", default=None, help="fine-tune this model instead of a fresh tiny one")
    w.add_argument("--arch", default=None, help="qwen2 | llama | qwen2_moe | qwen3_moe (fresh tiny model)")
    w.add_argument("--model-kwargs", default=None, help="JSON object of extra tiny_model_config arguments")
    w.add_argument("--device", default="cpu")
    w.add_argument("--overwrite", action="store_true")
    w.set_defaults(fn=_cmd_warmstart)

    e = sub.add_parser("eval", help="held-out accuracy of a model on a task")
    e.add_argument("model", help="hub id, local directory or embedded:<name>")
    e.add_argument("--task", default="arithmetic")
    e.add_argument("--task-kwargs", default=None)
    e.add_argument("--num-prompts", type=int, default=0)
    e.add_argument("--pass-k", type=int, default=8)
    e.add_argument("--max-new-tokens", type=int, default=8)
    e.add_argument("--temperature", type=float, default=1.0)
    e.add_argument("--pad-token", default=None)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--device", default="cpu")
    e.set_defaults(fn=_cmd_eval)

    r = sub.add_parser("report", help="plots and an HTML page for a run directory")
    r.add_argument("run_dir")
    r.set_defaults(fn=_cmd_report)

    b = sub.add_parser(
        "bench", help="benchmarks: `bench stability` (the collapse map), `bench mechanisms` (docs/stability-lab.md)"
    )
    bench = b.add_subparsers(dest="bench", required=True)
    st = bench.add_parser("stability", help="methods x learning rates x seeds; collapse map report")
    st.add_argument("--quick", action="store_true", help="the CPU map: 7 methods, 3 LRs, 2 seeds, 40 steps, 2 workers")
    st.add_argument("--methods", default=None, help="comma-separated recipes of configs/stability/, e.g. grpo,capo")
    st.add_argument("--lrs", default=None, help="comma-separated learning rates, e.g. 3e-4,1e-3,3e-3")
    st.add_argument("--seeds", default=None, help="comma-separated seeds, e.g. 0,1,2")
    st.add_argument("--steps", type=int, default=None, help="RL steps per cell")
    st.add_argument("--workers", type=int, default=None, help="parallel processes (default: 2 quick, cpu count full)")
    st.add_argument("--out", default=None, help="output directory (default runs/stability-quick or runs/stability)")
    st.add_argument("--model", default=None, help="model.name_or_path for every cell (default: the recipes')")
    st.add_argument("--device", default=None, help="run.device for every cell (default: cpu quick, auto full)")
    st.add_argument("--configs", default=None, help="directory of <method>.yaml base recipes (default configs/stability)")
    st.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override for every cell")
    st.add_argument("--force", action="store_true", help="rerun cells that already have a result.json")
    st.add_argument("--report-only", action="store_true", help="re-render the report from OUT/results.jsonl")
    st.set_defaults(fn=_cmd_bench_stability)
    mk = bench.add_parser("mechanisms", help="the mechanism lab: each seed method's claimed quantity, measured")
    mk.add_argument("--quick", action="store_true", help="the CPU lab: 3 seeds, small grids, 2 workers")
    mk.add_argument("--items", default=None, help="comma-separated subset of formulation,routing,capo,capo_collapse,pcr,lco,guard")
    mk.add_argument("--seeds", default=None, help="comma-separated seeds, e.g. 0,1,2")
    mk.add_argument("--workers", type=int, default=None, help="parallel processes (default: 2 quick, cpu count full)")
    mk.add_argument("--out", default=None, help="output directory (default runs/mechanisms-quick or runs/mechanisms)")
    mk.add_argument("--force", action="store_true", help="rerun jobs that already have a result")
    mk.add_argument("--report-only", action="store_true", help="re-render the report from OUT/results.jsonl")
    mk.set_defaults(fn=_cmd_bench_mechanisms)

    m = sub.add_parser("methods", help="list the registered methods")
    m.add_argument("--markdown", action="store_true")
    m.set_defaults(fn=_cmd_methods)
    return p


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors a person fixes by changing their input: printed as one line, without a traceback."""
    from steadyrl.models import ModelLoadError
    from steadyrl.tasks import RewardError, TaskError

    return (ConfigError, ModelLoadError, TaskError, RewardError, FileNotFoundError)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except Exception as exc:
        # ConfigError is tested first: _user_errors() imports transformers, seconds a config typo need not wait.
        if not isinstance(exc, ConfigError) and not isinstance(exc, _user_errors()):
            raise
        print(f"steadyrl: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
