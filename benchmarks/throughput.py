"""steadyrl against TRL's GRPOTrainer on the same work, in one run: completions per second and step time.

    python benchmarks/throughput.py                          # CPU, tiny model, a few minutes
    python benchmarks/throughput.py --device cuda            # 0.5B-shaped random Qwen2, 16 x 8, 256 new tokens
    python benchmarks/throughput.py --smoke                  # seconds (tests/bench)

Both sides load the same weights from one directory (a random-init Qwen2 saved with
``save_pretrained_atomic``, plus the char tokenizer), draw the same prompts in the same order (arithmetic
problems, left-filled with spaces to ``--prompt-len`` characters = tokens when it is set), sample
P prompts x G completions per step at temperature 1 (top-p 1, top-k off) up to the same number of new tokens,
score them with the arithmetic task's exact-match reward, use GRPO group advantages, the PPO clipped
surrogate with ε = 0.2 normalised by the batch's token count (steadyrl ``token_mean`` = TRL ``loss_type="dapo"``),
no KL and no reference model, the same micro-batch size and one AdamW (torch) step per batch at the same
learning rate with gradient clipping 1.0 and no gradient checkpointing.

Timing: ``--warmup-steps`` steps first, then ``--steps`` measured steps; a step's time is the wall time between
the end of the previous step and its end (steadyrl: consecutive ``Trainer.rl_step`` calls; TRL: a
``TrainerCallback`` stamping ``on_step_end``), so it covers generation, reward, loss, backward and the
optimizer step, and on TRL's side also its dataloader and metric bookkeeping. Generation is timed separately
by wrapping each side's generate call (with a CUDA sync). Each side runs ``--rounds`` times, alternating
(steadyrl, TRL, steadyrl, TRL, ...) with fresh trainers, so drift on a shared machine hits both; the median
over all measured steps is reported.

Differences that remain: TRL pads prompts and decodes completions its own way, keeps its metric history and
runs through accelerate's dataloader; it computes full-vocabulary logits per micro-batch where steadyrl
computes log-probs in chunks; random-init models stop at EOS at random, so the two sides' completion lengths
match in distribution, not exactly (the mean length of each side is printed).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from steadyrl.bench.machine import device_line
from steadyrl.config_load import load_config
from steadyrl.models import (
    build_char_tokenizer,
    build_tiny_model,
    load_model,
    load_tokenizer,
    tiny_model_config,
)
from steadyrl.models.tokenizer import ARITHMETIC_ALPHABET
from steadyrl.registry import build_task
from steadyrl.runtime.checkpoint import save_pretrained_atomic
from steadyrl.tasks import Prompt
from steadyrl.train.setup import embedded_available, resolve_model_path
from steadyrl.train.trainer import Trainer


@dataclass(frozen=True)
class Setting:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int | None
    vocab: int | None  # None: the char tokenizer's vocabulary
    prompts: int
    generations: int
    new_tokens: int
    prompt_len: int  # 0: the arithmetic prompts as they are (4-8 tokens)
    micro_batch: int
    dtype: str


SETTINGS = {
    # the embedded tiny-adder's shape (steadyrl warmstart defaults)
    "cpu": Setting(128, 4, 4, 4, 384, None, 16, 8, 16, 0, 128, "float32"),
    # Qwen2.5-0.5B's shape (494M parameters), the Performance issue's GPU setting
    "cuda": Setting(896, 24, 14, 2, 4864, 151_936, 16, 8, 256, 64, 16, "bfloat16"),
    "smoke": Setting(32, 2, 2, 2, None, None, 2, 4, 4, 0, 8, "float32"),
}


@dataclass
class SideResult:
    name: str
    step_s: list[float] = field(default_factory=list)
    """Seconds per measured step, by ``clock``: wall time on CUDA, process CPU time on CPU."""
    wall_s: list[float] = field(default_factory=list)
    gen_s: list[float] = field(default_factory=list)
    gen_tokens: list[float] = field(default_factory=list)
    completions: int = 0
    note: str = ""
    error: str | None = None

    def add_steps(self, ends: list[float], walls: list[float], warmup: int) -> None:
        """Step times from consecutive step-end stamps, leaving out the warm-up steps."""
        self.step_s += [b - a for a, b in zip(ends[:-1], ends[1:])][warmup:]
        self.wall_s += [b - a for a, b in zip(walls[:-1], walls[1:])][warmup:]

    def median_step(self) -> float:
        return statistics.median(self.step_s)

    def median_gen(self) -> float:
        return statistics.median(self.gen_s) if self.gen_s else float("nan")

    def mean_len(self) -> float:
        return sum(self.gen_tokens) / max(1, len(self.gen_tokens)) / max(1, self.completions)

    def gen_tokens_per_s(self) -> float:
        return sum(self.gen_tokens) / sum(self.gen_s) if self.gen_s else float("nan")


# ----------------------------------------------------------------------------- shared set-up


def use_embedded(args) -> bool:
    if args.model == "auto":
        return args.device == "cpu" and not args.smoke and embedded_available()
    return args.model == "embedded"


def save_model(s: Setting, root: Path, embedded: bool = False) -> str:
    """The one directory both sides load: the shipped tiny-adder (re-saved) or a random init of ``s``."""
    if embedded:
        path = resolve_model_path("embedded:tiny-adder")
        model = load_model(path, dtype=s.dtype)
        return str(save_pretrained_atomic(model, load_tokenizer(path), root / "model"))
    tok = build_char_tokenizer(ARITHMETIC_ALPHABET, model_max_length=max(256, s.prompt_len + s.new_tokens + 16))
    cfg = tiny_model_config(
        "qwen2",
        vocab_size=s.vocab or len(tok),
        hidden_size=s.hidden,
        num_layers=s.layers,
        num_heads=s.heads,
        num_kv_heads=s.kv_heads,
        intermediate_size=s.intermediate,
        max_position_embeddings=max(256, s.prompt_len + s.new_tokens + 64),
    )
    return str(save_pretrained_atomic(build_tiny_model(cfg, seed=0), tok, root / "model"))


def prompt_list(s: Setting, steps: int) -> list[Prompt]:
    """P x steps distinct arithmetic prompts, left-filled with spaces to ``prompt_len`` characters."""
    prompts = build_task("arithmetic").sample("train", s.prompts * steps, seed=12345)
    if s.prompt_len:
        prompts = [dataclasses.replace(p, text=p.text.rjust(s.prompt_len)) for p in prompts]
    return prompts


class FixedPrompts:
    """The arithmetic task, but ``sample("train", ...)`` hands out the shared prompt list in order."""

    def __init__(self, prompts: list[Prompt]) -> None:
        self.task = build_task("arithmetic")
        self.name = self.task.name
        self.prompts, self.next = prompts, 0

    def sample(self, split: str, n: int, seed: int) -> list[Prompt]:
        if split != "train":
            return self.task.sample(split, n, seed)
        out = self.prompts[self.next : self.next + n]
        self.next += n
        return out

    def eval_prompts(self) -> list[Prompt]:
        return self.task.eval_prompts()

    def reward(self, prompt: Prompt, completion: str) -> float:
        return self.task.reward(prompt, completion)

    def demonstration(self, prompt, rng):
        return self.task.demonstration(prompt, rng)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def clock(device: str) -> float:
    """The time the figures use: wall time on CUDA (after a sync); process CPU time on CPU, where wall time on a
    shared machine measures the neighbours (one intra-op thread, so CPU time is the step's own time)."""
    sync(device)
    return time.perf_counter() if device == "cuda" else time.process_time()


# ----------------------------------------------------------------------------- steadyrl


def run_steadyrl(backend: str, s: Setting, model_dir: str, prompts, args, root: Path, result: SideResult) -> None:
    total = args.warmup_steps + args.steps
    autocast = args.device == "cuda" and s.dtype == "float32"
    cfg = load_config(
        None,
        [
            f"model.name_or_path={model_dir}",
            f"model.dtype={s.dtype}",
            f"model.autocast_bf16={str(autocast).lower()}",
            f"rollout.backend={backend}",
            f"rollout.prompts_per_step={s.prompts}",
            f"rollout.group_size={s.generations}",
            f"rollout.max_new_tokens={s.new_tokens}",
            "rollout.temperature=1.0",
            "rollout.top_p=1.0",
            "rollout.top_k=0",
            "advantage=grpo",
            "loss={name: ppo_clip, clip_low: 0.2, clip_high: 0.2}",
            "aggregation=token_mean",
            f"optim.steps={total}",
            "optim.lr=3.0e-4",
            "optim.schedule=constant",
            "optim.warmup_steps=0",
            "optim.grad_clip=1.0",
            f"optim.micro_batch_size={s.micro_batch}",
            "eval.every=0",
            "logging.progress=false",
            "logging.report=false",
            "logging.tensorboard=false",
            "checkpoint.save_final_model=false",
            f"run.output_dir={root / f'steadyrl-{backend}'}",
            f"run.device={args.device}",
            "run.resume=false",
            "run.seed=0",
        ],
    )
    trainer = Trainer(cfg, task=FixedPrompts(prompts))
    generate = trainer.backend.generate

    def timed_generate(*a, **kw):
        start = clock(args.device)
        out = generate(*a, **kw)
        result.gen_s.append(clock(args.device) - start)
        result.gen_tokens.append(float(out.response_mask.sum()))
        return out

    trainer.backend.generate = timed_generate  # the collector calls the backend instance's attribute
    ends, walls = [clock(args.device)], [time.perf_counter()]
    for step in range(1, total + 1):
        trainer.rl_step(step)
        ends.append(clock(args.device))
        walls.append(time.perf_counter())
    result.add_steps(ends, walls, args.warmup_steps)
    del result.gen_s[-total : len(result.gen_s) - args.steps]
    del result.gen_tokens[-total : len(result.gen_tokens) - args.steps]
    result.completions = s.prompts * s.generations


# ----------------------------------------------------------------------------- TRL


def run_trl(s: Setting, model_dir: str, prompts, args, root: Path, result: SideResult) -> None:
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    total = args.warmup_steps + args.steps
    task = build_task("arithmetic")
    by_text = {p.text: p for p in prompts}

    def arithmetic_reward(prompts, completions, **kwargs):
        return [task.reward(by_text[p], c) for p, c in zip(prompts, completions)]

    ends: list[float] = []
    walls: list[float] = []

    class StepClock(TrainerCallback):
        def on_train_begin(self, *a, **kw):
            ends.append(clock(args.device))
            walls.append(time.perf_counter())

        def on_step_end(self, *a, **kw):
            ends.append(clock(args.device))
            walls.append(time.perf_counter())

    batch = s.prompts * s.generations
    cuda = args.device == "cuda"
    config = GRPOConfig(
        output_dir=str(root / "trl"),
        per_device_train_batch_size=s.micro_batch,
        gradient_accumulation_steps=batch // s.micro_batch,  # one optimizer step per generation batch
        num_generations=s.generations,
        max_completion_length=s.new_tokens,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=0.0,
        loss_type="dapo",
        epsilon=0.2,
        epsilon_high=0.2,
        scale_rewards="group",
        learning_rate=3.0e-4,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        gradient_checkpointing=False,
        bf16=cuda and s.dtype == "float32",  # autocast like steadyrl's model.autocast_bf16; pure bf16 otherwise
        use_cpu=not cuda,
        model_init_kwargs={"dtype": s.dtype},
        max_steps=total,
        shuffle_dataset=False,
        logging_steps=10**9,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        log_completions=False,
        dataloader_num_workers=0,
        seed=0,
    )
    tok = AutoTokenizer.from_pretrained(model_dir)
    dataset = Dataset.from_dict({"prompt": [p.text for p in prompts]})
    trainer = GRPOTrainer(
        model=model_dir,
        reward_funcs=arithmetic_reward,
        args=config,
        train_dataset=dataset,
        processing_class=tok,
        callbacks=[StepClock()],
    )
    model = trainer.model
    generate = model.generate
    eos = tok.eos_token_id

    def timed_generate(*a, **kw):
        start = clock(args.device)
        out = generate(*a, **kw)
        result.gen_s.append(clock(args.device) - start)
        completion = out[:, kw["input_ids"].shape[1] :]
        is_eos = completion == eos
        first = torch.where(is_eos.any(1), is_eos.int().argmax(1), completion.shape[1] - 1)
        result.gen_tokens.append(float((first + 1).sum()))  # tokens up to and including EOS, as TRL's mask
        return out

    model.generate = timed_generate
    with contextlib.redirect_stdout(sys.stderr):  # TRL prints its end-of-training summary
        trainer.train()
    if len(ends) != total + 1:
        raise RuntimeError(f"TRL made {len(ends) - 1} optimizer steps, expected {total}")
    result.add_steps(ends, walls, args.warmup_steps)
    if not result.gen_s:
        result.note = "generation not timed (the generate wrapper was not reached)"
    else:
        del result.gen_s[-total : len(result.gen_s) - args.steps]
        del result.gen_tokens[-total : len(result.gen_tokens) - args.steps]
    result.completions = batch


# ----------------------------------------------------------------------------- report


def report(results: list[SideResult]) -> str:
    ok = [r for r in results if r.step_s]
    base = ok[0] if ok else None
    trl = next((r for r in ok if r.name.startswith("TRL")), None)
    lines = [
        "| side | step s (median) | wall s (median) | completions/s | generation s (median) | generated tokens/s "
        "| mean completion length | TRL step time / this | this generation tokens/s / TRL |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if not r.step_s:
            lines.append(f"| {r.name} | error: {r.error or 'not run'} | | | | | | | |")
            continue
        step = r.median_step()
        speedup = f"{trl.median_step() / step:.2f}x" if trl else "n/a"
        gen_ratio = f"{r.gen_tokens_per_s() / trl.gen_tokens_per_s():.2f}x" if trl and trl.gen_s and r.gen_s else "n/a"
        lines.append(
            f"| {r.name} | {step:.3f} | {statistics.median(r.wall_s):.3f} | {r.completions / step:.1f} "
            f"| {r.median_gen():.3f} | {r.gen_tokens_per_s():.0f} "
            f"| {r.mean_len():.1f} | {speedup} | {gen_ratio} |"
        )
    notes = [f"{r.name}: {r.note}" for r in results if r.note]
    if base is None:
        notes.append("no side ran")
    return "\n".join(lines + ([""] + notes if notes else []))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--smoke", action="store_true", help="a few seconds: smallest model, 1 warm-up + 1 step")
    p.add_argument("--steps", type=int, default=4, help="measured steps per round")
    p.add_argument("--warmup-steps", type=int, default=2, help="unmeasured steps at the start of each round")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds of every side")
    p.add_argument("--backends", nargs="*", default=["hf", "native"], help="steadyrl rollout backends to run")
    p.add_argument("--no-trl", action="store_true", help="skip TRL (steadyrl only)")
    p.add_argument(
        "--model",
        choices=("auto", "embedded", "random"),
        default="auto",
        help="the shipped embedded:tiny-adder or a random init; auto = embedded on CPU when it is shipped",
    )
    p.add_argument("--prompts", type=int, default=0, help="override P")
    p.add_argument("--new-tokens", type=int, default=0, help="override the completion budget")
    p.add_argument("--micro-batch", type=int, default=0, help="override the micro-batch size (both sides)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="weights dtype (default: fp32 CPU, bf16 CUDA)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU (1: robust on a shared CPU)")
    p.add_argument("--out", help="also write the markdown table to this file")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.warmup_steps, args.rounds = 1, 1, 1
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available")
    return args


def resolve_setting(args) -> Setting:
    s = SETTINGS["smoke" if args.smoke else args.device]
    changes = {
        "prompts": args.prompts,
        "new_tokens": args.new_tokens,
        "micro_batch": args.micro_batch,
        "dtype": args.dtype,
    }
    s = dataclasses.replace(s, **{k: v for k, v in changes.items() if v})
    if (s.prompts * s.generations) % s.micro_batch:
        raise SystemExit(f"micro-batch {s.micro_batch} does not divide the batch {s.prompts * s.generations}")
    return s


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    s = resolve_setting(args)
    from steadyrl.registry import ROLLOUT_BACKENDS as BACKENDS

    sides = [f"steadyrl ({b})" for b in args.backends if b in BACKENDS]
    skipped = [b for b in args.backends if b not in BACKENDS]
    try:
        import trl  # noqa: F401

        has_trl = not args.no_trl
    except ImportError:
        has_trl = False
    if has_trl:
        sides.append(f"TRL {trl.__version__} GRPOTrainer")
    results = {name: SideResult(name) for name in sides}
    with tempfile.TemporaryDirectory(prefix="steadyrl-throughput-") as tmp:
        root = Path(tmp)
        model_dir = save_model(s, root, embedded=use_embedded(args))
        for rnd in range(args.rounds):
            for name in sides:
                prompts = prompt_list(s, args.warmup_steps + args.steps)
                result = results[name]
                run_dir = root / f"r{rnd}"
                try:
                    if name.startswith("TRL"):
                        run_trl(s, model_dir, prompts, args, run_dir, result)
                    else:
                        run_steadyrl(name.split("(")[1].rstrip(")"), s, model_dir, prompts, args, run_dir, result)
                except Exception as err:  # noqa: BLE001 - report a broken side, keep the others
                    result.error = f"{type(err).__name__}: {err}"
                    print(f"[throughput] {name}: {result.error}", file=sys.stderr)
                print(f"[throughput] round {rnd + 1}/{args.rounds} {name} done", file=sys.stderr)
    notes = []
    if skipped:
        notes.append(f"steadyrl rollout backends not registered in this checkout: {', '.join(skipped)}")
    if not has_trl:
        notes.append("TRL not run (--no-trl, or trl not installed: pip install -e '.[bench]')")
    timed = (
        "wall time (CUDA-synced)"
        if args.device == "cuda"
        else "process CPU time, one intra-op thread (wall time beside it); completions/s = batch / step CPU time"
    )
    vocab = s.vocab or len(build_char_tokenizer(ARITHMETIC_ALPHABET))
    params = f"Qwen2 hidden {s.hidden}, {s.layers} layers, {s.heads} heads / {s.kv_heads} KV, vocab {vocab}"
    header = (
        f"Device: {device_line(args.device)}\n"
        f"Command: python benchmarks/{Path(__file__).name} {' '.join(sys.argv[1:] if argv is None else argv)}\n"
        f"Model: {'embedded:tiny-adder, ' if use_embedded(args) else 'random-init '}{params}, weights {s.dtype}"
        f"{' + bf16 autocast' if args.device == 'cuda' and s.dtype == 'float32' else ''}\n"
        f"Work per step: {s.prompts} prompts x {s.generations} completions, prompt width "
        f"{s.prompt_len or 'natural (4-8 tokens)'}, up to {s.new_tokens} new tokens, micro-batch {s.micro_batch}, "
        f"one optimizer step; {args.warmup_steps} warm-up + {args.steps} measured steps x {args.rounds} rounds\n"
        f"Timed: {timed}\n"
    )
    text = header + "\n" + report(list(results.values())) + "\n" + "".join(f"\n{n}" for n in notes) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 1 if any(r.error for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
