"""Build the trainer's parts from a TrainConfig, validating everything that can fail before training starts."""

from __future__ import annotations

import math
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from steadyrl import registry
from steadyrl.config import ConfigError, TrainConfig
from steadyrl.config_load import to_dict
from steadyrl.runtime import rundir
from steadyrl.runtime.distributed import DistInfo
from steadyrl.runtime.paths import check_writable_dir
from steadyrl.sampling.layer import check_sampling

EMBEDDED_PREFIX = "embedded:"


def resolve_device(spec: str, info: DistInfo) -> torch.device:
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cuda" and info.enabled:
        spec = f"cuda:{info.local_rank}"
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"run.device is {spec!r} but CUDA is not available; set run.device=cpu (or auto).")
    device = torch.device(spec)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def resolve_model_path(name_or_path: str) -> str:
    """``embedded:<name>`` -> the directory of a checkpoint shipped inside the package; anything else as is."""
    if not name_or_path.startswith(EMBEDDED_PREFIX):
        return name_or_path
    name = name_or_path[len(EMBEDDED_PREFIX) :]
    root = Path(str(resources.files("steadyrl") / "assets"))
    path = root / name
    if not (path / "config.json").is_file():
        available = sorted(p.name for p in root.iterdir() if (p / "config.json").is_file()) if root.is_dir() else []
        raise ConfigError(
            f"no embedded model {name!r}; available: {', '.join(available) or '(none)'}. "
            "Rebuild the default one with `steadyrl warmstart`."
        )
    return str(path)


def embedded_available(name: str = "tiny-adder") -> bool:
    """Whether the package ships the embedded model ``name`` (benchmarks fall back to a random model)."""
    try:
        resolve_model_path(EMBEDDED_PREFIX + name)
        return True
    except ConfigError:
        return False


def validate_batch_arithmetic(cfg: TrainConfig, info: DistInfo) -> None:
    """Fail before any model is loaded when the batch cannot be split as asked."""
    r, o = cfg.rollout, cfg.optim
    if r.group_size < 1 or r.prompts_per_step < 1:
        raise ConfigError("rollout.group_size and rollout.prompts_per_step must be at least 1.")
    advantage = registry.lookup("advantage", cfg.advantage.name)
    if r.group_size < advantage.min_group_size:
        raise ConfigError(
            f"rollout.group_size is {r.group_size}; the {advantage.name} advantage needs at least "
            f"{advantage.min_group_size} completions per prompt."
        )
    if r.prompts_per_step % info.world_size:
        raise ConfigError(
            f"rollout.prompts_per_step={r.prompts_per_step} does not split over {info.world_size} processes; "
            f"make it a multiple of {info.world_size} (each rank keeps whole groups)."
        )
    local = r.prompts_per_step // info.world_size * r.group_size
    if o.mini_batches < 1 or local % o.mini_batches:
        raise ConfigError(
            f"{local} completions per process do not split into optim.mini_batches={o.mini_batches}; "
            f"choose a divisor of {local}."
        )
    if o.micro_batch_size < 1 or o.epochs < 1 or o.steps < 1:
        raise ConfigError("optim.micro_batch_size, optim.epochs and optim.steps must be at least 1.")
    if cfg.checkpoint.every < 0 or cfg.checkpoint.keep_last < 1 or cfg.eval.every < 0:
        raise ConfigError(
            f"checkpoint.every={cfg.checkpoint.every}, checkpoint.keep_last={cfg.checkpoint.keep_last}, "
            f"eval.every={cfg.eval.every}: every must be >= 0 (0 = only at the end / never for eval) and keep_last >= 1."
        )
    if r.max_new_tokens < 1:
        raise ConfigError("rollout.max_new_tokens must be at least 1.")
    if r.temperature <= 0:
        raise ConfigError("rollout.temperature must be > 0 for RL sampling (greedy is only used in evaluation).")
    if cfg.kl.coef < 0:
        raise ConfigError(f"kl.coef={cfg.kl.coef} is negative; use a coefficient >= 0 (0 turns the KL penalty off).")


def autocast_dtype(cfg: TrainConfig) -> torch.dtype | None:
    """The trainer's autocast dtype from ``model.autocast`` (or the older ``model.autocast_bf16``)."""
    m = cfg.model
    if m.autocast_bf16 and m.autocast not in ("none", "bfloat16"):
        raise ConfigError(
            f"model.autocast_bf16 is true but model.autocast is {m.autocast!r}; set only model.autocast."
        )
    name = "bfloat16" if m.autocast_bf16 else m.autocast
    return {"none": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def validate_precision(cfg: TrainConfig) -> None:
    """fp16 *weights* cannot be trained with AdamW: its ε = 1e-8 is 0 in fp16, so the first step divides 0 by 0.
    Precision-RL keeps fp32 master weights and computes in fp16."""
    if cfg.model.dtype == "float16":
        raise ConfigError(
            "model.dtype=float16 makes AdamW's first step non-finite (ε = 1e-8 is 0 in fp16); for fp16 training keep "
            "model.dtype=float32 and set model.autocast=float16 (with rollout.sampler_dtype=float16 for the sampler)."
        )
    autocast_dtype(cfg)  # a conflicting autocast setting fails here too


def computes_in_float16(cfg: TrainConfig) -> bool:
    """Whether the trainer's gradients pass through float16 (loss scaling applies)."""
    return autocast_dtype(cfg) == torch.float16


def validate_reward_components(cfg: TrainConfig, task) -> None:
    """An estimator that reads named reward components (GDPO) with one weight per component: the task's
    declared components must match the weights before the first rollout."""
    weights = cfg.advantage.kwargs.get("weights")
    names = getattr(task, "reward_components", None)
    if not registry.lookup("advantage", cfg.advantage.name).reads_components or weights is None or not names:
        return
    if len(weights) != len(names):
        raise ConfigError(
            f"advantage.weights has {len(weights)} values but the task's reward has {len(names)} components "
            f"({', '.join(names)}); give one weight per component, in that order."
        )


def validate_run_dir(cfg: TrainConfig) -> None:
    """Never mix two runs, never write into a directory steadyrl did not create (runtime/rundir.py): a foreign
    directory is refused, an existing run needs run.resume=true and the run's own config."""
    check_writable_dir(Path(cfg.run.output_dir), "run.output_dir")
    run = rundir.inspect(cfg.run.output_dir)
    rundir.refuse_foreign(run)
    if not run.holds_run:
        return
    if not cfg.run.resume:
        raise ConfigError(
            f"run.output_dir {run.path} already holds a run; set run.resume=true to continue it, or choose a new "
            "run.output_dir (nothing was overwritten)."
        )
    rundir.check_resume_matches(run, to_dict(cfg))


def resolve_methods(cfg: TrainConfig) -> dict:
    """Registry lookups with hyper-parameters bound; unknown names / settings raise ConfigError here, before
    anything is loaded. Stateful stabilisers, the task and the backend are checked here and built later."""
    kl = registry.resolve("kl", cfg.kl.estimator)  # checked even at coef 0: a typo must not wait until KL is on
    for spec in cfg.token_filters:
        registry.check("token_filter", spec)
    registry.check("combiner", cfg.combiner)
    registry.check("rollout_backend", cfg.rollout.backend)
    check_sampling(cfg)
    return {
        "advantage": registry.resolve("advantage", cfg.advantage),
        "loss": registry.resolve("loss", cfg.loss),
        "aggregation": registry.resolve("aggregation", cfg.aggregation),
        "correction": registry.resolve("correction", cfg.correction) if cfg.correction else None,
        "kl": kl if cfg.kl.coef > 0 else None,
    }


def lr_lambda(cfg: TrainConfig, total_optimizer_steps: int):
    o = cfg.optim

    def factor(i: int) -> float:
        if o.warmup_steps and i < o.warmup_steps:
            return (i + 1) / o.warmup_steps
        if o.schedule == "constant":
            return 1.0
        progress = min(1.0, (i - o.warmup_steps) / max(1, total_optimizer_steps - o.warmup_steps))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if o.schedule == "cosine" else 1.0 - progress
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * shape

    return factor


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module, total_optimizer_steps: int):
    o = cfg.optim
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_optimizer_steps))
    return optimizer, scheduler


def checkpoint_extra(extra: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's extra state as written today; steadyrl 0.1 wrote trainer_state / skipped_steps /
    token_filters at the top level."""
    if "progress" in extra or "trainer_state" not in extra:
        return extra
    progress = {**extra["trainer_state"], "skipped_steps": int(extra.get("skipped_steps", 0))}
    updater = {"token_filters": extra.get("token_filters", []), "combiner": {}}
    return {"progress": progress, "updater": updater, "guard": extra.get("guard", {})}
