"""Stage 2 of an RL step, score: the log-probs the update needs besides its own forward, at θ_old.

    π_old   when the batch feeds more than one optimizer step, when KL is taken to π_old, or under R2
            (whose π_old forward records the experts every later forward replays)
    π_ref   when there is a KL penalty: the reference model, under the same replayed routing as training; with
            LoRA and no reference model, the policy with its adapters disabled (the base model, no second copy)
    routing diagnostics on MoE models: routing/agreement of the sampler's experts with the trainer's own,
            and mismatch/kl_k3_no_replay = k3 KL(μ ‖ π_old without replay)

Under R3 the π_old forward replays the sampler's experts, so π_old/μ and π_θ/π_old both exclude routing
(arXiv 2512.01374); under R2 it uses its own top-k gated with the replay rule and records it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from steadyrl.models.lora import adapters_disabled
from steadyrl.models.routing import RoutingRecorder, routed_positions_mask, routing_agreement
from steadyrl.ops.correction import mismatch_metrics
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
    support: tuple[int, float] = (0, 1.0)
    """(top_k, top_p) of the sampler when the trainer scores on its support (rollout.trainer_truncation)."""


@dataclass(frozen=True)
class Forwarded:
    logprobs: Tensor  # (B, T)
    token_logits: Tensor  # (B, T) raw logit of y_t
    routed_experts: Tensor | None  # (B, Tp+T, L, k) when recorded


class Scorer:
    def __init__(self, model: torch.nn.Module, ref_model: torch.nn.Module | None, settings: ScoreSettings) -> None:
        self.model, self.ref_model, self.settings = model, ref_model, settings

    @torch.no_grad()
    def forward(self, model: torch.nn.Module, batch: ScoredBatch, *, replay: str | None, record: bool) -> Forwarded:
        """No-grad log-probs of the batch's completions under ``model``, micro-batched."""
        s = self.settings
        logprobs, logits, routed = [], [], []
        for index in torch.arange(batch.batch_size, device=batch.advantages.device).split(s.micro_batch_size):
            rollout = batch.rollout.select(index)
            recorder = RoutingRecorder(model) if record else contextlib.nullcontext()
            with routing(model, rollout, replay), recorder:
                out = policy_forward(
                    model, rollout, temperature=s.temperature, compute_entropy=False, autocast_dtype=s.autocast_dtype,
                    support=s.support,
                )
            logprobs.append(out.logprobs)
            logits.append(out.token_logits)
            if record:
                routed.append(recorder.routed_experts(rollout.batch_size))
        return Forwarded(torch.cat(logprobs), torch.cat(logits), torch.cat(routed) if record else None)

    def score(self, batch: ScoredBatch) -> Metrics:
        """Fill ``batch.old_logprobs`` / ``old_token_logits`` / ``ref_logprobs`` (and, under R2, the recorded
        experts) as the settings ask; return the routing diagnostics."""
        s = self.settings
        diagnose = s.routing_diagnostics and batch.rollout.routed_experts is not None
        sampler_routing = batch.rollout.routed_experts
        plain = None  # a forward at θ_old without replay, reused by the diagnostics
        if s.need_old or s.routing_replay == "R2":
            plain = self._old(batch, record=s.routing_replay == "R2" or diagnose)
        if s.kl_to is not None:
            self._ref(batch)
        return self._routing_diagnostics(batch, sampler_routing, plain) if diagnose else {}

    def _old(self, batch: ScoredBatch, record: bool) -> Forwarded | None:
        """π_old, replaying what the mode says; R2 makes its own recorded experts the batch's. Returns the
        forward when it ran without replay (mode none), else None."""
        mode = self.settings.routing_replay
        old = self.forward(self.model, batch, replay=_OLD_REPLAY[mode], record=record)
        batch.old_logprobs, batch.old_token_logits = old.logprobs, old.token_logits
        if mode == "R2":
            batch.rollout = replace(batch.rollout, routed_experts=old.routed_experts)
        return old if mode == "none" else None

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
