"""steadyrl: stable RL post-training of language models with verifiable rewards (GRPO and its family).

Train a model with a YAML recipe (`steadyrl train CONFIG`), see what a recipe resolves to with every key
explained (`steadyrl config CONFIG`), list the stabilisation methods (`steadyrl methods`), evaluate a model
(`steadyrl eval`), report on a run (`steadyrl report`), or try it all on CPU in minutes (`steadyrl quickstart`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from steadyrl.cli_stops import interrupted, is_main_process, one_line
from steadyrl.config import ConfigError


def _cmd_train(args: argparse.Namespace) -> int:
    from steadyrl.config_load import load_config

    notes: list[str] = []
    cfg = load_config(args.config, args.set, notes=notes)  # before the heavy imports: an error is reported at once
    _preflight(args, cfg)
    from steadyrl.train.trainer import Trainer

    args.trainer = Trainer(cfg)  # validates every setting first: a note about a config that fails would be noise
    for note in notes:
        print(f"steadyrl: note: {note}", file=sys.stderr)
    summary = args.trainer.train()
    _print_summary(summary, cfg)
    return _exit_code(summary)


def _exit_code(summary: dict | None) -> int:
    """3 when the run ended collapsed (the stability lab's verdict) or never scored a completion; else 0."""
    verdict = (summary or {}).get("verdict") or {}
    return 3 if verdict.get("collapsed") or verdict.get("unscorable") else 0


def _cmd_config(args: argparse.Namespace) -> int:
    from steadyrl.config_load import load_config
    from steadyrl.config_reference import describe

    cfg = load_config(args.config, args.set)
    sources = ([str(args.config)] if args.config else []) + ([f"--set {' '.join(args.set)}"] if args.set else [])
    print(describe(cfg, sources, comments=not args.no_comments), end="")
    return 0


def _preflight(args: argparse.Namespace, cfg) -> None:
    """Checks that need only the config, run before a model loads; remembers the run for error messages."""
    from steadyrl.runtime.paths import check_writable_dir

    args.cfg = cfg
    check_writable_dir(cfg.run.output_dir, "run.output_dir")  # Trainer checks it too; here it takes no imports
    if cfg.logging.wandb_project:
        from steadyrl.report.sinks import require_wandb

        require_wandb()


def _cmd_quickstart(args: argparse.Namespace) -> int:
    from steadyrl.config_load import load_config
    from steadyrl.train.trainer import Trainer

    path = Path(args.config) if args.config else _packaged_config("quickstart.yaml")
    overrides = [f"run.output_dir={args.out}"] + list(args.set or [])
    cfg = load_config(path, overrides)
    _preflight(args, cfg)
    args.starts_over = True  # a rerun replaces the previous quickstart run: never say it resumes
    from steadyrl.runtime import rundir

    # each `make demo` is a fresh run: clear steadyrl's own files from an earlier run here, never anything else
    if rundir.clear_own(cfg.run.output_dir):
        print(f"replacing the previous run in {cfg.run.output_dir} (files steadyrl did not write are kept)")
    print(f"steadyrl quickstart: GRPO on the embedded tiny model ({cfg.model.name_or_path}), task {cfg.task.name}")
    print(f"config {path}; run directory {cfg.run.output_dir}")
    args.trainer = Trainer(cfg)
    summary = args.trainer.train()
    _print_summary(summary, cfg)
    return _exit_code(summary)


def _cmd_doctor(args: argparse.Namespace) -> int:
    import tempfile

    from steadyrl.config_load import load_config

    with tempfile.TemporaryDirectory() as tmp:
        overrides = [*args.set, f"run.output_dir={tmp}/run", "run.resume=false", "logging.report=false"]
        cfg = load_config(args.config, overrides)
        from steadyrl.train.doctor import check_ratios
        from steadyrl.train.trainer import Trainer

        report = check_ratios(Trainer(cfg))
    print("\n".join(report.lines()))
    return 0 if report.ok else 1


def _cmd_warmstart(args: argparse.Namespace) -> int:
    from steadyrl.warmstart import WarmstartConfig, check_output_dir, warmstart

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
    from steadyrl.config import ModelConfig
    from steadyrl.evaluate import evaluate
    from steadyrl.models import load_model, load_tokenizer
    from steadyrl.models.chat import renderer_for
    from steadyrl.registry import build_backend, build_task
    from steadyrl.rollout.base import SamplingParams
    from steadyrl.train.setup import resolve_model_path

    task = build_task(args.task, **(_json_object(args.task_kwargs) if args.task_kwargs else {}))  # before loading
    path = resolve_model_path(args.model)
    tokenizer = load_tokenizer(path, pad_token=args.pad_token)
    renderer = renderer_for(ModelConfig(prompt_format=args.prompt_format, system_prompt=args.system_prompt), tokenizer)
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
        renderer=renderer,
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

    changes: dict = {"force": args.force, "setting": args.setting}
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
    for item, params in _item_params(args.set or []).items():
        changes[item] = params
    spec = (quick_spec if args.quick else full_spec)(**changes)
    if args.report_only:
        from steadyrl.bench.report_mechanisms import rerender

        print("\n".join(str(p) for p in rerender(spec.out)))
        return 0
    from steadyrl.bench.mechanisms import run_mechanisms

    run_mechanisms(spec, command=" ".join(["steadyrl", *sys.argv[1:]]) if sys.argv[1:2] == ["bench"] else None)
    return 0


def _item_params(items: list[str]) -> dict[str, dict]:
    """``ITEM.KEY=VALUE`` (VALUE parsed as YAML; lists become tuples) -> {item: {key: value}} for bench mechanisms."""
    import contextlib

    import yaml

    out: dict[str, dict] = {}
    for text in items:
        key, sep, value = text.partition("=")
        item, dot, name = key.strip().partition(".")
        if not sep or not dot or item not in ("formulation", "routing", "capo", "pcr", "lco") or not name:
            raise ConfigError(f"--set {text!r} must look like ITEM.KEY=VALUE with ITEM one of formulation, routing, capo, "
                              "pcr, lco, e.g. --set formulation.lr=3e-4.")
        parsed = yaml.safe_load(value)
        if isinstance(parsed, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            with contextlib.suppress(ValueError):
                parsed = float(parsed)
        out.setdefault(item, {})[name] = tuple(parsed) if isinstance(parsed, list) else parsed
    return out


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


def _print_summary(summary: dict, cfg) -> None:
    if not is_main_process():  # under torchrun only rank 0 reports
        return
    run_dir = cfg.run.output_dir
    start, end = summary.get("eval_start"), summary.get("eval_end")
    metric = summary.get("eval_metric") or "held-out accuracy"
    if start is not None and end is not None:
        print(f"\n{metric}: {start:.3f} before RL -> {end:.3f} after {summary['steps']} steps ({summary['wall_s']:.0f}s)")
    report = Path(run_dir) / "report" / "index.html"
    if cfg.logging.report and report.is_file():
        print(f"run directory: {run_dir}  (report: {report})")
    else:  # no report was written: say how to make one instead of pointing to a file that is not there
        print(f"run directory: {run_dir}  (no report written; `steadyrl report {run_dir}` makes one)")


_TRAIN_EPILOG = """\
The config reference: `steadyrl config` prints every key with its default and meaning, and
`steadyrl config CONFIG --set ...` the config this command would train with (defaults, then CONFIG, then
--set). Recipes: configs/ in the repository.

The run directory is run.output_dir. When it already holds a checkpoint of this run, training resumes from
its latest checkpoint (run.resume=true, the default): after a crash or Ctrl-C, rerun the same command.
"""


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("steadyrl")
    except PackageNotFoundError:  # run from a source tree without an install
        from steadyrl import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="steadyrl", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--version", action="version", version=f"steadyrl {_version()}")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser(
        "train", help="train with a YAML config (resumes a run directory that has a checkpoint)",
        description="RL-train a model with a YAML config.", epilog=_TRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    t.add_argument("config", help="YAML config, e.g. configs/quickstart.yaml (keys: `steadyrl config`)")
    t.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override, e.g. optim.lr=1e-4")
    t.set_defaults(fn=_cmd_train)

    c = sub.add_parser(
        "config", help="print a config with every key's default and meaning (the config reference)",
        description="Print the config `steadyrl train CONFIG --set ...` would use, as YAML that loads back, with "
        "each key's meaning and each method's settings as comments. Without CONFIG: the defaults.",
    )
    c.add_argument("config", nargs="?", default=None, help="YAML config (default: none, only the defaults)")
    c.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override, e.g. optim.lr=1e-4")
    c.add_argument("--no-comments", action="store_true", help="the YAML alone")
    c.set_defaults(fn=_cmd_config)

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

    e = sub.add_parser(
        "eval", help="held-out accuracy of a model on a task",
        description="Greedy accuracy and sampled pass@1 / pass@k of a model on a task's held-out prompts, as JSON.",
    )
    e.add_argument("model", help="hub id, local directory (e.g. RUN_DIR/final) or embedded:<name>")
    e.add_argument("--task", default="arithmetic", help="registered task (default arithmetic; `steadyrl config` lists them)")
    e.add_argument("--task-kwargs", default=None, help="JSON object of task options, e.g. '{\"max_digits\": 3}'")
    e.add_argument("--num-prompts", type=int, default=0, help="held-out prompts to use (default 0 = all)")
    e.add_argument("--pass-k", type=int, default=8, help="k of pass@k, sampled at --temperature (0 = greedy only)")
    e.add_argument("--max-new-tokens", type=int, default=8, help="completion budget in tokens (default 8)")
    e.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of pass@k (default 1.0)")
    e.add_argument("--pad-token", default=None, help="pad token when the tokenizer has none (e.g. its EOS token)")
    e.add_argument("--prompt-format", default="auto", choices=["auto", "chat", "raw"],
                   help="as model.prompt_format in training: the chat template when the tokenizer has one (auto)")
    e.add_argument("--system-prompt", default=None, help="as model.system_prompt in training")
    e.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    e.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default cpu)")
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
    st.add_argument("--configs", default=None, help="directory of <method>.yaml base recipes (default: the packaged ones, configs/stability)")
    st.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override for every cell")
    st.add_argument("--force", action="store_true", help="rerun cells that already have a result.json")
    st.add_argument("--report-only", action="store_true", help="re-render the report from OUT/results.jsonl")
    st.set_defaults(fn=_cmd_bench_stability)
    mk = bench.add_parser("mechanisms", help="the mechanism lab: each seed method's claimed quantity, measured")
    mk.add_argument("--quick", action="store_true", help="the CPU lab: 3 seeds, small grids, 2 workers")
    mk.add_argument("--items", default=None, help="comma-separated subset of formulation,routing,capo,capo_collapse,pcr,lco,guard")
    mk.add_argument("--seeds", default=None, help="comma-separated seeds, e.g. 0,1,2")
    mk.add_argument("--setting", default="short", choices=["short", "scratchpad"],
                    help="short: the embedded models, ~3.5-token answers (default); scratchpad: the length axis, "
                         "embedded:tiny-adder-scratchpad, 21-34-token answers (items formulation, capo)")
    mk.add_argument("--workers", type=int, default=None, help="parallel processes (default: 2 quick, cpu count full)")
    mk.add_argument("--out", default=None, help="output directory (default runs/mechanisms-quick or runs/mechanisms)")
    mk.add_argument("--force", action="store_true", help="rerun jobs that already have a result")
    mk.add_argument("--set", nargs="*", default=[], metavar="ITEM.KEY=VALUE",
                    help="an item's parameter (its Spec field), e.g. formulation.lr=3e-4 formulation.trajectory_mismatches=[fp32]")
    mk.add_argument("--report-only", action="store_true", help="re-render the report from OUT/results.jsonl")
    mk.set_defaults(fn=_cmd_bench_mechanisms)

    d = sub.add_parser(
        "doctor",
        help="check that the sampler/trainer importance ratio is 1 at equal weights, and name the cause if not",
    )
    d.add_argument("config", help="YAML config (the run it describes is not touched: a temporary directory is used)")
    d.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override config keys")
    d.set_defaults(fn=_cmd_doctor)

    m = sub.add_parser("methods", help="list the registered methods")
    m.add_argument("--markdown", action="store_true")
    m.set_defaults(fn=_cmd_methods)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run a command. Errors a person can act on are one line on stderr and exit 2; Ctrl-C says where the run
    stopped and how to resume, exit 130. Under torchrun only rank 0 prints (every rank exits the same)."""
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        if is_main_process():
            print(f"\nsteadyrl: {interrupted(args)}", file=sys.stderr)
        return 130
    except Exception as exc:
        message = one_line(args, exc)
        if message is None:
            raise
        if is_main_process():
            print(f"steadyrl: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
