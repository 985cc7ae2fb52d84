"""Stage 2 of an RL step, score: the log-probs the update needs besides its own forward, at θ_old.

    π_old   when the batch feeds more than one optimizer step, when KL is taken to π_old, or under R2
            (whose π_old forward records the experts every later forward replays)
    π_ref   when there is a KL penalty: the reference model, under the same replayed routing as training; with
            LoRA and no reference model, the policy with its adapters disabled (the base model, no second copy)
    routing diagnostics on MoE models: routing/agreement of the sampler's experts with the trainer's own,
            and mismatch/kl_k3_no_replay = k3 KL(μ ‖ π_old without replay)
    advantages of an estimator that reads π_old's statistics (registry fact ``reads_old_statistics``, the
            optimal token baseline): its π_old forward also forms Σ_v π_v² per token, chunk by chunk in the
            LM head (no B·T·V tensor), and the (B, T) advantages replace the collect stage's zeros

Under R3 the π_old forward replays the sampler's experts, so π_old/μ and π_θ/π_old both exclude routing
(arXiv 2512.01374); under R2 it uses its own top-k gated with the replay rule and records it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from steadyrl.models.lora import adapters_disabled
from steadyrl.models.routing import RoutingRecorder, routed_positions_mask, routing_agreement
from steadyrl.ops.correction import mismatch_metrics
from steadyrl.ops.masking import masked_fill_zero
from steadyrl.train.batch import ScoredBatch
from steadyrl.train.forward import policy_forward, routing
from steadyrl.types import Metrics

# What the π_old forward replays, by routing_replay mode (see forward.routing).
_OLD_REPLAY = {"none": None, "R2": "own", "R3": "batch"}


@dataclass(frozen=True)
class ScoreSettings:
    temperature: float = 1.0
    micro_batch_size: int = 64
    autocast_dtype: torch.dtype | None = None
    routing_replay: str = "none"
    need_old: bool = False
    """π_old is needed: > 1 optimizer step per batch, or KL to π_old."""
    kl_to: str | None = None
    """None (no KL), "initial" (the reference model) or "old" (π_old)."""
    routing_diagnostics: bool = False
    group_size: int = 1
    """G, for an advantage estimator computed here."""
    support: tuple[int, float] = (0, 1.0)
    """(top_k, top_p) of the sampler when the trainer scores on its support (rollout.trainer_truncation)."""


@dataclass(frozen=True)
class Forwarded:
    logprobs: Tensor  # (B, T)
    token_logits: Tensor  # (B, T) raw logit of y_t
    routed_experts: Tensor | None  # (B, Tp+T, L, k) when recorded
    sum_pi_squared: Tensor | None = None  # (B, T) Σ_v π_v² when asked


class Scorer:
    def __init__(
        self,
        model: torch.nn.Module,
        ref_model: torch.nn.Module | None,
        settings: ScoreSettings,
        advantage: Callable | None = None,
    ) -> None:
        """``advantage``: an estimator with the registry fact ``reads_old_statistics``, computed here."""
        self.model, self.ref_model, self.settings, self.advantage = model, ref_model, settings, advantage

    @torch.no_grad()
    def forward(
        self, model: torch.nn.Module, batch: ScoredBatch, *, replay: str | None, record: bool, sum_pi_squared: bool = False
    ) -> Forwarded:
        """No-grad log-probs of the batch's completions under ``model``, micro-batched."""
        s = self.settings
        logprobs, logits, routed, sum_sq = [], [], [], []
        for index in torch.arange(batch.batch_size, device=batch.advantages.device).split(s.micro_batch_size):
            rollout = batch.rollout.select(index)
            recorder = RoutingRecorder(model) if record else contextlib.nullcontext()
            with routing(model, rollout, replay), recorder:
                out = policy_forward(
                    model, rollout, temperature=s.temperature, compute_entropy=False, autocast_dtype=s.autocast_dtype,
                    compute_sum_pi_squared=sum_pi_squared,
                    support=s.support,
                )
            logprobs.append(out.logprobs)
            logits.append(out.token_logits)
            sum_sq.append(out.sum_pi_squared)
            if record:
                routed.append(recorder.routed_experts(rollout.batch_size))
        return Forwarded(
            torch.cat(logprobs), torch.cat(logits), torch.cat(routed) if record else None,
            torch.cat(sum_sq) if sum_pi_squared else None,
        )

    def score(self, batch: ScoredBatch) -> Metrics:
        """Fill ``batch.old_logprobs`` / ``old_token_logits`` / ``ref_logprobs`` (and, under R2, the recorded
        experts) as the settings ask; return the routing diagnostics."""
        s = self.settings
        diagnose = s.routing_diagnostics and batch.rollout.routed_experts is not None
        sampler_routing = batch.rollout.routed_experts
        plain, metrics = None, {}  # plain: a forward at θ_old without replay, reused by the diagnostics
        if s.need_old or s.routing_replay == "R2" or self.advantage is not None:
            plain, metrics = self._old(batch, record=s.routing_replay == "R2" or diagnose)
        if s.kl_to is not None:
            self._ref(batch)
        return {**metrics, **(self._routing_diagnostics(batch, sampler_routing, plain) if diagnose else {})}

    def _old(self, batch: ScoredBatch, record: bool) -> tuple[Forwarded | None, Metrics]:
        """π_old, replaying what the mode says; R2 makes its own recorded experts the batch's; the advantages
        of an estimator that reads π_old. Returns the forward when it ran without replay (mode none), else
        None, and the estimator's metrics."""
        mode = self.settings.routing_replay
        old = self.forward(self.model, batch, replay=_OLD_REPLAY[mode], record=record, sum_pi_squared=self.advantage is not None)
        batch.old_logprobs, batch.old_token_logits = old.logprobs, old.token_logits
        metrics = self._token_advantages(batch, old) if self.advantage is not None else {}
        if mode == "R2":
            batch.rollout = replace(batch.rollout, routed_experts=old.routed_experts)
        return (old if mode == "none" else None), metrics

    def _token_advantages(self, batch: ScoredBatch, old: Forwarded) -> Metrics:
        """(B, T) advantages from π_old's statistics; groups are whole on every rank, so this is local."""
        mask = batch.rollout.response_mask
        adv = self.advantage(
            batch.rewards, self.settings.group_size, old_logprobs=old.logprobs, sum_pi_squared=old.sum_pi_squared,
            response_mask=mask,
        )
        batch.advantages = masked_fill_zero(adv.advantages.float(), mask).detach()
        batch.sample_mask = batch.sample_mask & adv.sample_mask
        return adv.metrics

    def _ref(self, batch: ScoredBatch) -> None:
        if self.settings.kl_to == "old":
            batch.ref_logprobs = batch.old_logprobs
            return
        replay = None if self.settings.routing_replay == "none" else "batch"
        if self.ref_model is None:  # LoRA: π_ref is the base model, i.e. the policy with every adapter bypassed
            with adapters_disabled(self.model):
                batch.ref_logprobs = self.forward(self.model, batch, replay=replay, record=False).logprobs
            return
        batch.ref_logprobs = self.forward(self.ref_model, batch, replay=replay, record=False).logprobs

    def _routing_diagnostics(self, batch: ScoredBatch, sampler_routing: Tensor, plain: Forwarded | None) -> Metrics:
        if plain is None or plain.routed_experts is None:
            plain = self.forward(self.model, batch, replay=None, record=True)
        mask = routed_positions_mask(batch.rollout.prompt_mask, batch.rollout.response_mask)
        metrics = routing_agreement(sampler_routing, plain.routed_experts, mask)
        no_replay = mismatch_metrics(plain.logprobs, batch.rollout.rollout_logprobs, batch.token_mask)
        metrics["mismatch/kl_k3_no_replay"] = no_replay["mismatch/kl_k3"]
        return metrics
