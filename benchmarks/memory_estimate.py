"""Expected GPU memory of a training config, and what FSDP saves per rank: COMPUTED, not measured on a GPU.

    python benchmarks/memory_estimate.py recipe configs/models/qwen2.5-0.5b-instruct-gsm8k.yaml
    python benchmarks/memory_estimate.py recipe configs/models/qwen2.5-0.5b-instruct-gsm8k.yaml --set model.lora={r: 32}
    python benchmarks/memory_estimate.py fsdp --shape qwen2.5-7b --ranks 1 2 4 8
    python benchmarks/memory_estimate.py --smoke           # a tiny shape, seconds (tests/bench)

How each figure is obtained (P = parameters, P_t = trainable parameters, N = ranks):

    parameters      P counted exactly on a meta-device model of the architecture (nothing downloaded)
                    × bytes of model.dtype
    gradients       P_t × 4 (fp32; with FSDP / N); none exist during rollouts (zero_grad(set_to_none=True))
    AdamW state     P_t × 8 (exp_avg + exp_avg_sq in fp32; with FSDP / N)
    reference       P × bytes, when kl.coef > 0 with kl.reference=initial and no LoRA (with FSDP / N)
    sampler copy    P × bytes of rollout.sampler_dtype when it differs from model.dtype; always with FSDP
    KV cache        rollout sequences per rank × (prompt + max_new_tokens) × layers × 2 × KV heads × head dim
                    × sampler bytes, + 3 fp32 (S, V) logit buffers per decoding step
    activations     MEASURED on CPU for one decoder layer of the real width: the bytes autograd saves for
                    backward (saved-tensor hooks, storages deduplicated) at two sequence lengths; the slope is
                    the per-token cost k, the intercept the per-layer constant c (the bf16 weight copies
                    autocast keeps). Training micro-batch of M tokens:
                      gradient checkpointing: layers × M × h × 4 (checkpointed layer inputs, fp32 residual)
                                              + 2 × (M·k + c) (one layer recomputed, and its gradients)
                      otherwise:              layers × (M·k + c)
                    + the chunked LM head: 3 × 1024 × V × 4 (logits, softmax, their gradient)
    FSDP gathered   the root unit (LM head, final norm, tied embeddings) in full from forward to backward,
                    + 3 transformer blocks (the one computing, the prefetched one, its unsharded gradient)
    peak            static (parameters, AdamW, reference, sampler) + max(rollout: KV cache, update:
                    gradients + activations + gathered units)

Not counted: the CUDA context and allocator fragmentation (add ~1-2 GB), the reward workers (CPU), the
guard's snapshots (CPU RAM). The architecture shapes are the public config.json values of each model.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

GB = 1e9
SHAPES = {
    # name: Qwen2Config kwargs (public config.json values)
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    "smoke": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True),
}
HUB_SHAPES = {
    "Qwen/Qwen2.5-0.5B-Instruct": "qwen2.5-0.5b", "Qwen/Qwen2.5-0.5B": "qwen2.5-0.5b",
    "Qwen/Qwen2.5-1.5B-Instruct": "qwen2.5-1.5b", "Qwen/Qwen2.5-1.5B": "qwen2.5-1.5b",
    "Qwen/Qwen2.5-7B-Instruct": "qwen2.5-7b", "Qwen/Qwen2.5-7B": "qwen2.5-7b",
}
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def qwen2_config(shape: str, layers: int | None = None):
    from transformers import Qwen2Config

    kwargs = dict(SHAPES[shape])
    if layers is not None:
        kwargs["num_hidden_layers"] = layers
    return Qwen2Config(**kwargs, attn_implementation="sdpa")


@dataclass(frozen=True)
class Architecture:
    params: int  # distinct parameters (tied embeddings once)
    head: int  # LM head (+ tied embeddings) parameters: the FSDP root unit's bulk
    block: int  # parameters of one decoder layer
    lora_per_rank: int  # LoRA parameters per unit of r on every linear layer but the head (all-linear)
    layers: int
    hidden: int
    vocab: int
    kv_width: int  # KV heads × head dim


def architecture(shape: str) -> Architecture:
    from transformers import Qwen2ForCausalLM

    config = qwen2_config(shape)
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    head = model.get_output_embeddings()
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head]
    return Architecture(
        params=sum(p.numel() for p in model.parameters()),
        head=head.weight.numel() + model.model.norm.weight.numel(),
        block=sum(p.numel() for p in model.model.layers[0].parameters()),
        lora_per_rank=sum(m.in_features + m.out_features for m in linears),
        layers=config.num_hidden_layers,
        hidden=config.hidden_size,
        vocab=config.vocab_size,
        kv_width=config.num_key_value_heads * (config.hidden_size // config.num_attention_heads),
    )


def saved_activation_bytes(shape: str, tokens: int, *, autocast_bf16: bool) -> tuple[int, torch.dtype]:
    """Bytes autograd saves for backward in one decoder layer on ``tokens`` tokens (CPU), and the dtype of the
    layer's output (what gradient checkpointing keeps per layer)."""
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(qwen2_config(shape, layers=1))
    layer, inner = model.model.layers[0], model.model
    storages: dict[tuple[int, torch.dtype], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = (t.untyped_storage().data_ptr(), t.dtype)
        storages[key] = max(storages.get(key, 0), t.untyped_storage().nbytes())
        return t

    hidden = torch.randn(1, tokens, inner.config.hidden_size, requires_grad=True)
    positions = torch.arange(tokens)[None]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", torch.bfloat16, enabled=autocast_bf16):
        out = layer(hidden, position_embeddings=inner.rotary_emb(hidden, positions), attention_mask=None)
    out = out[0] if isinstance(out, tuple) else out
    return sum(storages.values()), out.dtype


def activation_model(shape: str, *, autocast_bf16: bool, tokens: tuple[int, int] = (64, 128)) -> tuple[float, float, int]:
    """(k bytes per token, c bytes per layer, bytes per element of the layer output) from two lengths."""
    (b1, dtype), (b2, _) = (saved_activation_bytes(shape, t, autocast_bf16=autocast_bf16) for t in tokens)
    k = (b2 - b1) / (tokens[1] - tokens[0])
    return k, b1 - k * tokens[0], torch.finfo(dtype).bits // 8


def estimate(shape: str, *, dtype: str, autocast_bf16: bool, checkpointing: bool, lora_r: int | None, kl_reference: bool,
             sampler_dtype: str | None, sequences: int, prompt_tokens: int, new_tokens: int, micro_batch: int,
             ranks: int = 1, fsdp: bool = False) -> dict[str, float]:
    arch = architecture(shape)
    k, c, residual_bytes = activation_model(shape, autocast_bf16=autocast_bf16)
    width = BYTES[dtype]
    shard = ranks if fsdp else 1
    trainable = arch.params if lora_r is None else lora_r * arch.lora_per_rank
    params = arch.params * width / shard + (0 if lora_r is None else trainable * width)
    grads = trainable * 4 / shard
    adam = trainable * 8 / shard
    reference = arch.params * width / shard if kl_reference and lora_r is None else 0.0
    sampler_width = BYTES[sampler_dtype or dtype]
    sampler = arch.params * sampler_width if (fsdp or (sampler_dtype and sampler_dtype != dtype)) else 0.0
    length = prompt_tokens + new_tokens
    kv = sequences * length * arch.layers * 2 * arch.kv_width * sampler_width + 3 * sequences * arch.vocab * 4
    m = micro_batch * length
    if checkpointing:
        activations = arch.layers * m * arch.hidden * residual_bytes + 2 * (m * k + c)
    else:
        activations = arch.layers * (m * k + c)
    activations += 3 * 1024 * arch.vocab * 4 + m * arch.hidden * 4
    gathered = (arch.head + 3 * arch.block) * width if fsdp else 0.0
    static = params + adam + reference + sampler
    out = {
        "parameters (B)": arch.params / 1e9, "trainable (B)": trainable / 1e9, "weights": params / GB,
        "gradients": grads / GB, "AdamW state": adam / GB, "reference": reference / GB, "sampler copy": sampler / GB,
        "KV cache + decode logits": kv / GB, "activations (one micro-batch)": activations / GB,
        "FSDP gathered units": gathered / GB, "activation k (KB/token/layer)": k / 1e3,
    }
    out["peak"] = (static + max(kv, grads + activations + gathered)) / GB
    return out


def from_recipe(path: Path, overrides: list[str], prompt_tokens: int, ranks: int) -> tuple[str, dict]:
    from steadyrl.config_load import load_config

    cfg = load_config(path, overrides)
    shape = HUB_SHAPES.get(cfg.model.name_or_path)
    if shape is None:
        raise SystemExit(f"no shape for {cfg.model.name_or_path}; known: {', '.join(HUB_SHAPES)}")
    r, o = cfg.rollout, cfg.optim
    return shape, dict(
        dtype=cfg.model.dtype, autocast_bf16=cfg.model.autocast_bf16 or cfg.model.autocast != "none",  # 2-byte compute
        checkpointing=cfg.model.gradient_checkpointing,
        lora_r=cfg.model.lora.r if cfg.model.lora else None,
        kl_reference=cfg.kl.coef > 0 and cfg.kl.reference == "initial", sampler_dtype=r.sampler_dtype,
        sequences=r.prompts_per_step // ranks * r.group_size, prompt_tokens=prompt_tokens, new_tokens=r.max_new_tokens,
        micro_batch=o.micro_batch_size, ranks=ranks, fsdp=cfg.run.parallel == "fsdp",
    )


def print_table(columns: dict[str, dict[str, float]]) -> None:
    names = list(columns)
    print("| (GB unless noted, computed) | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for row in next(iter(columns.values())):
        print(f"| {row} | " + " | ".join(f"{columns[n][row]:.3g}" for n in names) + " |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny shape, for the test suite")
    sub = parser.add_subparsers(dest="mode")
    recipe = sub.add_parser("recipe", help="one config on one GPU (or per rank with --ranks)")
    recipe.add_argument("config", type=Path)
    recipe.add_argument("--set", nargs="*", default=[], dest="overrides")
    recipe.add_argument("--prompt-tokens", type=int, default=256, help="prompt length after the chat template")
    recipe.add_argument("--ranks", type=int, default=1)
    fsdp = sub.add_parser("fsdp", help="per-rank memory, ddp against fsdp")
    fsdp.add_argument("--shape", default="qwen2.5-7b", choices=sorted(SHAPES))
    fsdp.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8])
    fsdp.add_argument("--sampler-dtype", default="bfloat16")
    fsdp.add_argument("--micro-batch", type=int, default=4)
    fsdp.add_argument("--tokens", type=int, nargs=2, default=[256, 1024], metavar=("PROMPT", "NEW"))
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.smoke:
        common = dict(dtype="float32", autocast_bf16=False, checkpointing=True, kl_reference=True, sampler_dtype=None,
                      sequences=8, prompt_tokens=8, new_tokens=8, micro_batch=4)
        print_table({"full": estimate("smoke", lora_r=None, **common), "lora r=4": estimate("smoke", lora_r=4, **common)})
        return 0
    if args.mode == "recipe":
        shape, settings = from_recipe(args.config, args.overrides, args.prompt_tokens, args.ranks)
        print(f"{args.config} ({shape}), prompt {args.prompt_tokens} tokens, {args.ranks} rank(s):")
        columns = {"as configured": estimate(shape, **settings)}
        if settings["lora_r"] is None:
            columns["with model.lora r=32"] = estimate(shape, **{**settings, "lora_r": 32})
        print_table(columns)
        return 0
    if args.mode == "fsdp":
        common = dict(dtype="float32", autocast_bf16=True, checkpointing=True, lora_r=None, kl_reference=True,
                      sampler_dtype=args.sampler_dtype, sequences=8, prompt_tokens=args.tokens[0],
                      new_tokens=args.tokens[1], micro_batch=args.micro_batch)
        columns = {"ddp (any N)": estimate(args.shape, **common)}
        for n in args.ranks:
            columns[f"fsdp N={n}"] = estimate(args.shape, **common, ranks=n, fsdp=True)
        print(f"{args.shape}: fp32 weights + AdamW, bf16 autocast, gradient checkpointing, KL reference, "
              f"8 sequences of {args.tokens[0]}+{args.tokens[1]} tokens per rank, micro-batch {args.micro_batch}:")
        print_table(columns)
        return 0
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
