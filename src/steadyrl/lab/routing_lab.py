"""Item 2 of the lab: Routing Replay's gradient fidelity on the tiny MoE (arXiv 2512.01374 §5, recipe table).

The paper's recipe table: N = 1 needs no replay; at N = 2 R2 (replay the trainer's own π_old routing) beats R3
(replay the sampler's routing); at N ≥ 4 R3 is needed. Both change the function the trainer differentiates:
the replayed π_θ routes as π_old (R2) or as μ (R3) did, while J_seq is defined by the policy's own routing.

One seed: warm-up as in lab/formulation.py; an FP8 (or bf16) sampler copy of the MoE; one enumerated set under
the mixture of policy and sampler, each row with the experts the sampler's own forward chose (what R3 ships
with a sample); for replay ∈ {none, R2, R3} and N ∈ {1, 2, 4, 8}: the trainer's MiniRL update (reinforce_is,
seq_mean_token_sum) over one sampled batch in N mini-batches, and at θ_0 and θ_{N−1} the exact expected
gradient of the replayed loss against ∇J_S(θ) of the policy's own routing, and how much of the routing at
θ_{N−1} still agrees with θ_old's (the routing part of staleness, what R2 removes). The routing agreement of
sampler and trainer, and the mismatch k3 KL(μ ‖ π_old) with and without replay, come from the trainer's own
π_old pass (the score stage, ``Scorer.score``) on a sampled batch.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from steadyrl import registry
from steadyrl.lab import fidelity as F
from steadyrl.lab.context import build_updater, load_context, method_config, rewards_for
from steadyrl.lab.enumeration import Enumerated, enumerate_completions
from steadyrl.lab.formulation import FormulationSpec, mismatch_sampler, warm_up
from steadyrl.lab.trainer_adapter import optimizer_step, prepare_old, training_gradient
from steadyrl.models.routing import RoutingRecorder, routed_positions_mask, routing_agreement
from steadyrl.train.batch import ScoredBatch
from steadyrl.train.forward import model_inputs

MINIRL_LOSS = {"name": "reinforce_is", "clip_low": 0.2, "clip_high": 0.27, "is_cap": 5.0}


@dataclass(frozen=True)
class RoutingSpec:
    model: str = "embedded:tiny-adder-moe"
    num_prompts: int = 32
    group_size: int = 8
    mass: float = 0.999
    lr: float = 1e-3
    warmup_steps: int = 3
    sampler: str = "fp8"
    staleness: tuple[int, ...] = (1, 2, 4, 8)
    replays: tuple[str, ...] = ("none", "R2", "R3")
    task_kwargs: dict = field(default_factory=lambda: {"min_digits": 1, "max_digits": 3, "operations": "+"})


@torch.no_grad()
def sampler_routing(sampler: torch.nn.Module, enum: Enumerated, chunk: int = 512) -> torch.Tensor:
    """(R, Tp+T, L, k) experts the sampler's own teacher-forced forward chose for every row (R3's record)."""
    rollout = enum.rollout()
    out = []
    for rows in torch.arange(enum.num_rows).split(chunk):
        part = rollout.select(rows)
        ids, attn, pos = model_inputs(part)
        with RoutingRecorder(sampler) as recorder:
            sampler(input_ids=ids, attention_mask=attn, position_ids=pos)
        out.append(recorder.routed_experts(ids.shape[0], ids.shape[1]))
    return torch.cat(out)


def _with_routing(batch: ScoredBatch, routed: torch.Tensor) -> ScoredBatch:
    return replace(batch, rollout=replace(batch.rollout, routed_experts=routed))


class RoutingLab:
    def __init__(self, spec: RoutingSpec, seed: int, log=print) -> None:
        self.spec, self.seed, self.log = spec, seed, log
        torch.manual_seed(seed)
        self.ctx = load_context(spec.model, num_prompts=spec.num_prompts, seed=seed, task_kwargs=spec.task_kwargs)
        warm = FormulationSpec(model=spec.model, num_prompts=spec.num_prompts, group_size=spec.group_size, lr=spec.lr,
                               warmup_steps=spec.warmup_steps, task_kwargs=spec.task_kwargs)
        self.opt_state = warm_up(self.ctx, warm, seed) if spec.warmup_steps else None
        self.theta_old = copy.deepcopy(self.ctx.model.state_dict())
        sampler = mismatch_sampler(self.ctx, spec.sampler, seed)
        tok = self.ctx.tokenizer
        self.enum = enumerate_completions([self.ctx.model, sampler], self.ctx.prompt_ids, eos_id=tok.eos_token_id,
                                          pad_id=tok.pad_token_id, max_new_tokens=self.ctx.max_new_tokens, mass=spec.mass)
        self.rewards = rewards_for(self.ctx, self.enum)
        self.mu_lp = F.sampler_token_logprobs(sampler, self.enum)
        self.routed = sampler_routing(sampler, self.enum)
        self.own_old = sampler_routing(self.ctx.model, self.enum)  # the trainer's own routing at θ_old
        self.positions = routed_positions_mask(self.enum.prompt_mask, self.enum.response_mask)
        self.grad_J, self.J, self.mass = F.true_gradient(self.ctx.model, self.enum, self.rewards)

    def updater(self, replay: str):
        cfg = method_config(loss=MINIRL_LOSS, lr=self.spec.lr, max_new_tokens=self.ctx.max_new_tokens,
                            extra={"routing_replay": replay})
        return build_updater(self.ctx.model, cfg)

    def restore(self, updater) -> None:
        self.ctx.model.load_state_dict(self.theta_old)
        if self.opt_state is not None:
            updater.optimizer.load_state_dict(copy.deepcopy(self.opt_state))

    def _sampled_with_rows(self, n: int) -> tuple[ScoredBatch, torch.Tensor]:
        """A sampled batch and the enumerated row of each of its completions (for the recorded routing)."""
        gen = torch.Generator().manual_seed(self.seed * 7919 + n * 31)
        mu = F.conditional_probs(F.sequence_logprob(self.mu_lp, self.enum.response_mask), self.enum.prompt_index,
                                 self.enum.num_prompts)
        picks = []
        for p in range(self.spec.num_prompts):
            rows = (self.enum.prompt_index == p).nonzero().squeeze(-1)
            picks.append(rows[torch.multinomial(mu[rows].float(), self.spec.group_size, replacement=True, generator=gen)])
        index = torch.cat(picks)
        part = self.enum.select(index)
        r = self.rewards[index]
        adv = registry.resolve("advantage", "dr_grpo")(r, self.spec.group_size)
        advantages = torch.where(part.response_mask, adv.advantages.float()[:, None], 0.0)
        batch = ScoredBatch(part.rollout(self.mu_lp[index]), r, advantages, adv.sample_mask)
        return _with_routing(batch, self.routed[index]), index

    def diagnostics(self) -> dict[str, Any]:
        """Routing agreement and mismatch k3 with / without replay, from the trainer's π_old pass at θ_old."""
        out: dict[str, Any] = {"kind": "setup", "rows": self.enum.num_rows, "J": self.J, "mass_min": float(self.mass.min())}
        for replay in self.spec.replays:
            updater = self.updater(replay)
            self.restore(updater)
            batch, _ = self._sampled_with_rows(1)
            metrics = prepare_old(updater, batch, compute_old=True)
            old = batch.old_logprobs
            log_rho = torch.where(batch.token_mask, old - batch.rollout.rollout_logprobs, 0.0)
            k3 = float((torch.expm1(log_rho) - log_rho).sum() / batch.token_mask.sum())
            out[f"k3_{replay}"] = k3
            for key, value in metrics.items():
                out[f"{replay}:{key}"] = float(value)
        return out

    def trajectory_rows(self, replay: str, n: int) -> list[dict[str, Any]]:
        updater = self.updater(replay)
        self.restore(updater)
        batch, _ = self._sampled_with_rows(n)
        stale = n > 1
        prepare_old(updater, batch, compute_old=stale)  # R2 records π_old's own routing into the batch
        expected = _with_routing(F.expected_batch(self.enum, self.rewards, self.mu_lp, None, self.spec.group_size), self.routed)
        prepare_old(updater, expected, compute_old=stale)
        minis = [batch.select(i) for i in torch.arange(batch.batch_size).chunk(n)]
        scale = F.reference_scale(self.enum, self.mu_lp, self.spec.group_size, False)
        flat_old = torch.cat([p.detach().reshape(-1) for p in self.ctx.model.parameters()])
        rows = []
        for k in range(n):
            if k in (0, n - 1):
                grad_j, J, _ = F.true_gradient(self.ctx.model, self.enum, self.rewards)
                g = -training_gradient(updater, expected, num_seqs=self.enum.num_prompts, lr=self.spec.lr)
                drift = float((torch.cat([p.detach().reshape(-1) for p in self.ctx.model.parameters()]) - flat_old).norm())
                own = sampler_routing(self.ctx.model, self.enum)  # how far staleness has moved the routing itself
                agree = routing_agreement(own, self.own_old, self.positions)["routing/agreement"]
                rows.append({"kind": "trajectory", "replay": replay, "N": n, "k": k, "J": J, "drift": drift,
                             "agreement_with_old": float(agree), **F.compare(g, grad_j, scale)})
            optimizer_step(updater, minis[k])
        self.ctx.model.load_state_dict(self.theta_old)
        return rows

    def run(self) -> list[dict[str, Any]]:
        rows = [self.diagnostics()]
        self.log(f"routing seed {self.seed}: {self.enum.num_rows} rows, agreement {rows[0].get('none:routing/agreement')}")
        for replay in self.spec.replays:
            for n in self.spec.staleness:
                rows += self.trajectory_rows(replay, n)
        return [{"item": "routing", "seed": self.seed, **r} for r in rows]


def run_routing(spec: RoutingSpec, seed: int, log=print) -> list[dict[str, Any]]:
    return RoutingLab(spec, seed, log).run()
