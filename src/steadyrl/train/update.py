"""The policy update for one scored rollout batch: mini-batches x micro-batches with global normalisation.

For every mini-batch (one optimizer step):
    counts  = tokens and sequences of the whole mini-batch, summed over ranks      (GlobalCounts)
    for every micro-batch:
        forward π_θ                      -> logprobs, entropy          (chunked LM head; MoE routing replayed, R2/R3)
        correction (TIS / MIS / ...)     -> detached weights, rejection mask
        token filters (CAPO ...)         -> more masks
        per-token loss  x weights        -> aggregate with the global counts -> backward
    gradient combiner (sum over ranks | PCGrad | PCR) -> clip -> skip if non-finite -> optimizer step
There is no host synchronisation inside the micro-batch loop; the one per optimizer step is the
finite-gradient check.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from steadyrl.config import ConfigError
from steadyrl.models.routing import (
    RoutingRecorder,
    RoutingReplayer,
    routed_positions_mask,
    routing_agreement,
    supported_moe_layers,
)
from steadyrl.ops.correction import mismatch_metrics
from steadyrl.ops.kl import kl_k3
from steadyrl.ops.masking import masked_fill_zero, masked_mean
from steadyrl.train.batch import ScoredBatch
from steadyrl.train.combiners import GradientCombiner
from steadyrl.train.distributed import all_reduce_sum
from steadyrl.train.filters import TokenFilter
from steadyrl.train.forward import policy_forward
from steadyrl.train.metrics import MetricAccumulator
from steadyrl.types import GlobalCounts, LossInputs, Metrics, RolloutBatch


@dataclass(frozen=True)
class UpdateSettings:
    mini_batches: int = 1
    epochs: int = 1
    micro_batch_size: int = 64
    grad_clip: float = 1.0
    temperature: float = 1.0
    max_len: int = 1
    """L of the constant normaliser (Dr.GRPO), usually max_new_tokens."""
    kl_coef: float = 0.0
    autocast_dtype: torch.dtype | None = None
    routing_replay: str = "none"
    """MoE Routing Replay (models/routing.py): none | R2 | R3."""

    @property
    def optimizer_steps_per_batch(self) -> int:
        return self.mini_batches * self.epochs


class PolicyUpdater:
    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        *,
        loss_fn: Callable,
        aggregation_fn: Callable,
        correction_fn: Callable | None,
        kl_fn: Callable | None,
        combiner: GradientCombiner,
        settings: UpdateSettings,
        token_filters: list[TokenFilter] | None = None,
        aux_terms: list[Callable[[int, int], dict[str, Tensor]]] | None = None,
        distributed: bool = False,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.loss_fn = loss_fn
        self.aggregation_fn = aggregation_fn
        self.correction_fn = correction_fn
        self.kl_fn = kl_fn
        self.combiner = combiner
        self.settings = settings
        self.token_filters = token_filters or []
        # Extra named loss terms per micro-batch, called as fn(micro_index, num_micro_batches) -> {name: scalar};
        # each returns its share of a term whose sum over the micro-batches is the full term (e.g. PCR's
        # retention loss on a separate data set).
        self.aux_terms = aux_terms or []
        self.distributed = distributed
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.skipped_steps = 0
        # MoE Routing Replay (models/routing.py). routing_diagnostics costs one no-grad forward per rollout batch
        # unless the π_old forward is already one without replay; on for MoE models, set False to save it.
        self.routing_diagnostics = bool(supported_moe_layers(model, strict=False))
        self.replay_weight_rule = "restricted_softmax"
        if settings.routing_replay != "none" and self.aux_terms and getattr(model, "is_gradient_checkpointing", False):
            raise ConfigError(
                "routing replay with activation checkpointing cannot tell the recomputed policy forward from an "
                "auxiliary loss term's forward; turn off model.gradient_checkpointing or routing_replay."
            )

    # ------------------------------------------------------------------ helpers

    @torch.no_grad()
    def logprobs_no_grad(self, model: torch.nn.Module, scored: ScoredBatch, *, replay: str | None = None) -> Tensor:
        """(B, T) log-probs of the batch's completions under ``model``, micro-batched, no graph."""
        return self._forward_no_grad(model, scored, replay=replay, record=False)[0]

    @torch.no_grad()
    def _forward_no_grad(
        self, model: torch.nn.Module, scored: ScoredBatch, *, replay: str | None, record: bool
    ) -> tuple[Tensor, Tensor | None, Tensor]:
        """(B, T) log-probs, the (B, Tp+T, L, k) experts the routers used when ``record``, (B, T) token logits."""
        out, routed, logits = [], [], []
        for index in self._chunks(scored.batch_size, self.settings.micro_batch_size, scored.advantages.device):
            rollout = scored.rollout.select(index)
            recorder = RoutingRecorder(model) if record else contextlib.nullcontext()
            with self._replaying(model, rollout, replay), recorder:
                fwd = policy_forward(
                    model,
                    rollout,
                    temperature=self.settings.temperature,
                    compute_entropy=False,
                    autocast_dtype=self.settings.autocast_dtype,
                )
            out.append(fwd.logprobs)
            logits.append(fwd.token_logits)
            if record:
                routed.append(recorder.routed_experts(rollout.batch_size))
        return torch.cat(out, dim=0), (torch.cat(routed, dim=0) if record else None), torch.cat(logits, dim=0)

    def _replaying(self, model: torch.nn.Module, rollout: RolloutBatch, replay: str | None):
        """Routing around a forward: None = the routers' own; "batch" = replay ``rollout.routed_experts`` (the
        sampler's under R3, π_old's under R2); "own" = own top-k gated with the replay rule (R2's π_old)."""
        if replay is None:
            return contextlib.nullcontext()
        if replay == "batch" and rollout.routed_experts is None:
            raise ConfigError(
                f"routing_replay={self.settings.routing_replay} found no recorded experts in the batch; the rollout "
                "backends (hf, native) record them for supported MoE models (see models/routing.py)."
            )
        routed = rollout.routed_experts if replay == "batch" else None
        return RoutingReplayer(model, routed, rule=self.replay_weight_rule)

    @property
    def replay(self) -> str | None:
        """What every training (and π_ref) forward replays: None, or "batch" under R2 / R3."""
        return None if self.settings.routing_replay == "none" else "batch"

    @torch.no_grad()
    def prepare_old_logprobs(self, scored: ScoredBatch, compute_old: bool) -> Metrics:
        """Set ``scored.old_logprobs`` (π_old) when ``compute_old`` or under R2; return the routing diagnostics.

        R2 records the π_old forward's own experts (gated with the replay rule) and makes them the batch's
        ``rollout.routed_experts``, which every training forward of the batch replays. R3 replays the sampler's
        experts in the π_old forward too, so π_old/μ and π_θ/π_old both exclude routing (arXiv 2512.01374 §5).
        Diagnostics at θ_old for MoE models, without replay: routing/agreement(_all_layers) of the sampler's
        experts with the trainer's own, and mismatch/kl_k3_no_replay = k3 KL(μ‖π_old without replay).
        """
        mode = self.settings.routing_replay
        sampler_routing = scored.rollout.routed_experts
        diagnose = self.routing_diagnostics and sampler_routing is not None
        plain_logprobs = plain_routing = None
        if compute_old or mode == "R2":
            replay = {"none": None, "R2": "own", "R3": "batch"}[mode]
            record = mode == "R2" or (mode == "none" and diagnose)
            scored.old_logprobs, recorded, scored.old_token_logits = self._forward_no_grad(
                self.model, scored, replay=replay, record=record
            )
            if mode == "R2":
                scored.rollout = replace(scored.rollout, routed_experts=recorded)
            elif mode == "none":
                plain_logprobs, plain_routing = scored.old_logprobs, recorded
        if not diagnose:
            return {}
        if plain_logprobs is None:
            plain_logprobs, plain_routing, _ = self._forward_no_grad(self.model, scored, replay=None, record=True)
        mask = routed_positions_mask(scored.rollout.prompt_mask, scored.rollout.response_mask)
        metrics = routing_agreement(sampler_routing, plain_routing, mask)
        no_replay = mismatch_metrics(plain_logprobs, scored.rollout.rollout_logprobs, scored.token_mask)
        metrics["mismatch/kl_k3_no_replay"] = no_replay["mismatch/kl_k3"]
        return metrics

    @staticmethod
    def _chunks(n: int, size: int, device: torch.device) -> list[Tensor]:
        return list(torch.arange(n, device=device).split(max(1, size)))

    def _denominator_mask(self, scored: ScoredBatch) -> Tensor:
        """Tokens that count in the normalisers: correction rejections known at θ_old are removed here."""
        mask = scored.token_mask
        if self.correction_fn is None or scored.rollout.rollout_logprobs is None:
            return mask
        old = scored.old_logprobs if scored.old_logprobs is not None else None
        if old is None:
            return mask  # on-policy: the in-loop correction sees θ = θ_old; its mask only zeroes the loss
        result = self.correction_fn(self._inputs(scored, old.clone(), old))
        return mask & result.mask

    def _inputs(self, scored: ScoredBatch, logprobs: Tensor, old: Tensor, entropy: Tensor | None = None) -> LossInputs:
        return LossInputs(
            logprobs=logprobs,
            old_logprobs=old,
            advantages=scored.advantages,
            response_mask=scored.token_mask,
            rollout_logprobs=scored.rollout.rollout_logprobs,
            ref_logprobs=scored.ref_logprobs,
            entropy=entropy,
            reduce_sum=all_reduce_sum if self.distributed else (lambda x: x),
            token_ids=scored.rollout.completion_ids,
        )

    # ------------------------------------------------------------------ the update

    def update(self, scored: ScoredBatch) -> dict[str, float]:
        """All optimizer steps for one rollout batch; returns the batch's metrics as floats."""
        acc = MetricAccumulator()
        device = scored.advantages.device
        n = scored.batch_size
        if n % self.settings.mini_batches:
            raise ValueError(
                f"{n} completions per rank do not split into {self.settings.mini_batches} mini-batches; "
                "make prompts_per_step * group_size / world_size a multiple of optim.mini_batches."
            )
        for _epoch in range(self.settings.epochs):
            for mb_index in torch.arange(n, device=device).chunk(self.settings.mini_batches):
                self._optimizer_step(scored.select(mb_index), acc)
        metrics = acc.compute(distributed=self.distributed)
        metrics["train/skipped_steps"] = float(self.skipped_steps)
        return metrics

    def _optimizer_step(self, mb: ScoredBatch, acc: MetricAccumulator) -> None:
        s = self.settings
        den_mask = self._denominator_mask(mb)
        counts = GlobalCounts(
            num_tokens=all_reduce_sum(den_mask.sum().float()).clamp(min=1.0),
            num_seqs=all_reduce_sum(mb.sample_mask.sum().float()).clamp(min=1.0),
            max_len=float(s.max_len),
        )
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.zero_grad(set_to_none=True)
        self.combiner.begin(self.params)
        loss_total = torch.zeros((), device=mb.advantages.device)
        chunks = self._chunks(mb.batch_size, s.micro_batch_size, mb.advantages.device)
        for j, index in enumerate(chunks):
            micro = mb.select(index)
            with self._replaying(self.model, micro.rollout, self.replay):
                terms, metrics, weight = self._micro_batch_terms(micro, den_mask[index], counts, lr)
            for aux in self.aux_terms:
                terms.update(aux(j, len(chunks)))
            # Activation checkpointing runs the routers again in backward: they must replay there too.
            with self._replaying(self.model, micro.rollout, self.replay):
                self.combiner.backward(terms)
            loss_total = loss_total + sum(t.detach() for t in terms.values())
            acc.add(metrics, weight)
        combine_metrics = self.combiner.finalize(self.params)
        if s.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.params, s.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
        if torch.isfinite(norm).item():  # the step's one host sync: skip a step with NaN/inf gradients
            self.optimizer.step()
            for f in self.token_filters:
                f.after_step()
        else:
            self.skipped_steps += 1
            for f in self.token_filters:
                f.discard_step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        loss_total = all_reduce_sum(loss_total) if self.distributed else loss_total
        acc.add({"grad/norm": norm, "train/lr": torch.tensor(lr), "policy/loss": loss_total, **combine_metrics}, 1.0)

    def _micro_batch_terms(
        self, micro: ScoredBatch, den_mask: Tensor, counts: GlobalCounts, lr: float
    ) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor]:
        s = self.settings
        keep_hidden = any(f.needs_hidden for f in self.token_filters)
        fwd = policy_forward(
            self.model,
            micro.rollout,
            temperature=s.temperature,
            compute_entropy=True,
            keep_hidden=keep_hidden,
            autocast_dtype=s.autocast_dtype,
        )
        old = micro.old_logprobs if micro.old_logprobs is not None else fwd.logprobs.detach()
        inputs = self._inputs(micro, fwd.logprobs, old, fwd.entropy)
        inputs.token_logits = fwd.token_logits
        on_policy = micro.old_logprobs is None
        inputs.old_token_logits = fwd.token_logits.detach() if on_policy else micro.old_token_logits
        mask = den_mask.clone()
        weights = torch.ones_like(fwd.logprobs.detach())
        metrics: dict[str, Tensor] = {}
        if self.correction_fn is not None:
            corr = self.correction_fn(inputs)
            mask &= corr.mask
            weights = weights * corr.weights
            metrics.update(corr.metrics)
        elif micro.rollout.rollout_logprobs is not None:
            metrics.update(mismatch_metrics(old, micro.rollout.rollout_logprobs, inputs.response_mask))
        penalties = []
        for token_filter in self.token_filters:
            keep, w, m = token_filter(inputs, fwd.hidden, lr)
            mask &= keep
            weights = weights * w
            metrics.update(m)
            penalty_bt = token_filter.loss_penalty()
            if penalty_bt is not None:
                penalties.append(penalty_bt)
        loss_bt, loss_metrics = self.loss_fn(inputs)
        metrics.update(loss_metrics)
        policy_bt = masked_fill_zero(loss_bt * weights, mask)
        for penalty_bt in penalties:  # soft variants: a differentiable per-token penalty instead of a mask
            policy_bt = policy_bt + masked_fill_zero(penalty_bt, den_mask)
        # A soft penalty covers every counted token, so the per-sequence lengths then come from den_mask.
        terms = {"policy": self.aggregation_fn(policy_bt, den_mask if penalties else mask, counts)}
        if self.kl_fn is not None and s.kl_coef > 0:
            kl_bt = self.kl_fn(fwd.logprobs, micro.ref_logprobs, inputs.response_mask)
            terms["kl"] = s.kl_coef * self.aggregation_fn(masked_fill_zero(kl_bt, mask), mask, counts)
            ref_k3 = kl_k3(fwd.logprobs.detach(), micro.ref_logprobs, inputs.response_mask)
            metrics["kl/ref_k3"] = masked_mean(ref_k3, inputs.response_mask)
        metrics["policy/entropy"] = masked_mean(fwd.entropy, inputs.response_mask)
        weight = inputs.response_mask.sum()
        return terms, metrics, weight
