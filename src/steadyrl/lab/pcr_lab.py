"""Item 4 of the lab: does PCR trade plasticity for retention better than its baselines (arXiv 2602.06453)?

Each run is the trainer itself (``Trainer(cfg).train()``) on a recipe of configs/: GRPO + KL to the initial
model on addition, with the retention set (subtraction, which the embedded model learnt in warm start and RL
never trains) measured at every eval. Rows:

    grpo_kl      configs/grpo_kl.yaml with ``combiner: fixed_alpha, alpha: 0``: exactly the plain sum of the
                 RL and KL gradients (κ = 0), but the combiner logs their conflict cosine
    pcgrad       configs/pcgrad.yaml (symmetric projection of conflicting blocks)
    fixed_alpha  configs/pcr.yaml with ``combiner: fixed_alpha, alpha: 0.5`` (PCR's ablation)
    pcr          configs/pcr.yaml (α from the per-block gradient variances)

Measured from the run's metrics.jsonl: plasticity gain (held-out addition accuracy, last − first), retention
loss (held-out subtraction accuracy, first − last), and the per-step cosine between the plasticity and
stability gradients on the MLP blocks (``pcr/cos_pla_sta``) with the share of conflicting blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROWS: dict[str, tuple[str, tuple[str, ...]]] = {
    "grpo_kl": ("configs/grpo_kl.yaml", ("combiner.name=fixed_alpha", "combiner.alpha=0.0")),
    "pcgrad": ("configs/pcgrad.yaml", ()),
    "fixed_alpha": ("configs/pcr.yaml", ("combiner.name=fixed_alpha", "combiner.alpha=0.5")),
    "pcr": ("configs/pcr.yaml", ()),
}


@dataclass(frozen=True)
class PcrSpec:
    steps: int = 15
    lr: float = 1e-3
    eval_every: int = 5
    eval_prompts: int = 100
    methods: tuple[str, ...] = tuple(ROWS)


def _overrides(spec: PcrSpec, method: str, seed: int, out: Path) -> list[str]:
    return [
        *ROWS[method][1],
        f"optim.steps={spec.steps}", f"optim.lr={spec.lr:g}", f"eval.every={spec.eval_every}",
        f"eval.num_prompts={spec.eval_prompts}", "eval.pass_k=0", f"retention.eval_prompts={spec.eval_prompts}",
        "logging.progress=false", "logging.report=false", "logging.tensorboard=false",
        "checkpoint.save_final_model=false", "checkpoint.every=0", "run.device=cpu", "run.resume=false",
        f"run.seed={seed}", f"run.output_dir={out}",
    ]


def _finite(values: list[float]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def summarise_run(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Plasticity gain, retention loss and the conflict statistics of one run's metrics rows."""
    evals = [r for r in rows if "eval/accuracy" in r]
    train = [r for r in rows if "reward/mean" in r]
    acc = [float(r["eval/accuracy"]) for r in evals]
    ret = [float(r.get("retention/accuracy", math.nan)) for r in evals]
    cos = _finite([r.get("pcr/cos_pla_sta") for r in train])
    conflict = _finite([r.get("pcr/conflict_frac") for r in train])
    alpha = _finite([r.get("pcr/alpha_mean") for r in train])
    return {
        "acc_start": acc[0] if acc else math.nan, "acc_final": acc[-1] if acc else math.nan,
        "ret_start": ret[0] if ret else math.nan, "ret_final": ret[-1] if ret else math.nan,
        "plasticity_gain": acc[-1] - acc[0] if acc else math.nan,
        "retention_loss": ret[0] - ret[-1] if ret else math.nan,
        "cos_mean": sum(cos) / len(cos) if cos else math.nan,
        "conflict_frac_mean": sum(conflict) / len(conflict) if conflict else math.nan,
        "alpha_mean": sum(alpha) / len(alpha) if alpha else math.nan,
        "cos_curve": cos, "eval_steps": [int(r["step"]) for r in evals], "acc_curve": acc, "ret_curve": ret,
    }


def run_pcr(spec: PcrSpec, method: str, seed: int, out: str | Path) -> list[dict[str, Any]]:
    from steadyrl.config_load import load_config
    from steadyrl.report import read_metrics
    from steadyrl.train.trainer import Trainer

    config, _ = ROWS[method]
    if not Path(config).is_file():
        raise FileNotFoundError(f"{config} not found; run from the repository root (configs/).")
    run_dir = Path(out) / f"pcr_{method}_s{seed}"
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    Trainer(load_config(config, _overrides(spec, method, seed, run_dir))).train()
    return [{"item": "pcr", "method": method, "seed": seed, "lr": spec.lr, "kind": "run", **summarise_run(read_metrics(run_dir))}]
