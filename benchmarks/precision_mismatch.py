"""Training–inference mismatch of the precision switches: KL(μ ‖ π_old) between what the sampler drew from and what
the trainer scores, per configuration, on the same prompts.

    python benchmarks/precision_mismatch.py                     # CPU, embedded tiny-adder, about a minute
    python benchmarks/precision_mismatch.py --device cuda --out mismatch_gpu.md
    python benchmarks/precision_mismatch.py --smoke             # seconds (tests/bench)

For each configuration a Trainer is built (fresh, from the same checkpoint), one rollout batch is collected at
each of ``--seeds`` RL-step seeds and scored with the π_old forward, and ``ops.correction.mismatch_metrics``
measures the k3 estimate of KL(μ ‖ π_old) and the mean |log π_old − log μ| over the sampled tokens. Nothing is
trained, so the numbers describe the initial policy. Reported: the mean over seeds and the min–max range.

Configurations: fp32 everywhere (the floor: the same fp32 forward in a different code path), a bf16 sampler
copy, the same with the FP32 LM head (ScaleRL; TRL ``cast_lm_head_to_fp32``), an fp16 sampler with fp16
autocast in the trainer (Precision-RL), bf16 weights (one bf16 model samples and trains) and bf16 weights with
the FP32 LM head.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import warnings
from pathlib import Path

import torch

from steadyrl.bench.machine import device_line
from steadyrl.config_load import load_config
from steadyrl.models import build_char_tokenizer, build_tiny_model, tiny_model_config
from steadyrl.models.tokenizer import ARITHMETIC_ALPHABET
from steadyrl.ops.correction import mismatch_metrics
from steadyrl.runtime.checkpoint import save_pretrained_atomic
from steadyrl.train.setup import embedded_available
from steadyrl.train.trainer import Trainer

CONFIGS: dict[str, list[str]] = {
    "fp32": [],
    "bf16 sampler": ["rollout.sampler_dtype=bfloat16"],
    "bf16 sampler + fp32 head": ["rollout.sampler_dtype=bfloat16", "model.lm_head_fp32=true"],
    "fp16 sampler + fp16 autocast": ["rollout.sampler_dtype=float16", "model.autocast=float16"],
    "bf16 weights": ["model.dtype=bfloat16"],
    "bf16 weights + fp32 head": ["model.dtype=bfloat16", "model.lm_head_fp32=true"],
}


def measure(model_dir: str, overrides: list[str], seeds: int, args, root: Path) -> list[dict[str, float]]:
    cfg = load_config(None, [
        f"model.name_or_path={model_dir}", "task.name=arithmetic", f"rollout.prompts_per_step={args.prompts}",
        "rollout.group_size=8", f"rollout.max_new_tokens={args.new_tokens}", "optim.mini_batches=2",
        "eval.every=0", "logging.progress=false", "logging.report=false", "logging.tensorboard=false",
        "checkpoint.save_final_model=false", f"run.device={args.device}", "run.resume=false",
        f"run.output_dir={root / str(abs(hash(tuple(overrides))))}", *overrides,
    ])
    trainer = Trainer(cfg)
    rows = []
    for step in range(1, seeds + 1):
        batch = trainer.collector.collect(step).batch
        trainer.scorer.score(batch)
        m = mismatch_metrics(batch.old_logprobs, batch.rollout.rollout_logprobs, batch.rollout.response_mask)
        rows.append({k: float(v) for k, v in m.items()})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--seeds", type=int, default=3, help="rollout batches (RL-step seeds) per configuration")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--smoke", action="store_true", help="a random tiny model, 2 prompts, 1 seed")
    p.add_argument("--out", help="also write the markdown table to this file")
    args = p.parse_args(argv)
    if args.smoke:
        args.seeds, args.prompts, args.new_tokens = 1, 2, 4
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="steadyrl-mismatch-") as tmp:
        root = Path(tmp)
        if embedded_available() and not args.smoke:
            model_dir, origin = "embedded:tiny-adder", "embedded:tiny-adder"
        else:
            tok = build_char_tokenizer(ARITHMETIC_ALPHABET)
            cfg = tiny_model_config("qwen2", vocab_size=len(tok), hidden_size=32, num_layers=2, num_heads=2)
            model_dir = str(save_pretrained_atomic(build_tiny_model(cfg, seed=0), tok, root / "model"))
            origin = "random tiny qwen2 (hidden 32, 2 layers)"
        lines = [
            "| configuration | KL(μ‖π_old) k3, mean | range over seeds | mean abs log-ratio | range over seeds |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, overrides in CONFIGS.items():
            rows = measure(model_dir, overrides, args.seeds, args, root)
            kl = [r["mismatch/kl_k3"] for r in rows]
            gap = [r["mismatch/abs_logprob_diff_mean"] for r in rows]
            lines.append(
                f"| {name} | {statistics.mean(kl):.3g} | {min(kl):.3g}–{max(kl):.3g} "
                f"| {statistics.mean(gap):.3g} | {min(gap):.3g}–{max(gap):.3g} |"
            )
    header = (
        f"Device: {device_line(args.device)}\n"
        f"Command: python benchmarks/{Path(__file__).name} {' '.join(sys.argv[1:] if argv is None else argv)}\n"
        f"Model: {origin}; {args.prompts} prompts x 8 completions, {args.new_tokens} new tokens max, "
        f"{args.seeds} rollout batch(es) per configuration (RL-step seeds 1..{args.seeds}), initial policy\n"
    )
    text = header + "\n" + "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
