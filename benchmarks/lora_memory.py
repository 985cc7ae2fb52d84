"""Memory of full fine-tuning against LoRA on a 0.5B-shaped random Qwen2, one training step, side by side.

    python benchmarks/lora_memory.py                      # CPU, 0.5B shape, ~10 GB RAM and a few minutes
    python benchmarks/lora_memory.py --variants full lora:16:all-linear lora:8:q_proj,v_proj
    python benchmarks/lora_memory.py --smoke              # a tiny model in this process, seconds (tests/bench)

Shape (``--shape 0.5b``): Qwen2 with hidden 896, 24 layers, 14 query / 2 KV heads, intermediate 4864,
vocabulary 151936, tied embeddings: Qwen2.5-0.5B's architecture, randomly initialised (nothing downloaded).
Weights in float32, the trainer's default ``model.dtype``.

Every variant runs in a subprocess of its own, so that its peak is not a leftover of the previous one: build
the model from the config, wrap it with LoRA (``steadyrl.models.lora.apply_lora``) where asked, one chunked
policy forward (``train.forward.policy_forward``) + backward of a policy-gradient loss on B × (Tp + T)
tokens, one AdamW step over the trainable parameters. Reported:

    parameters        bytes of every parameter (base + adapters)
    trainable         bytes of the parameters that require grad (what AdamW holds)
    gradients         bytes of the .grad tensors after backward
    optimizer state   bytes of AdamW's state tensors after the step (exp_avg, exp_avg_sq, step)
    peak              CPU: the process's peak RSS (getrusage ru_maxrss) minus its RSS just before the model
                      was built (the interpreter, torch and transformers); CUDA: max_memory_allocated
"x full" is the variant's figure divided by the full fine-tune's.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import torch

SHAPES = {
    "0.5b": dict(vocab_size=151936, hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2, intermediate_size=4864),
    "smoke": dict(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128),
}


def parse_variant(text: str) -> dict:
    """``full`` or ``lora:R:TARGETS`` (TARGETS comma-separated module names, or all-linear)."""
    if text == "full":
        return {"name": "full", "lora": None}
    kind, _, rest = text.partition(":")
    rank, _, targets = rest.partition(":")
    if kind != "lora" or not rank.isdigit() or not targets:
        raise SystemExit(f"variant {text!r}: use full or lora:R:TARGETS, e.g. lora:16:all-linear")
    return {"name": text, "lora": {"r": int(rank), "alpha": 2.0 * int(rank), "target_modules": targets.split(",")}}


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def run_variant(variant: dict, shape: str, batch: int, prompt_len: int, completion_len: int, device: str) -> dict:
    """One training step of ``variant``; the memory figures in bytes."""
    import transformers.models.qwen2.modeling_qwen2  # noqa: F401  (imports are not the model's memory)

    from steadyrl.config import LoraConfig
    from steadyrl.models import build_tiny_model, tiny_model_config
    from steadyrl.models.lora import apply_lora
    from steadyrl.train.forward import policy_forward
    from steadyrl.types import RolloutBatch

    if variant["lora"] is not None:
        from steadyrl.models.lora import import_peft

        import_peft()
    dev = torch.device(device)
    start_rss = rss_bytes()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    config = tiny_model_config("qwen2", max_position_embeddings=4096, **SHAPES[shape])
    model = build_tiny_model(config, seed=0).to(dev).train()
    if variant["lora"] is not None:
        lora = variant["lora"]
        model = apply_lora(model, LoraConfig(r=lora["r"], alpha=lora["alpha"], target_modules=tuple(lora["target_modules"])))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    g = torch.Generator().manual_seed(0)
    vocab = config.vocab_size
    rollout = RolloutBatch(
        prompt_ids=torch.randint(3, vocab, (batch, prompt_len), generator=g).to(dev),
        prompt_mask=torch.ones(batch, prompt_len, dtype=torch.bool, device=dev),
        completion_ids=torch.randint(3, vocab, (batch, completion_len), generator=g).to(dev),
        response_mask=torch.ones(batch, completion_len, dtype=torch.bool, device=dev),
        rollout_logprobs=torch.zeros(batch, completion_len, device=dev),
        truncated=torch.zeros(batch, dtype=torch.bool, device=dev),
    )
    advantages = torch.randn(batch, 1, generator=g).to(dev)
    out = policy_forward(model, rollout, compute_entropy=False)
    loss = -(out.logprobs * advantages).mean()
    loss.backward()
    gradients = tensor_bytes(p.grad for p in trainable if p.grad is not None)
    optimizer.step()
    state = tensor_bytes(t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - start_rss
    return {
        "name": variant["name"],
        "parameters": tensor_bytes(model.parameters()),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "trainable": tensor_bytes(trainable),
        "num_trainable": sum(p.numel() for p in trainable),
        "gradients": gradients,
        "optimizer_state": state,
        "peak": peak,
    }


def human(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def table(results: list[dict], header: str) -> str:
    full = next((r for r in results if r["name"] == "full"), None)

    def cell(r: dict, key: str) -> str:
        ratio = f" ({r[key] / full[key]:.3f}x full)" if full and r is not full and full[key] else ""
        return human(r[key]) + ratio

    lines = [
        header,
        "",
        "| variant | parameters (count) | trainable (count) | gradients | optimizer state | peak |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['name']} | {human(r['parameters'])} ({r['num_parameters'] / 1e6:.1f} M) | "
            f"{cell(r, 'trainable')} ({r['num_trainable'] / 1e6:.2f} M) | {cell(r, 'gradients')} | "
            f"{cell(r, 'optimizer_state')} | {cell(r, 'peak')} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["full", "lora:16:all-linear"])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="0.5b")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--completion-len", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="tiny shape and batch, in this process: seconds")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.shape, args.prompt_len, args.completion_len = "smoke", 8, 8
    torch.set_num_threads(args.threads)
    if args.child:
        result = run_variant(parse_variant(args.child), args.shape, args.batch, args.prompt_len, args.completion_len, args.device)
        print(json.dumps(result))
        return ""
    for variant in args.variants:
        parse_variant(variant)  # a typo fails before the first (minutes-long) variant runs
    results = []
    for variant in args.variants:
        if args.smoke:  # the arithmetic only: no subprocess, so the peaks are not isolated
            parsed = parse_variant(variant)
            results.append(run_variant(parsed, args.shape, args.batch, args.prompt_len, args.completion_len, args.device))
            continue
        command = [sys.executable, __file__, "--child", variant, "--shape", args.shape, "--batch", str(args.batch),
                   "--prompt-len", str(args.prompt_len), "--completion-len", str(args.completion_len),
                   "--device", args.device, "--threads", str(args.threads)]
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
        if done.returncode != 0:
            raise SystemExit(f"variant {variant} failed:\n{done.stderr[-3000:]}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    from steadyrl.bench.machine import device_line

    shape = SHAPES[args.shape]
    header = (
        f"LoRA memory, {device_line(args.device)}\n\n"
        f"`python benchmarks/lora_memory.py {' '.join(argv if argv is not None else sys.argv[1:])}`\n\n"
        f"Qwen2 {args.shape} shape ({', '.join(f'{k}={v}' for k, v in shape.items())}), float32, random init; "
        f"one step: batch {args.batch} x ({args.prompt_len} prompt + {args.completion_len} completion) tokens, AdamW."
    )
    text = table(results, header)
    print(text)
    if args.out:
        args.out.write_text(text)
    return text


if __name__ == "__main__":
    main()
