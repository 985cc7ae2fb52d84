"""Warm start: supervised fine-tuning on a task's demonstrations, so RL starts from a non-trivial policy.

Real post-training starts RL from an SFT model; the stability lab does the same at toy scale. The default
recipe (``WarmstartConfig`` defaults) builds a fresh tiny Qwen2 with a character tokenizer and fits it to the
arithmetic task's *imperfect* demonstrations: a share of them drop the carries, a habit the exact-match
reward penalises and RL can correct.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from steadyrl.config import ConfigError
from steadyrl.evaluate import evaluate
from steadyrl.models import (
    build_char_tokenizer,
    build_tiny_model,
    count_parameters,
    load_model,
    load_tokenizer,
    tiny_model_config,
)
from steadyrl.models.tokenizer import ARITHMETIC_ALPHABET
from steadyrl.registry import build_backend, build_task
from steadyrl.rollout.base import SamplingParams
from steadyrl.runtime.checkpoint import save_pretrained_atomic
from steadyrl.tasks.demonstrations import demonstration_batch


@dataclass(frozen=True)
class WarmstartConfig:
    task: str = "arithmetic"
    task_kwargs: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_TASK_KWARGS))
    init_from: str | None = None
    """Fine-tune this model (hub id / local dir) instead of building a fresh tiny one."""
    arch: str = "qwen2"
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 384
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra tiny_model_config arguments, e.g. MoE: {num_experts: 4, num_experts_per_tok: 2, norm_topk_prob: true}."""
    steps: int = 3000
    batch_size: int = 128
    lr: float = 3e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    seed: int = 0
    eval_prompts: int = 400
    output_dir: str = "runs/warmstart"


# The embedded default (docs/quickstart.md): 1-3 digit addition and subtraction; 60 % of the addition
# demonstrations ignore every carry (a habit the exact-match reward penalises), subtraction stays clean and
# is never trained by RL (the retention set).
DEFAULT_TASK_KWARGS: dict[str, Any] = {
    "min_digits": 1,
    "max_digits": 3,
    "operations": "+-",
    "demo_error_rate": 0.6,
    "demo_error": "ignore_carries",
    "demo_error_ops": "+",
}


def warmstart(cfg: WarmstartConfig, *, device: str = "cpu", log=print) -> dict[str, Any]:
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    task = build_task(cfg.task, **cfg.task_kwargs)
    if cfg.init_from:
        tokenizer = load_tokenizer(cfg.init_from)
        model = load_model(cfg.init_from, device=device)
    else:
        tokenizer = build_char_tokenizer(ARITHMETIC_ALPHABET)
        config = tiny_model_config(
            cfg.arch,
            vocab_size=len(tokenizer),
            hidden_size=cfg.hidden_size,
            num_layers=cfg.num_layers,
            num_heads=cfg.num_heads,
            intermediate_size=cfg.intermediate_size,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **cfg.model_kwargs,
        )
        model = build_tiny_model(config, seed=cfg.seed).to(device)
    log(f"warm start: {count_parameters(model):,} parameters, {cfg.steps} steps of {cfg.batch_size} demonstrations")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay)

    def lr_factor(i: int) -> float:
        warm = min(1.0, (i + 1) / max(1, cfg.warmup_steps))
        return warm * 0.5 * (1 + math.cos(math.pi * min(i, cfg.steps) / cfg.steps))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    model.train()
    start = time.perf_counter()
    for step in range(cfg.steps):
        prompts = task.sample("train", cfg.batch_size, seed=cfg.seed * 1_000_003 + step)
        ids, mask, labels = demonstration_batch(task, tokenizer, prompts, rng, device)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"warm-start loss became {loss.item()} at step {step}; lower --lr.")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % max(1, cfg.steps // 10) == 0 or step == cfg.steps - 1:
            log(f"  step {step:5d}  loss {loss.item():.4f}  {time.perf_counter() - start:6.1f}s")
    model.eval()
    backend = build_backend("hf", model, tokenizer)
    eval_prompts = task.eval_prompts()[: cfg.eval_prompts]
    max_new = max(len(tokenizer(_solution(task, p), add_special_tokens=False)["input_ids"]) for p in eval_prompts) + 2
    metrics = evaluate(
        backend, tokenizer, task, eval_prompts, sampling=SamplingParams(max_new, 1.0), pass_k=8, seed=cfg.seed, device=device
    )
    out = Path(cfg.output_dir)
    save_pretrained_atomic(model, tokenizer, out)
    log("held-out: " + "  ".join(f"{k}={v:.3f}" for k, v in metrics.items()))
    log(f"saved to {out}")
    return {"metrics": metrics, "parameters": count_parameters(model), "wall_s": time.perf_counter() - start}


def _solution(task, prompt) -> str:
    """The correct completion when the task can write one (a scratchpad is longer than its answer), else the answer."""
    return task.solution(prompt) if hasattr(task, "solution") else prompt.answer


def check_output_dir(path: str, overwrite: bool) -> None:
    p = Path(path)
    if p.exists() and any(p.iterdir()) and not overwrite:
        raise ConfigError(f"{p} already exists and is not empty; pass --overwrite or choose another --out.")
