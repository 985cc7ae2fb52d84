"""Item 3 of the lab: does CAPO's mask bound the realised per-step policy shift (arXiv 2510.00819)?

One run = the collapse map's CAPO recipe (configs/stability/capo.yaml: GRPO advantages, PPO clip 0.2,
seq_mean_token_mean, N = 2, CAPO token level, official τ_F 1e-4 / τ_H 1e-2, Adam optimizer model) at one LR,
trained by the trainer's own collector and update for ``steps`` RL steps, in one of three variants:

    nomask      the same CapoFilter with τ_F = τ_H = 0: scores computed, its optimizer model fed, nothing masked
    capo        the official rule with the sampled-token Fisher m_F (the code's)
    capo_true   the official rule with the true-Fisher m_F (``fisher_form: full``)

Around every optimizer step:

* realised shift on held-out contexts: per-position KL(π_before ‖ π_after) over the full vocabulary, on fixed
  held-out prompts × completions sampled once from the start model (mean, p95, p99, max);
* per training token of the mini-batch (scored exactly as the filter scores it, same moments and LR): the
  sampled token's probability, the sign of Â, m_F (sampled and true forms), m_H, whether the official rule
  rejects it, and what happened: the realised full-vocabulary KL at that position and the realised surrogate
  change Â (π_after(a) / π_before(a) − 1).

Summaries per run: Spearman correlation of m_F with the realised KL and of m_H with the realised change, the
rejection rate by advantage sign and by sampled-token probability, the median ratio of the sampled to the true
Fisher form by probability bin.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from steadyrl import registry
from steadyrl.config_load import load_config
from steadyrl.lab.context import build_updater, load_context
from steadyrl.lab.trainer_adapter import optimizer_step, prepare_old
from steadyrl.ops.curvature import curvature_keep, token_curvature_scores, topk_policy
from steadyrl.rollout.base import SamplingParams, left_pad
from steadyrl.runtime.distributed import DistInfo
from steadyrl.train.collect import RolloutCollector
from steadyrl.train.forward import model_inputs, policy_forward
from steadyrl.types import RolloutBatch

VARIANTS = ("nomask", "capo", "capo_true")
P_BINS = (0.0, 0.05, 0.5, 0.9, 1.0001)


@dataclass(frozen=True)
class CapoSpec:
    recipe: str = "configs/stability/capo.yaml"
    lrs: tuple[float, ...] = (3e-4, 1e-3, 3e-3)
    variants: tuple[str, ...] = VARIANTS
    steps: int = 6
    heldout_prompts: int = 64
    heldout_samples: int = 2
    overrides: tuple[str, ...] = field(default_factory=tuple)


@torch.no_grad()
def position_logprobs(model: torch.nn.Module, rollout: RolloutBatch) -> Tensor:
    """(B, T, V) fp32 log-softmax of the full next-token distribution at every completion position."""
    ids, attn, pos = model_inputs(rollout)
    logits = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits
    tp = rollout.prompt_ids.shape[1]
    return torch.log_softmax(logits[:, tp - 1 : -1].float(), dim=-1)


def token_kl(before: Tensor, after: Tensor) -> Tensor:
    """(B, T) KL(π_before ‖ π_after) = Σ_v π_before(v) (log π_before(v) − log π_after(v)), per position."""
    return (before.exp() * (before - after)).sum(-1)


def spearman(x: Tensor, y: Tensor) -> float:
    """Rank correlation of two 1-d samples (average ranks are not needed for continuous data)."""
    if x.numel() < 3:
        return float("nan")
    rx = x.double().argsort().argsort().double()
    ry = y.double().argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([rx, ry]))[0, 1])


def _recipe(spec: CapoSpec, variant: str, lr: float, seed: int):
    overrides = [f"optim.lr={lr:g}", f"run.seed={seed}", "run.device=cpu", *spec.overrides]
    cfg = load_config(spec.recipe, overrides)
    capo = next(f for f in cfg.token_filters if f.name == "capo")
    kwargs = dict(capo.kwargs)
    if variant == "nomask":
        kwargs.update(fisher_tau=0.0, hessian_tau=0.0)
    elif variant == "capo_true":
        kwargs["fisher_form"] = "full"
    filters = tuple(type(f)(f.name, kwargs) if f is capo else f for f in cfg.token_filters)
    return dataclasses.replace(cfg, token_filters=filters), dict(capo.kwargs)


class CapoRun:
    def __init__(self, spec: CapoSpec, variant: str, lr: float, seed: int) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"unknown CAPO variant {variant!r}; valid: {', '.join(VARIANTS)}.")
        self.spec, self.variant, self.lr, self.seed = spec, variant, lr, seed
        if not Path(spec.recipe).is_file():
            raise FileNotFoundError(f"{spec.recipe} not found; run from the repository root (configs/stability/).")
        self.cfg, self.official = _recipe(spec, variant, lr, seed)
        torch.manual_seed(seed)
        self.ctx = load_context(self.cfg.model.name_or_path, num_prompts=spec.heldout_prompts, split="eval",
                                task_kwargs=dict(self.cfg.task.kwargs), max_new_tokens=self.cfg.rollout.max_new_tokens)
        self.updater = build_updater(self.ctx.model, self.cfg, total_steps=spec.steps * self.cfg.optim.mini_batches)
        self.filter = self.updater.token_filters[0]
        r = self.cfg.rollout
        self.collector = RolloutCollector(
            registry.build_backend("hf", self.ctx.model, self.ctx.tokenizer), self.ctx.tokenizer, self.ctx.task,
            registry.resolve("advantage", self.cfg.advantage), params=SamplingParams(r.max_new_tokens, r.temperature),
            prompts_per_step=r.prompts_per_step, group_size=r.group_size, info=DistInfo(), seed=seed,
            device=torch.device("cpu"),
        )
        self.heldout = self._heldout_contexts()

    def _heldout_contexts(self) -> RolloutBatch:
        tok = self.ctx.tokenizer
        ids = [x for x in self.ctx.prompt_ids for _ in range(self.spec.heldout_samples)]
        prompt_ids, prompt_mask = left_pad(ids, tok.pad_token_id)
        backend = registry.build_backend("hf", self.ctx.model, tok)
        gen = torch.Generator().manual_seed(10_007 + self.seed)
        return backend.generate(prompt_ids, prompt_mask, SamplingParams(self.ctx.max_new_tokens, 1.0), generator=gen)

    def _scores(self, mini) -> dict[str, Tensor]:
        """m_F (both forms), m_H and the official keep rule for every token of ``mini``, as the filter scores it."""
        model = self.ctx.model
        lr = self.updater.optimizer.param_groups[0]["lr"]
        with torch.no_grad():
            fwd = policy_forward(model, mini.rollout, compute_entropy=False, keep_hidden=True)
            head = model.get_output_embeddings()
            topk = topk_policy(fwd.hidden, head.weight, mini.rollout.completion_ids, top_k=self.filter.top_k)
            kwargs = self.filter._model_kwargs(head.weight, False)
            mask = mini.token_mask
            out = {}
            for form in ("sampled", "full"):
                kwargs["fisher_form"] = form
                s = token_curvature_scores(fwd.hidden, topk, mini.advantages, lr, mask=mask, **kwargs)
                out[f"fisher_{form}"] = s.fisher
                out["hessian"] = s.hessian
            form = "full" if self.variant == "capo_true" else "sampled"
            keep_f, keep_h = curvature_keep(out[f"fisher_{form}"], out["hessian"], fisher_tau=self.official["fisher_tau"],
                                            hessian_tau=self.official["hessian_tau"])
            out["rejected"] = ~(keep_f & keep_h)
        return out

    def _step(self, mini, step: int, k: int, tokens: list[dict[str, Tensor]]) -> dict[str, Any]:
        scores = self._scores(mini)
        before_train = position_logprobs(self.ctx.model, mini.rollout)
        before_held = position_logprobs(self.ctx.model, self.heldout)
        metrics = optimizer_step(self.updater, mini)
        after_train = position_logprobs(self.ctx.model, mini.rollout)
        after_held = position_logprobs(self.ctx.model, self.heldout)
        held = token_kl(before_held, after_held)[self.heldout.response_mask]
        mask = mini.token_mask
        ids = mini.rollout.completion_ids.unsqueeze(-1)
        p_before = before_train.gather(-1, ids).squeeze(-1).exp()
        p_after = after_train.gather(-1, ids).squeeze(-1).exp()
        tokens.append({
            "p": p_before[mask], "adv": mini.advantages[mask], "rejected": scores["rejected"][mask],
            "fisher_sampled": scores["fisher_sampled"][mask], "fisher_full": scores["fisher_full"][mask],
            "hessian": scores["hessian"][mask], "kl": token_kl(before_train, after_train)[mask],
            "change": (mini.advantages * (p_after / p_before - 1.0))[mask],
        })
        q = torch.quantile(held, torch.tensor([0.95, 0.99]))
        return {"kind": "step", "step": step, "k": k, "lr_now": self.updater.optimizer.param_groups[0]["lr"],
                "heldout_kl_mean": float(held.mean()), "heldout_kl_p95": float(q[0]), "heldout_kl_p99": float(q[1]),
                "heldout_kl_max": float(held.max()), "train_kl_mean": float(tokens[-1]["kl"].mean()),
                "tokens": int(mask.sum()), "lab_rejected_frac": float(tokens[-1]["rejected"].float().mean()),
                "rejected_frac": float(metrics.get("capo/rejected_frac", 0.0)), "reward": None}

    def run(self) -> list[dict[str, Any]]:
        rows, tokens = [], []
        n = self.cfg.optim.mini_batches
        for step in range(self.spec.steps):
            collected = self.collector.collect(step)
            scored = collected.batch
            prepare_old(self.updater, scored, compute_old=n > 1)
            for k, index in enumerate(torch.arange(scored.batch_size).chunk(n)):
                row = self._step(scored.select(index), step, k, tokens)
                row["reward"] = float(collected.metrics["reward/mean"])
                rows.append(row)
        summary = summarise_tokens({key: torch.cat([t[key] for t in tokens]) for key in tokens[0]})
        base = {"item": "capo", "variant": self.variant, "lr": self.lr, "seed": self.seed}
        return [{**base, **r} for r in rows] + [{**base, "kind": "summary", **summary}]


def summarise_tokens(t: dict[str, Tensor]) -> dict[str, Any]:
    """Correlations, rejection by advantage sign and probability bin, and the Fisher-form ratio by bin."""
    rejected = t["rejected"]
    out: dict[str, Any] = {
        "tokens": int(rejected.numel()),
        "rejected_frac": float(rejected.float().mean()),
        "spearman_fisher_sampled_kl": spearman(t["fisher_sampled"], t["kl"]),
        "spearman_fisher_full_kl": spearman(t["fisher_full"], t["kl"]),
        "spearman_hessian_change": spearman(t["hessian"], t["change"]),
    }
    for sign, pick in (("pos", t["adv"] > 0), ("neg", t["adv"] < 0)):
        out[f"rejected_rate_adv_{sign}"] = float(rejected[pick].float().mean()) if pick.any() else float("nan")
        out[f"share_of_rejected_adv_{sign}"] = float((rejected & pick).sum() / rejected.sum().clamp(min=1))
    for lo, hi in zip(P_BINS[:-1], P_BINS[1:]):
        pick = (t["p"] >= lo) & (t["p"] < hi)
        name = f"p{lo:g}-{min(hi, 1):g}"
        out[f"tokens_{name}"] = int(pick.sum())
        out[f"rejected_rate_{name}"] = float(rejected[pick].float().mean()) if pick.any() else float("nan")
        valid = pick & (t["fisher_full"] > 0)
        ratio = t["fisher_sampled"][valid] / t["fisher_full"][valid]
        out[f"fisher_ratio_median_{name}"] = float(ratio.median()) if ratio.numel() else float("nan")
    return out


def run_capo(spec: CapoSpec, variant: str, lr: float, seed: int) -> list[dict[str, Any]]:
    return CapoRun(spec, variant, lr, seed).run()


__all__ = ["CapoSpec", "run_capo", "spearman", "summarise_tokens", "token_kl", "VARIANTS"]
