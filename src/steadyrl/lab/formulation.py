"""Item 1 of the lab: does the trainer's gradient track ∇J_seq as mismatch and staleness grow (arXiv 2512.01374)?

One seed (= one prompt set and one rollout batch per trajectory):

1. warm-up: ``warmup_steps`` on-policy steps of the trainer (REINFORCE, sampled with the HF backend) so that
   Adam's moments are those of a run in progress; the result is θ_old and its optimizer state;
2. samplers μ at θ_old for every mismatch (lab/samplers.py), one enumerated set S under their mixture;
3. noise floor: K sampled mini-batches of P/N prompts × G from μ_fp32 through the trainer's loss, their
   relative distance to the exact expectation (what one step's sampling noise is, beside every bias);
4. mismatch axis (N = 1, θ = θ_old, on-policy as the trainer: no π_old): every method × aggregation;
5. staleness (N = 2, 4, 8): one real batch from μ split into N mini-batches; each method runs its own N
   optimizer steps (the trainer's ``update``); at the θ_k each mini-batch reaches, the exact expected gradient
   of that mini-batch (π_old and μ at θ_old) against ∇J_S(θ_k), the drift ‖θ_k − θ_old‖ and the exact
   sequence KL(π_old ‖ π_θk) over S. "fixed": every method evaluated at the θ_{N−1} that the uncorrected
   update (method none) reaches, so methods differ only in their gradient, not in where they went.

Methods (all with dr_grpo advantages, the MiniRL paper's; the length-normalised variants aggregate with
seq_mean_token_mean, the others with seq_mean_token_sum):

    none      reinforce: −Â log π_θ, no IS weight (the token surrogate at weight 1)
    tis       reinforce × token_tis(anchor current, C = 5): the paper's token IS weight min(π_θ/μ, C)
    minirl    reinforce_is: the same weight and MiniRL's staleness mask (ε 0.2 / 0.27)
    ppo_clip  ppo_clip ε 0.2 on π_θ/π_old, no train-inference weight (GRPO's surrogate)
    seq_is    control: reinforce × seq_tis(anchor current, C = 10⁶), the sequence-level weight π_θ(y)/μ(y) of
              J_seq's own importance-sampling identity; it must track ∇J_S exactly (the measurement's check)

At N = 1 the trainer passes no π_old (θ = θ_old), so ppo_clip's ratio is 1 and it equals none, and minirl's
mask never fires and it equals tis (tests/lab check both); the mismatch axis computes none, tis and seq_is.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from steadyrl import registry
from steadyrl.lab import fidelity as F
from steadyrl.lab.context import LabContext, build_updater, load_context, method_config, rewards_for
from steadyrl.lab.enumeration import Enumerated, enumerate_completions
from steadyrl.lab.samplers import make_sampler
from steadyrl.lab.trainer_adapter import optimizer_step, training_gradient
from steadyrl.ops.masking import masked_fill_zero
from steadyrl.rollout.base import SamplingParams, left_pad
from steadyrl.rollout.text import decode_completions
from steadyrl.tasks import score_completions
from steadyrl.train.batch import ScoredBatch

METHODS: dict[str, dict[str, Any]] = {
    "none": {"loss": "reinforce"},
    "tis": {"loss": "reinforce", "correction": {"name": "token_tis", "anchor": "current", "cap": 5.0}},
    "minirl": {"loss": {"name": "reinforce_is", "clip_low": 0.2, "clip_high": 0.27, "is_cap": 5.0}},
    "ppo_clip": {"loss": {"name": "ppo_clip", "clip_low": 0.2, "clip_high": 0.2}},
    "seq_is": {"loss": "reinforce", "correction": {"name": "seq_tis", "anchor": "current", "cap": 1e6}},
}
SAME_AT_N1 = {"ppo_clip": "none", "minirl": "tis"}
AGGREGATIONS = {"sum": "seq_mean_token_sum", "mean": "seq_mean_token_mean"}


@dataclass(frozen=True)
class FormulationSpec:
    model: str = "embedded:tiny-adder"
    num_prompts: int = 32
    group_size: int = 8
    mass: float = 0.999
    lr: float = 1e-3
    warmup_steps: int = 3
    mismatches: tuple[str, ...] = ("fp32", "bf16", "fp8", "noise1", "noise3")
    staleness: tuple[int, ...] = (2, 4, 8)
    trajectory_mismatches: tuple[str, ...] = ("fp32", "noise1")
    every_k: tuple[int, ...] = ()
    """N whose trajectories are measured at every θ_k (the others only at θ_0 and θ_{N−1}); full mode: (8,)."""
    methods: tuple[str, ...] = ("none", "tis", "minirl", "ppo_clip")
    mismatch_methods: tuple[str, ...] = ("none", "tis", "seq_is")
    aggregations: tuple[str, ...] = tuple(AGGREGATIONS)
    noise_batches: int = 4
    task_kwargs: dict = field(default_factory=lambda: {"min_digits": 1, "max_digits": 3, "operations": "+"})
    max_new_tokens: int = 6
    max_rows: int = 2000
    """Completions kept per prompt at most (the enumeration stops there even below ``mass``; setup rows report the
    mass reached)."""


def mismatch_sampler(ctx: LabContext, kind: str, seed: int) -> torch.nn.Module:
    """``noise<σ>`` (e.g. noise1, noise3) is the noisy-head sampler with logit noise σ; else lab.samplers."""
    if kind.startswith("noise"):
        return make_sampler(ctx.model, ctx.tokenizer, "noise", noise_sigma=float(kind[5:] or 1.0), seed=seed)
    return make_sampler(ctx.model, ctx.tokenizer, kind)


def updater_for(ctx: LabContext, method: str, agg: str, lr: float):
    spec = METHODS[method]
    cfg = method_config(
        loss=spec["loss"], aggregation=AGGREGATIONS[agg], correction=spec.get("correction"), lr=lr,
        max_new_tokens=ctx.max_new_tokens,
    )
    return build_updater(ctx.model, cfg)


def warm_up(ctx: LabContext, spec: FormulationSpec, seed: int) -> dict:
    """``warmup_steps`` on-policy REINFORCE steps with sampled rollouts; returns the optimizer state."""
    updater = updater_for(ctx, "none", "sum", spec.lr)
    backend = registry.build_backend("hf", ctx.model, ctx.tokenizer)
    adv_fn = registry.resolve("advantage", "dr_grpo")
    eos = {ctx.tokenizer.eos_token_id}
    for step in range(spec.warmup_steps):
        prompts = ctx.task.sample("train", spec.num_prompts, seed=10_000 + 97 * seed + step)
        expanded = [p for p in prompts for _ in range(spec.group_size)]
        ids, mask = left_pad([ctx.tokenizer(p.text)["input_ids"] for p in expanded], ctx.tokenizer.pad_token_id)
        gen = torch.Generator().manual_seed(seed * 1000 + step)
        rollout = backend.generate(ids, mask, SamplingParams(ctx.max_new_tokens, 1.0), generator=gen)
        texts = decode_completions(ctx.tokenizer, rollout.completion_ids, rollout.response_mask, eos)
        rewards = score_completions(ctx.task, expanded, texts).float()
        adv = adv_fn(rewards, spec.group_size)
        advantages = masked_fill_zero(adv.advantages[:, None].expand_as(rollout.rollout_logprobs).clone(), rollout.response_mask)
        optimizer_step(updater, ScoredBatch(rollout, rewards, advantages, adv.sample_mask))
    return copy.deepcopy(updater.optimizer.state_dict())


def _flat_params(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])


class FormulationLab:
    """The state of one seed's measurement (θ_old, S, the samplers' μ, ∇J at θ_old)."""

    def __init__(self, spec: FormulationSpec, seed: int, log=print) -> None:
        self.spec, self.seed, self.log = spec, seed, log
        torch.manual_seed(seed)
        self.ctx = load_context(spec.model, num_prompts=spec.num_prompts, seed=seed, task_kwargs=spec.task_kwargs,
                                max_new_tokens=spec.max_new_tokens)
        self.opt_state = warm_up(self.ctx, spec, seed) if spec.warmup_steps else None
        self.theta_old = copy.deepcopy(self.ctx.model.state_dict())
        self.flat_old = _flat_params(self.ctx.model)
        samplers = {m: mismatch_sampler(self.ctx, m, seed) for m in spec.mismatches}
        tok = self.ctx.tokenizer
        models = [self.ctx.model] + [s for m, s in samplers.items() if m != "fp32"]
        started = time.perf_counter()
        self.enum: Enumerated = enumerate_completions(
            models, self.ctx.prompt_ids, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
            max_new_tokens=self.ctx.max_new_tokens, mass=spec.mass, max_rows=spec.max_rows,
        )
        self.enum_seconds = time.perf_counter() - started
        self.rewards = rewards_for(self.ctx, self.enum)
        self.old_lp = F.trainer_token_logprobs(self.ctx.model, self.enum)
        self.mu_lp = {m: F.sampler_token_logprobs(s, self.enum) for m, s in samplers.items()}
        self.grad_J, self.J, self.mass = F.true_gradient(self.ctx.model, self.enum, self.rewards)

    # ------------------------------------------------------------------ pieces

    def restore(self, updater=None) -> None:
        self.ctx.model.load_state_dict(self.theta_old)
        if updater is not None and self.opt_state is not None:
            updater.optimizer.load_state_dict(copy.deepcopy(self.opt_state))

    def expected(self, updater, mismatch: str, stale: bool) -> torch.Tensor:
        """−E[∇ L_trainer] (an ascent direction) of one mini-batch at the model's current θ."""
        batch = F.expected_batch(self.enum, self.rewards, self.mu_lp[mismatch], self.old_lp if stale else None, self.spec.group_size)
        return -training_gradient(updater, batch, num_seqs=self.enum.num_prompts, lr=self.spec.lr)

    def scale(self, mismatch: str, agg: str) -> float:
        return F.reference_scale(self.enum, self.mu_lp[mismatch], self.spec.group_size, agg == "mean")

    def setup_row(self) -> dict[str, Any]:
        e = self.enum
        mism = {}
        for m, lp in self.mu_lp.items():
            log_rho = torch.where(e.response_mask, self.old_lp - lp, 0.0)
            k3_row = (torch.expm1(log_rho) - log_rho).sum(1) / e.response_mask.sum(1)
            w = F.conditional_probs(F.sequence_logprob(lp, e.response_mask), e.prompt_index, e.num_prompts)
            mism[m] = {
                "k3": float((w * k3_row.double()).sum() / e.num_prompts),
                "seq_kl_mu_old": F.sequence_kl(lp, self.old_lp, e),
                "mass_mu": float(e.mass_of(0).mean()) if m == "fp32" else None,
            }
        return {
            "kind": "setup", "rows": e.num_rows, "mass_min": float(self.mass.min()), "mass_mean": float(self.mass.mean()),
            "J": self.J, "success_rate": float(self.rewards.sum() / e.num_prompts), "mismatch": mism,
            "mean_len": float(e.response_mask.sum(1).float().mean()),
            "mean_len_policy": self._policy_mean(e.response_mask.sum(1).double()),
            "truncated_policy": self._policy_mean(e.truncated.double()),
            "rows_per_prompt_max": int(torch.bincount(e.prompt_index, minlength=e.num_prompts).max()),
            "enum_s": self.enum_seconds,
        }

    def _policy_mean(self, per_row: torch.Tensor) -> float:
        """Mean over prompts of E_{π̃_old}[per_row] (π_old renormalised over each prompt's kept rows)."""
        e = self.enum
        w = F.conditional_probs(F.sequence_logprob(self.old_lp, e.response_mask), e.prompt_index, e.num_prompts)
        return float((w * per_row).sum() / e.num_prompts)

    def noise_rows(self) -> list[dict[str, Any]]:
        """Relative distance of single sampled mini-batch gradients (method none, μ = fp32) to their expectation."""
        out = []
        adv_fn = registry.resolve("advantage", "dr_grpo")
        gen = torch.Generator().manual_seed(self.seed)
        for agg in self.spec.aggregations:
            updater = updater_for(self.ctx, "none", agg, self.spec.lr)
            exact = self.expected(updater, "fp32", stale=False)
            ref = self.scale("fp32", agg) * self.grad_J
            for n in (1, *self.spec.staleness):
                prompts_per = max(1, self.spec.num_prompts // n)
                dists, coss = [], []
                for _ in range(self.spec.noise_batches):
                    prompts = torch.randint(0, self.spec.num_prompts, (prompts_per,), generator=gen)
                    batch = F.sampled_batch(self.enum, self.rewards, self.mu_lp["fp32"], None, prompts=prompts,
                                            group_size=self.spec.group_size, advantage_fn=adv_fn, generator=gen)
                    g = -training_gradient(updater, batch, num_seqs=batch.batch_size, lr=self.spec.lr)
                    dists.append(float((g - exact).norm() / ref.norm()))
                    coss.append(float(torch.nn.functional.cosine_similarity(g, ref, dim=0)))
                out.append({"kind": "noise", "agg": agg, "N": n, "minibatch": prompts_per * self.spec.group_size,
                            "noise_rel": (sum(d * d for d in dists) / len(dists)) ** 0.5, "noise_cos": sum(coss) / len(coss)})
        return out

    def mismatch_rows(self) -> list[dict[str, Any]]:
        out = []
        for agg in self.spec.aggregations:
            for method in self.spec.mismatch_methods:
                updater = updater_for(self.ctx, method, agg, self.spec.lr)
                for m in self.spec.mismatches:
                    g = self.expected(updater, m, stale=False)
                    row = {"kind": "mismatch", "mismatch": m, "N": 1, "k": 0, "method": method, "agg": agg,
                           **F.compare(g, self.grad_J, self.scale(m, agg))}
                    out.append(row)
                    out += [{**row, "method": same, "same_as": method} for same, of in SAME_AT_N1.items()
                            if of == method and same in self.spec.methods]
        return out

    def _sampled_full_batch(self, mismatch: str, n: int) -> ScoredBatch:
        gen = torch.Generator().manual_seed(self.seed * 7919 + n * 31 + sum(map(ord, mismatch)))
        prompts = torch.arange(self.spec.num_prompts)
        return F.sampled_batch(self.enum, self.rewards, self.mu_lp[mismatch], self.old_lp, prompts=prompts,
                               group_size=self.spec.group_size, advantage_fn=registry.resolve("advantage", "dr_grpo"),
                               generator=gen)

    def _state_row(self) -> dict[str, float]:
        """Where θ is: drift from θ_old, exact sequence KL(π_old ‖ π_θ) over S, J_S(θ)."""
        new_lp = F.trainer_token_logprobs(self.ctx.model, self.enum)
        seq = F.sequence_logprob(new_lp, self.enum.response_mask).exp()
        J = float((seq * self.rewards.double()).sum() / self.enum.num_prompts)
        return {"drift": float((_flat_params(self.ctx.model) - self.flat_old).norm()),
                "kl_seq": F.sequence_kl(self.old_lp, new_lp, self.enum), "J": J}

    def trajectory_rows(self, mismatch: str, n: int, *, with_start: bool = True) -> list[dict[str, Any]]:
        """Rows of the N-mini-batch updates from one sampled batch; ``with_start`` measures θ_0 too (θ_old, the
        same for every N: one N is enough)."""
        batch = self._sampled_full_batch(mismatch, n)
        minis = [batch.select(i) for i in torch.arange(batch.batch_size).chunk(n)]
        every = n in self.spec.every_k
        out, fixed_thetas = [], {}
        for agg in self.spec.aggregations:
            for method in self.spec.methods:
                updater = updater_for(self.ctx, method, agg, self.spec.lr)
                self.restore(updater)
                for k in range(n + 1):
                    if k < n and (every or k == n - 1 or (k == 0 and with_start)):
                        grad_j, _, _ = F.true_gradient(self.ctx.model, self.enum, self.rewards)
                        g = self.expected(updater, mismatch, stale=True)
                        row = {"kind": "trajectory", "mismatch": mismatch, "N": n, "k": k, "method": method, "agg": agg,
                               **F.compare(g, grad_j, self.scale(mismatch, agg)), **self._state_row()}
                        out.append(row)
                        if method == "none" and k == n - 1:
                            fixed_thetas[agg] = (copy.deepcopy(self.ctx.model.state_dict()), grad_j)
                    elif k == n:
                        out.append({"kind": "after", "mismatch": mismatch, "N": n, "k": k, "method": method, "agg": agg,
                                    "J_old": self.J, **self._state_row()})
                    if k < n:
                        optimizer_step(updater, minis[k])
        for agg, (state, grad_j) in fixed_thetas.items():  # every method at the uncorrected update's θ_{N−1}
            for method in self.spec.methods:
                if method == "none":  # none's own trajectory row is this measurement
                    row = next(r for r in out if r["kind"] == "trajectory" and r["method"] == "none" and r["agg"] == agg
                               and r["k"] == n - 1)
                    out.append({"kind": "fixed", **{k: row[k] for k in ("mismatch", "N", "k", "method", "agg", "cos",
                                                                          "rel_err", "norm_ratio")}})
                    continue
                self.ctx.model.load_state_dict(state)
                updater = updater_for(self.ctx, method, agg, self.spec.lr)
                g = self.expected(updater, mismatch, stale=True)
                out.append({"kind": "fixed", "mismatch": mismatch, "N": n, "k": n - 1, "method": method, "agg": agg,
                            **F.compare(g, grad_j, self.scale(mismatch, agg))})
        self.restore()
        return out

    def run(self) -> list[dict[str, Any]]:
        rows = [self.setup_row()]
        self.log(f"formulation seed {self.seed}: {self.enum.num_rows} rows, J = {self.J:.3f}")
        rows += self.noise_rows()
        rows += self.mismatch_rows()
        for m in self.spec.trajectory_mismatches:
            for i, n in enumerate(self.spec.staleness):
                rows += self.trajectory_rows(m, n, with_start=i == 0)
                self.log(f"formulation seed {self.seed}: trajectory {m} N={n} done")
        return [{"item": "formulation", "seed": self.seed, **r} for r in rows]


def run_formulation(spec: FormulationSpec, seed: int, log=print) -> list[dict[str, Any]]:
    return FormulationLab(spec, seed, log).run()
