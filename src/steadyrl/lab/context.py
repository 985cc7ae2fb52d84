"""What every lab measurement starts from: the model, its tokenizer, the task, a prompt set, and the trainer's
own updater built from a config exactly as ``Trainer`` builds it (registry lookups, AdamW, LR schedule)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from steadyrl import registry
from steadyrl.config import TrainConfig
from steadyrl.config_load import from_dict
from steadyrl.lab.enumeration import Enumerated
from steadyrl.models import load_model, load_tokenizer
from steadyrl.tasks import Prompt, score_completions
from steadyrl.train.setup import autocast_dtype, build_optimizer, resolve_methods, resolve_model_path
from steadyrl.train.update import PolicyUpdater, UpdateSettings

ADDITION = {"min_digits": 1, "max_digits": 3, "operations": "+"}
"""The collapse map's task (docs/stability-lab.md)."""
SCRATCHPAD = {"min_digits": 2, "max_digits": 3, "operations": "+", "scratchpad": True}
"""The length axis's task: 2-3 digit addition worked column by column, 21-34 tokens (embedded:tiny-adder-scratchpad)."""
SCRATCHPAD_MAX_NEW_TOKENS = 40
"""Room for the longest scratchpad (33 characters + EOS) and a few tokens of a malformed one."""


@dataclass
class LabContext:
    model: torch.nn.Module
    tokenizer: Any
    task: Any
    prompts: list[Prompt]
    prompt_ids: list[list[int]]
    max_new_tokens: int


def load_context(
    model_name: str = "embedded:tiny-adder",
    *,
    num_prompts: int = 32,
    seed: int = 0,
    split: str = "train",
    task: str = "arithmetic",
    task_kwargs: dict | None = None,
    max_new_tokens: int = 6,
) -> LabContext:
    """The model in fp32 on CPU, train mode, and ``num_prompts`` prompts drawn with ``seed``."""
    path = resolve_model_path(model_name)
    tokenizer = load_tokenizer(path)
    model = load_model(path).train()
    built = registry.build_task(task, **(ADDITION if task_kwargs is None else task_kwargs))
    prompts = built.sample(split, num_prompts, seed=seed) if split == "train" else built.eval_prompts()[:num_prompts]
    ids = [tokenizer(p.text)["input_ids"] for p in prompts]
    return LabContext(model, tokenizer, built, prompts, ids, max_new_tokens)


def rewards_for(ctx: LabContext, enum: Enumerated) -> Tensor:
    """(R,) the task's reward of every enumerated row (decoded without EOS / padding)."""
    eos = ctx.tokenizer.eos_token_id
    texts = []
    for row, mask in zip(enum.completion_ids.tolist(), enum.response_mask.tolist()):
        texts.append(ctx.tokenizer.decode([t for t, m in zip(row, mask) if m and t != eos], skip_special_tokens=True))
    prompts = [ctx.prompts[i] for i in enum.prompt_index.tolist()]
    return score_completions(ctx.task, prompts, texts).float()


def method_config(
    *,
    loss: dict | str,
    aggregation: str = "seq_mean_token_sum",
    correction: dict | None = None,
    advantage: dict | str = "dr_grpo",
    lr: float = 1e-3,
    max_new_tokens: int = 6,
    extra: dict | None = None,
) -> TrainConfig:
    """A TrainConfig with the lab's protocol (AdamW, constant LR, grad clip 1, no warm-up) and the given method."""
    raw: dict[str, Any] = {
        "loss": loss,
        "aggregation": aggregation,
        "advantage": advantage,
        "rollout": {"max_new_tokens": max_new_tokens, "temperature": 1.0},
        "optim": {"lr": lr, "warmup_steps": 0, "grad_clip": 1.0, "mini_batches": 1},
        **(extra or {}),
    }
    if correction is not None:
        raw["correction"] = correction
    return from_dict(TrainConfig, raw)


def build_updater(model: torch.nn.Module, cfg: TrainConfig, *, total_steps: int = 1000) -> PolicyUpdater:
    """The trainer's PolicyUpdater for ``cfg`` with one optimizer step per ``update`` call (mini_batches = 1),
    its stateful parts built from the registry with the context ``Trainer`` gives them. The lab measures the
    loss's own gradient, so the optional parts of a step (entropy bonus, VCPO, fp16 loss scale, autocast, FP32
    head) are refused rather than left out silently."""
    optional = {"entropy": cfg.entropy.enabled, "vcpo": cfg.vcpo is not None, "model.autocast": autocast_dtype(cfg) is not None,
                "model.lm_head_fp32": cfg.model.lm_head_fp32}
    if any(optional.values()):
        on = ", ".join(k for k, v in optional.items() if v)
        raise ValueError(f"the lab's updater builds the loss alone; turn off {on} in its config.")
    methods = resolve_methods(cfg)
    optimizer, scheduler = build_optimizer(cfg, model, total_steps)
    o, r = cfg.optim, cfg.rollout
    settings = UpdateSettings(
        mini_batches=1,
        micro_batch_size=o.micro_batch_size,
        grad_clip=o.grad_clip,
        temperature=r.temperature,
        max_len=r.max_new_tokens,
        kl_coef=cfg.kl.coef,
        routing_replay=cfg.routing_replay,
    )
    context = {"model": model, "distributed": False,
               "optimizer_defaults": {"betas": o.betas, "eps": o.eps, "weight_decay": o.weight_decay}}
    return PolicyUpdater(
        model,
        optimizer,
        scheduler,
        loss=methods["loss"],
        aggregation=methods["aggregation"],
        correction=methods["correction"],
        kl=methods["kl"],
        combiner=registry.build("combiner", cfg.combiner, **context),
        settings=settings,
        token_filters=[registry.build("token_filter", spec, **context) for spec in cfg.token_filters],
    )
