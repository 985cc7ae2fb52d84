"""Rollout throughput: the HF backend against the native backend, side by side in one run.

Same model, same prompts, same sampling parameters for every backend; a warm-up call each, then ``--repeats``
timed calls with the backends interleaved (so that a busy machine slows them alike); the median is reported.
No EOS is ever produced (the EOS id is outside the vocabulary), so every backend decodes exactly
batch × new-tokens tokens and tokens/s compares like with like.

    .venv/bin/python benchmarks/rollout_speed.py --model tiny --batch 256 --new-tokens 8
    .venv/bin/python benchmarks/rollout_speed.py --model small --batch 64 --new-tokens 64
    python benchmarks/rollout_speed.py --device cuda --model random-0.5b-shaped --batch 64 --new-tokens 256

Backends: ``hf`` (HFRolloutBackend: transformers generate + steadyrl's μ recorder), ``native`` (fused
Llama/Qwen2 decode step), ``native-hf-forward`` (native loop over the HF forward), on CUDA also
``native-compiled`` (torch.compile reduce-overhead over the decode step) and ``hf-static`` (TRL-style
``model.generate(cache_implementation="static")``, which transformers compiles on CUDA by itself).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import GenerationConfig

from steadyrl.models import build_tiny_model, tiny_model_config
from steadyrl.rollout import HFRolloutBackend, NativeRolloutBackend, SamplingParams, left_pad

PAD = 0

MODELS = {
    # as tests/train/conftest.py: the char tokenizer's vocabulary, 2 layers of width 32
    "tiny": dict(vocab_size=23, hidden_size=32, num_layers=2, num_heads=2),
    "small": dict(vocab_size=1024, hidden_size=256, num_layers=4, num_heads=4),
    # Qwen2.5-0.5B's shape, random weights
    "random-0.5b-shaped": dict(
        vocab_size=151936,
        hidden_size=896,
        num_layers=24,
        num_heads=14,
        num_kv_heads=2,
        intermediate_size=4864,
        max_position_embeddings=32768,
        rope_theta=1_000_000.0,
    ),
}


def build_model(name: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    if name == "random-0.5b-shaped" and device.type != "cuda":
        raise SystemExit(
            "--model random-0.5b-shaped is for --device cuda only (0.5B parameters on a CPU take minutes)."
        )
    config = tiny_model_config("qwen2", **MODELS[name])
    return build_tiny_model(config, seed=0).to(device=device, dtype=dtype).eval()


def make_prompts(
    batch: int, prompt_len: int, vocab: int, device: torch.device, group_size: int = 1, seed: int = 0
):
    """Random prompts of lengths uniform in [prompt_len / 2, prompt_len], left-padded; each one repeated
    ``group_size`` times in a row, as the trainer lays out P prompts × G samples."""
    if batch % group_size:
        raise SystemExit(f"--batch {batch} is not a multiple of --group-size {group_size}.")
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(1, prompt_len // 2), prompt_len + 1, (batch // group_size,), generator=g)
    prompts = [torch.randint(3, vocab, (int(n),), generator=g).tolist() for n in lengths]
    return left_pad([p for p in prompts for _ in range(group_size)], PAD, device)


class HFStaticGenerate:
    """TRL-style rollouts: ``model.generate`` with a static cache (no μ recorder, no steadyrl processors)."""

    def __init__(self, model: torch.nn.Module, eos: int) -> None:
        self.model, self.eos = model, eos

    @torch.no_grad()
    def generate(self, prompt_ids, prompt_mask, params: SamplingParams, generator=None):
        config = GenerationConfig(
            do_sample=not params.greedy,
            max_new_tokens=params.max_new_tokens,
            temperature=params.temperature or 1.0,
            top_k=params.top_k or None,
            top_p=params.top_p,
            pad_token_id=PAD,
            eos_token_id=self.eos,
            cache_implementation="static",
        )
        return self.model.generate(
            input_ids=prompt_ids, attention_mask=prompt_mask.long(), generation_config=config
        )


def build_backends(names: list[str], model: torch.nn.Module, eos: int) -> dict:
    kwargs = dict(pad_token_id=PAD, eos_token_id=eos)
    factories = {
        "hf": lambda: HFRolloutBackend(model, **kwargs),
        "native": lambda: NativeRolloutBackend(model, **kwargs, fused=True),
        "native-hf-forward": lambda: NativeRolloutBackend(model, **kwargs, fused=False),
        "native-compiled": lambda: NativeRolloutBackend(model, **kwargs, compile=True),
        "hf-static": lambda: HFStaticGenerate(model, eos),
    }
    unknown = [n for n in names if n not in factories]
    if unknown:
        raise SystemExit(f"unknown backend(s) {unknown}; valid: {list(factories)}")
    return {name: factories[name]() for name in names}


def time_call(backend, ids, mask, params, device: torch.device, seed: int) -> tuple[float, float]:
    """(wall-clock s, this process's CPU s) of one generate call."""
    generator = torch.Generator(device=device).manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start, start_cpu = time.perf_counter(), time.process_time()
    backend.generate(ids, mask, params, generator=generator)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, time.process_time() - start_cpu


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="tiny", choices=list(MODELS))
    parser.add_argument(
        "--dtype", default=None, help="float32 | bfloat16 (default: float32 on CPU, bfloat16 on CUDA)"
    )
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument(
        "--prompt-len", type=int, default=8, help="longest prompt; lengths uniform in [len/2, len]"
    )
    parser.add_argument(
        "--group-size", type=int, default=1, help="G: each prompt repeated G times (GRPO layout)"
    )
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--warmup", type=int, default=1, help="untimed calls per backend (3+ on CUDA with compile)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU")
    parser.add_argument(
        "--backends", default=None, help="comma list; default hf,native,native-hf-forward (+ CUDA ones)"
    )
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    dtype = (
        getattr(torch, args.dtype)
        if args.dtype
        else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    )
    default = ["hf", "native", "native-hf-forward"] + (
        ["native-compiled", "hf-static"] if device.type == "cuda" else []
    )
    names = args.backends.split(",") if args.backends else default

    model = build_model(args.model, device, dtype)
    vocab = model.config.vocab_size
    ids, mask = make_prompts(args.batch, args.prompt_len, vocab, device, args.group_size)
    params = SamplingParams(
        max_new_tokens=args.new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k
    )
    backends = build_backends(names, model, eos=vocab)  # an id the model never produces
    for backend in backends.values():
        for w in range(args.warmup):
            time_call(backend, ids, mask, params, device, seed=w)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in backends}
    for r in range(args.repeats):
        for name, backend in backends.items():
            times[name].append(time_call(backend, ids, mask, params, device, seed=100 + r))

    tokens = args.batch * args.new_tokens
    wall = {name: statistics.median(t for t, _ in ts) for name, ts in times.items()}
    cpu = {name: statistics.median(c for _, c in ts) for name, ts in times.items()}
    print(
        f"device={device} ({torch.get_num_threads() if device.type == 'cpu' else torch.cuda.get_device_name(device)}"
        f"{' threads' if device.type == 'cpu' else ''}) model={args.model} dtype={str(dtype).removeprefix('torch.')} "
        f"batch={args.batch} group_size={args.group_size} new_tokens={args.new_tokens} "
        f"prompt_len<={args.prompt_len} "
        f"temperature={args.temperature} top_p={args.top_p} top_k={args.top_k} repeats={args.repeats}"
    )
    # CPU seconds of this process: on a shared machine they move less than wall time (not meaningful on CUDA)
    print(
        f"{'backend':<20}{'wall s':>9}{'tokens/s':>10}{'vs hf':>8}{'cpu s':>9}{'cpu tok/s':>11}{'vs hf':>8}"
    )
    rows = {}
    for name in times:
        rows[name] = {
            "median_wall_s": wall[name],
            "min_wall_s": min(t for t, _ in times[name]),
            "tokens_per_s": tokens / wall[name],
            "median_cpu_s": cpu[name],
            "cpu_tokens_per_s": tokens / cpu[name],
        }
        ratio = f"{wall['hf'] / wall[name]:.2f}x" if "hf" in wall else "-"
        cpu_ratio = f"{cpu['hf'] / cpu[name]:.2f}x" if "hf" in cpu else "-"
        print(
            f"{name:<20}{wall[name]:>9.4f}{tokens / wall[name]:>10.0f}{ratio:>8}"
            f"{cpu[name]:>9.4f}{tokens / cpu[name]:>11.0f}{cpu_ratio:>8}"
        )
    result = {"args": vars(args), "results": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
