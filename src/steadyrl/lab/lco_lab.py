"""Item 5 of the lab: does LCO's logit update point at its target, and is it smoother (arXiv 2603.00963)?

LCO's claim: a loss convex in the logits (KL to a target distribution q) has logit-gradient π_θ − q, which
points at q and vanishes there, while a policy-gradient surrogate's does not, so LCO's updates are better
directed and smoother. Measured on the collapse map's LCO recipe (configs/stability/lco_kld.yaml: GRPO
advantages, seq_mean_token_mean, N = 2, warm-up 5) with the loss swapped per row:

    lco_kld   KL(q ‖ π_θ), ratio target ρ⁺ 1.8 / ρ⁻ 0.9 (the recipe's)
    lco_mse   ½ ((z_a − z_old,a) − Δz)², exp target Δz = Â/β, β = 2 (configs/lco_mse.yaml)
    lco_lch   log cosh of the same, β = 2
    ppo_clip  ε 0.2
    reinforce −Â log π_θ

Around every optimizer step, at every counted token of the mini-batch (the trainer's own collector and update):
the realised change of the full next-token log-distribution Δ = log π_after − log π_before and the direction
to the target d = log q − log π_before, compared by their cosine in the Fisher metric of π_before
(``fisher_cosine``), where q is the row's own LCO target (ppo_clip and reinforce have none: they are measured against the ratio target of lco_kld, the common
yardstick). Reported: the token-mean cosine(Δ, d) separately for the on-policy (k = 0) and the stale (k = 1)
mini-batch, the share of tokens moved towards their target, and the roughness of the steps: the relative
first difference of the gradient norm, mean |‖g_t‖ − ‖g_{t−1}‖| / mean ‖g‖, and the cosine of consecutive
parameter updates.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from steadyrl import registry
from steadyrl.config import MethodSpec
from steadyrl.config_load import load_config
from steadyrl.lab.capo_lab import position_logprobs
from steadyrl.lab.context import build_updater, load_context
from steadyrl.lab.trainer_adapter import optimizer_step, prepare_old
from steadyrl.ops.targets import logit_shift_for_target, ratio_rule_target
from steadyrl.rollout.base import SamplingParams
from steadyrl.runtime.distributed import DistInfo
from steadyrl.train.collect import RolloutCollector

LOSSES: dict[str, dict[str, Any]] = {
    "lco_kld": {"name": "lco_kld", "target": "ratio", "rho_pos": 1.8, "rho_neg": 0.9},
    "lco_mse": {"name": "lco_mse", "target": "exp", "beta": 2.0},
    "lco_lch": {"name": "lco_lch", "target": "exp", "beta": 2.0},
    "ppo_clip": {"name": "ppo_clip", "clip_low": 0.2, "clip_high": 0.2},
    "reinforce": {"name": "reinforce"},
}


@dataclass(frozen=True)
class LcoSpec:
    recipe: str = "configs/stability/lco_kld.yaml"
    lr: float = 1e-3
    steps: int = 8
    methods: tuple[str, ...] = tuple(LOSSES)


def target_shift(loss: dict[str, Any], p_old: Tensor, advantages: Tensor) -> Tensor:
    """Δz of the sampled token's logit that turns π_old into the row's target q (ratio rule for PG rows)."""
    if loss.get("target") == "exp":
        return advantages / float(loss.get("beta", 1.0))
    rho_pos, rho_neg = float(loss.get("rho_pos", 1.8)), float(loss.get("rho_neg", 0.9))
    return logit_shift_for_target(p_old, ratio_rule_target(p_old, advantages, rho_pos=rho_pos, rho_neg=rho_neg))


def target_logprobs(old: Tensor, ids: Tensor, shift: Tensor) -> Tensor:
    """(B, T, V) log q: π_old with the sampled token's logit raised by Δz, renormalised."""
    z = old + torch.nn.functional.one_hot(ids, old.shape[-1]).to(old.dtype) * shift.unsqueeze(-1)
    return torch.log_softmax(z, dim=-1)


def fisher_cosine(a: Tensor, b: Tensor, logp: Tensor) -> Tensor:
    """Per-position cosine of two (…, V) logit-space changes in the Fisher metric of π = exp(logp):

        ⟨a, b⟩_F = Σ_v π_v a_v b_v − (Σ_v π_v a_v)(Σ_v π_v b_v),    cos = ⟨a, b⟩_F / √(⟨a, a⟩_F ⟨b, b⟩_F)

    the metric in which KL(π ‖ π + δ) ≈ ½ ⟨δ, δ⟩_F: invariant to a constant shift of the logits, and a token the
    policy never samples weighs nothing (a plain cosine of log-probabilities is dominated by those tokens)."""
    p = logp.exp()

    def inner(x: Tensor, y: Tensor) -> Tensor:
        return (p * x * y).sum(-1) - (p * x).sum(-1) * (p * y).sum(-1)

    return inner(a, b) / (inner(a, a) * inner(b, b)).clamp(min=1e-30).sqrt()


def roughness(norms: list[float]) -> float:
    """mean |‖g_t‖ − ‖g_{t−1}‖| / mean ‖g‖ over consecutive steps (0 for a constant norm)."""
    if len(norms) < 2:
        return float("nan")
    diffs = [abs(b - a) for a, b in zip(norms[:-1], norms[1:])]
    return (sum(diffs) / len(diffs)) / (sum(norms) / len(norms))


def run_lco(spec: LcoSpec, method: str, seed: int) -> list[dict[str, Any]]:
    if not Path(spec.recipe).is_file():
        raise FileNotFoundError(f"{spec.recipe} not found; run from the repository root (configs/stability/).")
    loss = LOSSES[method]
    cfg = load_config(spec.recipe, [f"optim.lr={spec.lr:g}", f"run.seed={seed}", "run.device=cpu"])
    cfg = dataclasses.replace(cfg, loss=MethodSpec(loss["name"], {k: v for k, v in loss.items() if k != "name"}))
    torch.manual_seed(seed)
    ctx = load_context(cfg.model.name_or_path, num_prompts=1, task_kwargs=dict(cfg.task.kwargs),
                       max_new_tokens=cfg.rollout.max_new_tokens)
    n = cfg.optim.mini_batches
    updater = build_updater(ctx.model, cfg, total_steps=spec.steps * n)
    r = cfg.rollout
    collector = RolloutCollector(
        registry.build_backend("hf", ctx.model, ctx.tokenizer), ctx.tokenizer, ctx.task, registry.resolve("advantage", cfg.advantage),
        params=SamplingParams(r.max_new_tokens, r.temperature), prompts_per_step=r.prompts_per_step,
        group_size=r.group_size, info=DistInfo(), seed=seed, device=torch.device("cpu"),
    )
    params = [p for p in ctx.model.parameters() if p.requires_grad]
    rows, norms, previous = [], [], None
    for step in range(spec.steps):
        collected = collector.collect(step)
        scored = collected.batch
        prepare_old(updater, scored, compute_old=True)
        old_all = position_logprobs(ctx.model, scored.rollout)  # π_old: the whole batch at θ_old
        for k, index in enumerate(torch.arange(scored.batch_size).chunk(n)):
            mini = scored.select(index)
            mask = mini.token_mask
            ids = mini.rollout.completion_ids
            old = old_all[index]
            p_old = old.gather(-1, ids.unsqueeze(-1)).squeeze(-1).exp()
            target = target_logprobs(old, ids, target_shift(loss, p_old, mini.advantages))
            before = position_logprobs(ctx.model, mini.rollout)
            theta = torch.cat([p.detach().reshape(-1) for p in params])
            metrics = optimizer_step(updater, mini)
            after = position_logprobs(ctx.model, mini.rollout)
            update = torch.cat([p.detach().reshape(-1) for p in params]) - theta
            cos = fisher_cosine(after - before, target - before, before)[mask]
            norms.append(float(metrics["grad/norm"]))
            rows.append({"item": "lco", "method": method, "seed": seed, "kind": "step", "step": step, "k": k,
                         "cos_to_target": float(cos.mean()), "toward_frac": float((cos > 0).float().mean()),
                         "grad_norm": norms[-1], "reward": float(collected.metrics["reward/mean"]),
                         "update_cos_prev": None if previous is None else
                         float(torch.nn.functional.cosine_similarity(update, previous, dim=0))})
            previous = update
    steps = [x for x in rows if x["kind"] == "step"]
    consecutive = [x["update_cos_prev"] for x in steps if x["update_cos_prev"] is not None]
    summary = {
        "item": "lco", "method": method, "seed": seed, "kind": "summary",
        "cos_on_policy": _mean([x["cos_to_target"] for x in steps if x["k"] == 0]),
        "cos_stale": _mean([x["cos_to_target"] for x in steps if x["k"] > 0]),
        "toward_frac": _mean([x["toward_frac"] for x in steps]),
        "grad_norm_roughness": roughness(norms), "grad_norm_mean": _mean(norms),
        "update_cos_consecutive": _mean(consecutive),
        "reward_last": _mean([x["reward"] for x in steps[-2 * n :]]),
    }
    return rows + [summary]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")
