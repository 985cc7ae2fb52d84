"""Overhead of every registered loss and stabiliser: policy-update time on ONE fixed scored rollout batch,
divided by the time of the method's reference (plain GRPO, GRPO+KL or the MoE model without replay) in the
same run. Also the trainer pieces of issue 14: the optimal token baseline's Σπ² forward, the adaptive entropy
bonus, VCPO (ESS learning rate; with the optimal baseline's per-trajectory gradient norms), the FP32 LM head
and fp16 autocast with loss scaling.

    python benchmarks/overhead.py --only vcpo "entropy bonus" optimal_token lm_head_fp32 "autocast float16" --no-moe

    python benchmarks/overhead.py                                  # CPU, tiny model, a few minutes
    python benchmarks/overhead.py --device cuda --out overhead_gpu.md
    python benchmarks/overhead.py --smoke                          # seconds (tests/bench)

What is timed, per configuration: ``Trainer.scorer.score`` (the π_old / π_ref forwards the configuration
needs: π_ref for KL, π_old for N > 1 mini-batches or R2, the MoE routing diagnostics) plus
``PolicyUpdater.update`` (every optimizer step of the rollout batch). Rollout and reward are not timed: every
configuration sees the same batch, generated once with the HF backend; its rewards are Bernoulli(0.5) with a
fixed seed (so the advantages are not all zero on a random model) and its advantages are GRPO's.

Every configuration is a real ``Trainer`` built from a ``TrainConfig`` (registry, setup helpers and updater
exactly as in training) on one shared model. Before every timed call the model weights are restored to the
initial ones, the optimizer to the same freshly initialised AdamW state and a CAPO filter to its state after
warm-up, so each call does the same work. Warm-up calls first, then rounds in which every configuration
runs once, in a fresh (seeded) random order, so drift and cache effects hit every configuration alike; the
median is reported.

Memory: on CUDA, ``torch.cuda.max_memory_allocated`` during the call minus the memory allocated just before
it (the step's transient memory: activations, gradients, combiner buffers, π_old / π_ref forwards; the
resident weights and optimizer state are excluded). On CPU there is no allocator counter for torch tensors
(tracemalloc does not see them, RSS hardly moves after warm-up), so memory is "n/a".
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import random
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from steadyrl import registry
from steadyrl.bench.machine import device_line
from steadyrl.config_load import load_config
from steadyrl.models import build_char_tokenizer, build_tiny_model, tiny_model_config
from steadyrl.models.tokenizer import ARITHMETIC_ALPHABET
from steadyrl.ops.masking import masked_fill_zero
from steadyrl.registry import build_task
from steadyrl.runtime.checkpoint import save_pretrained_atomic
from steadyrl.train.batch import ScoredBatch
from steadyrl.train.setup import embedded_available, resolve_model_path
from steadyrl.train.trainer import Trainer

# CAPO with the thresholds of configs/capo.yaml (the official recipe), adam optimizer model.
CAPO_RECIPE = (
    "{name: capo, fisher_tau: 1.0e-4, hessian_tau: 1.0e-2, hessian_symmetric: true, level: token, "
    "optimizer_model: adam, betas: [0.9, 0.999], eps: 1.0e-8, top_k: 50}"
)
MINIRL = ["loss={name: reinforce_is, clip_low: 0.2, clip_high: 0.27, is_cap: 5.0}", "aggregation=seq_mean_token_sum"]
KL = ["kl.coef=0.04", "kl.estimator=kl_k3", "kl.reference=initial"]


@dataclass(frozen=True)
class Shape:
    """Model and batch of one benchmark setting."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int | None
    vocab: int | None  # None: the char tokenizer's vocabulary
    prompts: int
    group: int
    new_tokens: int
    micro_batch: int
    moe_hidden: int
    moe_layers: int
    moe_experts: int


SHAPES = {
    # the embedded tiny-adder's shape (steadyrl warmstart defaults)
    "cpu": Shape(128, 4, 4, 4, 384, None, 8, 8, 8, 64, 64, 2, 4),
    "cuda": Shape(1024, 8, 16, 4, 2816, 32_000, 16, 8, 256, 64, 512, 8, 8),
    "smoke": Shape(32, 2, 2, 2, None, None, 2, 4, 4, 8, 32, 2, 4),
}


@dataclass
class Case:
    name: str
    group: str
    overrides: list[str]
    reference: str
    model: str = "dense"
    steps_per_batch: int = 1
    times: list[float] = field(default_factory=list)
    """Seconds per call that the ratios use: process CPU time on CPU, wall time (CUDA-synced) on GPU."""
    wall: list[float] = field(default_factory=list)
    memory: list[float] = field(default_factory=list)
    error: str | None = None


def build_cases(shape: Shape) -> list[Case]:
    batch = shape.prompts * shape.group
    mb = shape.micro_batch
    cases = [
        Case("grpo", "reference", [], "grpo"),
        # the reference's own configuration again: its ratio is the noise floor of every other ratio
        Case("grpo (control)", "reference", [], "grpo"),
        Case("grpo+kl", "reference", KL, "grpo"),
    ]
    for name in registry.LOSSES:
        if name != "ppo_clip":
            cases.append(Case(f"loss={name}", "loss", [f"loss={name}"], "grpo"))
    for name in registry.FAMILIES["correction"].table:
        cases.append(Case(f"correction={name}", "correction", [f"correction={name}"], "grpo"))
    for name in registry.TOKEN_FILTERS:
        if name != "capo":
            cases.append(Case(f"token_filter={name}", "token filter", [f"token_filters=[{name}]"], "grpo"))
    cases.append(Case("capo (recipe, adam model)", "token filter", [f"token_filters=[{CAPO_RECIPE}]"], "grpo"))
    # Issue 14's trainer pieces: a forward statistic, a loss term with a controller, VCPO, precision switches.
    cases.append(Case("advantage=optimal_token_baseline", "advantage", ["advantage=optimal_token_baseline"], "grpo"))
    cases.append(Case("entropy bonus (adaptive)", "controller", ["entropy.adaptive=true", "entropy.target=100.0"], "grpo"))
    cases.append(Case("vcpo ESS learning rate", "controller", ["vcpo.baseline=false"], "grpo"))
    cases.append(Case("vcpo ESS + optimal baseline", "controller", ["vcpo.baseline=true"], "grpo"))
    cases.append(Case("lm_head_fp32", "precision", ["model.lm_head_fp32=true"], "grpo"))
    cases.append(Case("autocast float16 + loss scale", "precision", ["model.autocast=float16", "model.autocast_bf16=false"], "grpo"))
    sgd = CAPO_RECIPE.replace("optimizer_model: adam", "optimizer_model: sgd")
    cases.append(Case("capo (sgd model)", "token filter", [f"token_filters=[{sgd}]"], "grpo"))
    # Combiners: one sample = one micro-batch = one GRPO group (configs/pcr.yaml), against GRPO+KL at that size.
    small = [f"optim.micro_batch_size={shape.group}"]
    cases.append(Case(f"grpo+kl (micro-batch {shape.group})", "combiner", KL + small, "grpo+kl"))
    ref_small = f"grpo+kl (micro-batch {shape.group})"
    for name in registry.COMBINERS:
        if name != "sum":
            spec = f"combiner={{name: {name}, modules: mlp, blocks: module}}"
            cases.append(Case(f"combiner={name}", "combiner", KL + small + [spec], ref_small))
    for n in (1, 2, 4, 8):
        if batch % n == 0:
            over = MINIRL + [f"optim.mini_batches={n}", f"optim.micro_batch_size={min(mb, batch // n)}"]
            cases.append(Case(f"minirl N={n}", "minirl", over, "grpo", steps_per_batch=n))
    for n in (1, 4):
        if batch % n:
            continue
        base = [] if n == 1 else MINIRL + [f"optim.mini_batches={n}", f"optim.micro_batch_size={min(mb, batch // n)}"]
        label = "grpo" if n == 1 else f"minirl N={n}"
        for replay in ("none", "R2", "R3"):
            cases.append(
                Case(
                    f"moe {label} replay={replay}",
                    "routing replay",
                    base + [f"routing_replay={replay}"],
                    f"moe {label} replay=none",
                    model="moe",
                    steps_per_batch=n,
                )
            )
    return cases


# ----------------------------------------------------------------------------- models and the batch


def use_embedded(args) -> bool:
    if args.model == "auto":
        return args.device == "cpu" and not args.smoke and not args.vocab and embedded_available()
    return args.model == "embedded"


def save_models(shape: Shape, root: Path, embedded: bool) -> dict[str, str]:
    """Directories of the dense and the MoE model (random init, seed 0; the embedded tiny-adder if asked)."""
    tok = build_char_tokenizer(ARITHMETIC_ALPHABET)
    vocab = shape.vocab or len(tok)
    paths = {}
    if embedded:
        paths["dense"] = resolve_model_path("embedded:tiny-adder")
    else:
        cfg = tiny_model_config(
            "qwen2",
            vocab_size=vocab,
            hidden_size=shape.hidden,
            num_layers=shape.layers,
            num_heads=shape.heads,
            num_kv_heads=shape.kv_heads,
            intermediate_size=shape.intermediate,
            max_position_embeddings=max(256, 2 * shape.new_tokens + 64),
        )
        paths["dense"] = str(save_pretrained_atomic(build_tiny_model(cfg, seed=0), tok, root / "dense"))
    moe_cfg = tiny_model_config(
        "qwen2_moe",
        vocab_size=vocab,
        hidden_size=shape.moe_hidden,
        num_layers=shape.moe_layers,
        num_heads=4,
        num_experts=shape.moe_experts,
        num_experts_per_tok=2,
        max_position_embeddings=max(256, 2 * shape.new_tokens + 64),
    )
    paths["moe"] = str(save_pretrained_atomic(build_tiny_model(moe_cfg, seed=0), tok, root / "moe"))
    return paths


def base_overrides(shape: Shape, model_dir: str, device: str, out_dir: Path) -> list[str]:
    return [
        f"model.name_or_path={model_dir}",
        f"model.autocast_bf16={str(device == 'cuda').lower()}",
        "task.name=arithmetic",
        f"rollout.prompts_per_step={shape.prompts}",
        f"rollout.group_size={shape.group}",
        f"rollout.max_new_tokens={shape.new_tokens}",
        "rollout.temperature=1.0",
        "advantage=grpo",
        "loss=ppo_clip",
        "aggregation=token_mean",
        "optim.steps=1000",
        "optim.lr=3.0e-4",
        "optim.schedule=constant",
        "optim.warmup_steps=0",
        "optim.grad_clip=1.0",
        f"optim.micro_batch_size={shape.micro_batch}",
        "eval.every=0",
        "logging.progress=false",
        "logging.report=false",
        "logging.tensorboard=false",
        "checkpoint.save_final_model=false",
        f"run.output_dir={out_dir}",
        f"run.device={device}",
        "run.resume=false",
        "run.seed=0",
    ]


def fixed_batch(trainer: Trainer, seed: int) -> ScoredBatch:
    """One rollout batch from the HF backend, Bernoulli(0.5) rewards (seeded), GRPO advantages."""
    rollout = trainer.collector.collect(1).batch.rollout
    g = torch.Generator().manual_seed(seed)
    rewards = torch.bernoulli(torch.full((rollout.batch_size,), 0.5), generator=g).to(rollout.prompt_ids.device)
    adv = registry.resolve("advantage", "grpo")(rewards, trainer.cfg.rollout.group_size)
    advantages = adv.advantages[:, None].expand_as(rollout.rollout_logprobs)
    advantages = masked_fill_zero(advantages.float(), rollout.response_mask).detach()
    return ScoredBatch(rollout, rewards=rewards, advantages=advantages, sample_mask=adv.sample_mask)


def fresh_adam_state(optimizer: torch.optim.Optimizer) -> dict:
    """AdamW state after one step with zero gradients (moments allocated, parameters unchanged at wd 0)."""
    saved = [p.data.clone() for g in optimizer.param_groups for p in g["params"]]
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        for p, s in zip((p for g in optimizer.param_groups for p in g["params"]), saved):
            p.copy_(s)
    state = copy.deepcopy(optimizer.state_dict())
    optimizer.state.clear()
    return state


def describe(model: torch.nn.Module, batch: ScoredBatch) -> str:
    c = model.config
    experts = f", {c.num_experts} experts top-{c.num_experts_per_tok}" if getattr(c, "num_experts", None) else ""
    params = sum(p.numel() for p in model.parameters()) / 1e6
    lengths = batch.rollout.response_mask.sum(1).float()
    return (
        f"{c.model_type} hidden {c.hidden_size}, {c.num_hidden_layers} layers, vocab {c.vocab_size}{experts} "
        f"({params:.2f}M parameters); batch {batch.batch_size} completions, prompt width {batch.rollout.prompt_ids.shape[1]}, "
        f"mean completion length {lengths.mean():.1f} of {batch.rollout.completion_ids.shape[1]}"
    )


# ----------------------------------------------------------------------------- running


class Runner:
    """One configuration: its Trainer (on the shared model) and how to restore and time one update."""

    def __init__(self, case: Case, trainer: Trainer, batch: ScoredBatch, init: dict, ref_model, sync: Callable):
        self.case, self.trainer, self.batch, self.init, self.sync = case, trainer, batch, init, sync
        if trainer.scorer.ref_model is not None:
            trainer.scorer.ref_model = ref_model  # one shared frozen reference instead of one per configuration
        self.filter_states: dict | None = None

    def restore(self) -> None:
        t = self.trainer
        t.model.load_state_dict(self.init["model"])
        t.optimizer.load_state_dict(copy.deepcopy(self.init["optimizer"]))
        if self.filter_states is not None:
            t.updater.load_state_dict(copy.deepcopy(self.filter_states))

    def keep_filter_state(self) -> None:
        self.filter_states = copy.deepcopy(self.trainer.updater.state_dict())

    def run_once(self, record: bool) -> None:
        self.restore()
        scored = dataclasses.replace(self.batch)  # score fills old / ref log-probs (and R2 routing)
        cuda = self.batch.advantages.device.type == "cuda"
        if cuda:
            self.sync()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        start, start_cpu = time.perf_counter(), time.process_time()
        self.trainer.scorer.score(scored)
        self.trainer.updater.update(scored)
        self.sync()
        wall, cpu_time = time.perf_counter() - start, time.process_time() - start_cpu
        if record:
            self.case.times.append(wall if cuda else cpu_time)
            self.case.wall.append(wall)
            if cuda:
                self.case.memory.append((torch.cuda.max_memory_allocated() - before) / 2**20)
        self.trainer.optimizer.state.clear()  # free the moments until the next restore


def make_runners(args, shape: Shape, cases: list[Case], root: Path, info: dict) -> list[Runner]:
    device = args.device
    paths = save_models(shape, root, use_embedded(args))
    task = build_task("arithmetic")
    tok = build_char_tokenizer(ARITHMETIC_ALPHABET)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    shared: dict[str, dict] = {}
    runners = []
    for i, case in enumerate(cases):
        if case.model == "moe" and args.no_moe:
            continue
        overrides = base_overrides(shape, paths[case.model], device, root / f"run{i}") + case.overrides
        try:
            cfg = load_config(None, overrides)
            kind = shared.get(case.model)
            model = kind["model"] if kind else None
            trainer = Trainer(cfg, model=model, tokenizer=tok, task=task)
            if kind is None:  # the first configuration of this model builds the batch and the snapshots
                base = Trainer(load_config(None, base_overrides(shape, paths[case.model], device, root / f"b{i}")),
                               model=trainer.model, tokenizer=tok, task=task)
                batch = fixed_batch(base, args.seed)
                origin = "embedded:tiny-adder" if case.model == "dense" and use_embedded(args) else "random init"
                info[case.model] = f"{origin}, " + describe(trainer.model, batch)
                kind = shared[case.model] = {
                    "model": trainer.model,
                    "batch": batch,
                    "ref": None,
                    "init": {
                        "model": copy.deepcopy(trainer.model.state_dict()),
                        "optimizer": fresh_adam_state(trainer.optimizer),
                    },
                }
            if trainer.scorer.ref_model is not None and kind["ref"] is None:
                kind["ref"] = trainer.scorer.ref_model
            runners.append(Runner(case, trainer, kind["batch"], kind["init"], kind["ref"], sync))
        except Exception as err:  # noqa: BLE001 - one broken configuration must not hide the others
            case.error = f"{type(err).__name__}: {err}"
            print(f"[overhead] {case.name}: {case.error}", file=sys.stderr)
    return runners


def resolve_shape(args) -> Shape:
    shape = SHAPES["smoke" if args.smoke else args.device]
    if args.prompts:
        shape = dataclasses.replace(shape, prompts=args.prompts)
    if args.new_tokens:
        shape = dataclasses.replace(shape, new_tokens=args.new_tokens)
    if args.vocab:
        shape = dataclasses.replace(shape, vocab=args.vocab)
    return shape


def run(args, shape: Shape, info: dict) -> list[Case]:
    cases = build_cases(shape)
    if args.only:
        by_name = {c.name: c for c in cases}
        keep = {c.name for c in cases if any(s in c.name for s in args.only)}
        while True:  # add the references (and theirs) of the chosen configurations
            more = {by_name[n].reference for n in keep} - keep
            if not more:
                break
            keep |= more
        cases = [c for c in cases if c.name in keep]
    with tempfile.TemporaryDirectory(prefix="steadyrl-overhead-") as tmp:
        runners = make_runners(args, shape, cases, Path(tmp), info)
        for _ in range(args.warmup):
            for r in list(runners):
                try:
                    r.run_once(record=False)
                except Exception as err:  # noqa: BLE001
                    r.case.error = f"{type(err).__name__}: {err}"
                    print(f"[overhead] {r.case.name}: {r.case.error}", file=sys.stderr)
                    runners.remove(r)
        for r in runners:
            r.keep_filter_state()
        order = random.Random(args.seed)
        for rep in range(args.repeats):
            # A fresh random order each round: a fixed ring would always put the same configuration right after
            # the switch between the dense and the MoE model (cold caches), biasing its time.
            for r in order.sample(runners, len(runners)):
                r.run_once(record=True)
            print(f"[overhead] round {rep + 1}/{args.repeats} done", file=sys.stderr)
    return cases


# ----------------------------------------------------------------------------- report


def paired_ratios(case: Case, ref: Case) -> list[float]:
    """Per-round ratios: round r of every configuration ran within one pass over all of them, close in time."""
    return [t / r for t, r in zip(case.times, ref.times)]


def table(cases: list[Case]) -> str:
    """Ratio = median time / the reference's median time; range = min-max of the per-round paired ratios."""
    by_name = {c.name: c for c in cases}
    lines = [
        "| configuration | group | reference | step ms (median) | wall ms (median) | ratio | ratio range "
        "| per optimizer step | step memory MiB | memory ratio |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in cases:
        ref = by_name[c.reference]
        if not c.times or not ref.times:
            lines.append(f"| {c.name} | {c.group} | {c.reference} | error: {c.error or ref.error or 'not run'} ||||||")
            continue
        ratio = statistics.median(c.times) / statistics.median(ref.times)
        paired = paired_ratios(c, ref)
        per_step = ""
        if c.steps_per_batch != ref.steps_per_batch:
            per_step = f"{ratio * ref.steps_per_batch / c.steps_per_batch:.2f}x"
        memory, mem_ratio = "n/a", "n/a"
        if c.memory and ref.memory:
            mem, mem_ref = statistics.median(c.memory), statistics.median(ref.memory)
            memory, mem_ratio = f"{mem:.0f}", f"{mem / max(mem_ref, 1e-9):.2f}x"
        lines.append(
            f"| {c.name} | {c.group} | {c.reference} | {1000 * statistics.median(c.times):.1f} "
            f"| {1000 * statistics.median(c.wall):.1f} "
            f"| {ratio:.2f}x | {min(paired):.2f}-{max(paired):.2f} | {per_step} "
            f"| {memory} | {mem_ratio} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--smoke", action="store_true", help="seconds: smallest model, no warm-up, 1 repeat")
    p.add_argument("--warmup", type=int, help="untimed calls per configuration (default: 1 on CPU, 2 on CUDA)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per configuration (median reported)")
    p.add_argument("--prompts", type=int, default=0, help="override P (prompts per batch)")
    p.add_argument("--new-tokens", type=int, default=0, help="override the completion length")
    p.add_argument("--vocab", type=int, default=0, help="override the vocabulary size of the random models")
    p.add_argument("--only", nargs="*", help="run configurations whose name contains one of these (plus references)")
    p.add_argument(
        "--model",
        choices=("auto", "embedded", "random"),
        default="auto",
        help="dense model: the shipped embedded:tiny-adder or a random init of the shape; auto = embedded on CPU "
        "when it is shipped (and no --vocab / --smoke), else random",
    )
    p.add_argument("--no-moe", action="store_true", help="skip the routing-replay (MoE) rows")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU (1: robust on a shared CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="also write the markdown table to this file")
    args = p.parse_args(argv)
    if args.warmup is None:
        args.warmup = 2 if args.device == "cuda" else 1
    if args.smoke:
        args.warmup, args.repeats = 0, 1
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    shape = resolve_shape(args)
    info: dict[str, str] = {}
    cases = run(args, shape, info)
    timed = "wall time (CUDA-synced)" if args.device == "cuda" else "process CPU time (one thread; wall time beside it)"
    models = "".join(f"Model ({kind}): {text}\n" for kind, text in info.items())
    header = (
        f"Device: {device_line(args.device)}\n"
        f"Command: python benchmarks/{Path(__file__).name} {' '.join(sys.argv[1:] if argv is None else argv)}\n"
        f"{models}"
        f"Batch: {shape.prompts} prompts x {shape.group} completions, {shape.new_tokens} new tokens max, "
        f"Bernoulli(0.5) rewards (seed {args.seed}), GRPO advantages; warm-up {args.warmup}, median of {args.repeats}\n"
        f"Timed: score + update, as {timed}; ratio = median / reference median, "
        f"range = min-max of the per-round ratios (the noise)\n"
    )
    text = header + "\n" + table(cases) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 1 if any(c.error for c in cases) else 0


if __name__ == "__main__":
    sys.exit(main())
