"""Stage 3 of an RL step, update: the optimizer steps for one scored batch, and nothing else.

For every mini-batch (one optimizer step), for every micro-batch:

    forward π_θ                        logprobs, entropy [, hidden]    (MoE routing replayed, R2 / R3)
    micro_batch_terms                  correction → token filters → per-token loss → aggregate (+ KL)
    combiner.backward(terms)

then the normaliser (below), the gradient combiner (sum over ranks | PCGrad | PCR), clipping, a skip on a
non-finite gradient, and the optimizer step. The one host sync per optimizer step is the finite check.

The normaliser, decided once: a token or sequence *rejected* by a rollout correction (MIS, IcePop, Geo-RS,
OPSM) or by a token filter (CAPO's mask, as CAPO's official code averages over unmasked tokens) counts as not
sampled and leaves every normaliser; a mask *inside* a loss (PPO clip, MiniRL's staleness mask, DPPO's trust
region) keeps its tokens in the count. Rejections depend on π_θ, so they are known only after each
micro-batch's forward; each micro-batch is therefore aggregated with the step's counts before rejection, and
once every micro-batch is done the gradient of the terms that depend on those masks (policy, KL) is multiplied
by D(before)/D(after), where every aggregation mode is Σ_rows(...)/D(counts) (``ops.aggregation``). The counts
are ``ops.aggregation.global_counts`` of the step's final masks, summed over ranks: the same number however
the batch is split.

Optional parts of a step, each off unless configured: an entropy bonus term ``"entropy"`` whose coefficient
a controller adapts after the step (stabilisers/entropy.py); the fp16 loss scale (terms × S before backward,
gradients × 1/S before clipping; models/precision.py); VCPO, which before the micro-batches replaces the
mini-batch's advantages by its optimal-baseline ones and scales this step's learning rate
(stabilisers/vcpo.py, train/trajectory.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from steadyrl.config import ConfigError
from steadyrl.models.precision import DynamicLossScale
from steadyrl.ops.aggregation import global_counts
from steadyrl.ops.correction import mismatch_metrics
from steadyrl.ops.kl import kl_k3
from steadyrl.ops.masking import masked_fill_zero, masked_mean
from steadyrl.registry import Method
from steadyrl.runtime.distributed import all_reduce_sum
from steadyrl.runtime.fsdp import full, local
from steadyrl.runtime.metrics import MetricAccumulator
from steadyrl.stabilisers.combiners import GradientCombiner
from steadyrl.stabilisers.entropy import EntropyBonus
from steadyrl.stabilisers.filters import TokenFilter
from steadyrl.stabilisers.vcpo import VCPO
from steadyrl.train.batch import ScoredBatch
from steadyrl.train.forward import policy_forward, routing
from steadyrl.train.trajectory import trajectory_grad_sq_norms
from steadyrl.types import GlobalCounts, LossInputs, Metrics

AuxTerm = Callable[[int, int], dict[str, Tensor]]
"""fn(micro_index, num_micro_batches) -> {name: its share of a term whose sum over micro-batches is the term}."""


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
    """MoE Routing Replay (models/routing.py): none | R2 | R3; training forwards replay the batch's experts."""
    support: tuple[int, float] = (0, 1.0)
    """(top_k, top_p) of the sampler when the trainer scores on its support (rollout.trainer_truncation)."""

    @property
    def optimizer_steps_per_batch(self) -> int:
        return self.mini_batches * self.epochs


@dataclass
class MicroBatchTerms:
    terms: dict[str, Tensor]  # named scalar loss terms ("policy", "kl"), aggregated with the given counts
    metrics: Metrics
    mask: Tensor  # (B, T) bool, the tokens counted in the normalisers (after every rejection)


def micro_batch_terms(
    inputs: LossInputs,
    *,
    loss: Callable,
    aggregation: Callable,
    counts: GlobalCounts,
    correction: Callable | None = None,
    token_filters: Sequence[TokenFilter] = (),
    hidden: Tensor | None = None,
    lr: float = 0.0,
    kl: Callable | None = None,
    kl_coef: float = 0.0,
) -> MicroBatchTerms:
    """The loss terms of one micro-batch, composed as the trainer composes them:

        mask     = response ∧ correction keep ∧ filter keeps            (rejections)
        weights  = correction weights × filter weights                  (detached)
        policy   = agg(ℓ·weights on mask + Σ penalties on the pre-filter mask, counts)
        kl       = β · agg(k(π_θ, π_ref) on mask, counts)

    ``inputs.response_mask`` is the sampled tokens of kept samples. With a filter penalty, every token that
    carries the penalty is counted (the aggregation mask is the pre-filter one).
    """
    kept = _rejections(inputs, correction, token_filters, hidden, lr)
    loss_bt, metrics = loss(inputs)
    policy_bt = masked_fill_zero(loss_bt * kept.weights, kept.mask)
    for penalty_bt in kept.penalties:
        policy_bt = policy_bt + masked_fill_zero(penalty_bt, kept.unfiltered)
    counted = kept.unfiltered if kept.penalties else kept.mask
    terms = {"policy": aggregation(policy_bt, counted, counts)}
    if kl is not None and kl_coef > 0:
        reads_old = getattr(getattr(kl, "entry", None), "reads_old", False)  # registry fact (kl_k3_is)
        extra = {"old_logprobs": inputs.old_logprobs} if reads_old else {}
        kl_bt = kl(inputs.logprobs, inputs.ref_logprobs, counted, **extra)  # 0 outside the counted tokens
        terms["kl"] = kl_coef * aggregation(kl_bt, counted, counts)
    return MicroBatchTerms(terms, {**kept.metrics, **metrics, **_step_diagnostics(inputs, kl_coef)}, counted)


class _Kept(NamedTuple):
    mask: Tensor  # (B, T) bool after every rejection
    unfiltered: Tensor  # (B, T) bool after the correction, before the token filters
    weights: Tensor  # (B, T) detached
    penalties: list[Tensor]
    metrics: Metrics


def _rejections(inputs: LossInputs, correction, token_filters, hidden, lr) -> _Kept:
    """What the correction and the token filters reject and how they reweight (their masks AND, weights multiply)."""
    mask, weights, metrics = inputs.response_mask.clone(), torch.ones_like(inputs.logprobs.detach()), {}
    if inputs.rollout_logprobs is not None:  # measured whether or not a correction acts on it
        metrics.update(mismatch_metrics(inputs.old_logprobs, inputs.rollout_logprobs, inputs.response_mask))
    if correction is not None:
        corr = correction(inputs)
        mask, weights = mask & corr.mask, weights * corr.weights
        metrics.update(corr.metrics)  # the correction's own view of a shared key (e.g. its anchor's k3) wins
    unfiltered, penalties = mask.clone(), []
    for token_filter in token_filters:
        verdict = token_filter(inputs, hidden, lr)
        mask, weights = mask & verdict.keep, weights * verdict.weights
        metrics.update(verdict.metrics)
        if verdict.penalty is not None:
            penalties.append(verdict.penalty)
    return _Kept(mask, unfiltered, weights, penalties, metrics)


def _step_diagnostics(inputs: LossInputs, kl_coef: float) -> Metrics:
    metrics = {}
    if inputs.entropy is not None:
        metrics["policy/entropy"] = masked_mean(inputs.entropy, inputs.response_mask)
    if inputs.ref_logprobs is not None and kl_coef > 0:
        k3 = kl_k3(inputs.logprobs.detach(), inputs.ref_logprobs, inputs.response_mask)
        metrics["kl/ref_k3"] = masked_mean(k3, inputs.response_mask)
    return metrics


def normaliser_scale(aggregation: Callable, before: GlobalCounts, after: GlobalCounts) -> Tensor:
    """D(before) / D(after) for an aggregation Σ_rows(...)/D(counts): the factor that turns a gradient
    aggregated with ``before`` into one aggregated with ``after`` (0-d, on the counts' device)."""
    unit = torch.ones(1, 1, dtype=torch.float64, device=_device(before))
    unit_mask = torch.ones(1, 1, dtype=torch.bool, device=unit.device)
    return aggregation(unit, unit_mask, after) / aggregation(unit, unit_mask, before)


def _device(counts: GlobalCounts) -> torch.device:
    return counts.num_tokens.device if isinstance(counts.num_tokens, Tensor) else torch.device("cpu")


@dataclass
class UpdateResult:
    metrics: dict[str, float]
    skipped_steps: int
    """Optimizer steps of this batch dropped for a non-finite gradient."""


class PolicyUpdater:
    """Owns the optimizer steps of the policy and the state that changes with them: the token filters' and
    the combiner's (``state_dict``), and the loss's trust-region scale (``set_trust_region_scale``)."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        *,
        loss: Method,
        aggregation: Callable,
        correction: Callable | None,
        kl: Callable | None,
        combiner: GradientCombiner,
        settings: UpdateSettings,
        token_filters: Sequence[TokenFilter] = (),
        aux_terms: Sequence[AuxTerm] = (),
        distributed: bool = False,
        entropy_bonus: EntropyBonus | None = None,
        loss_scale: DynamicLossScale | None = None,
        vcpo: VCPO | None = None,
    ) -> None:
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.entropy_bonus, self.loss_scale, self.vcpo = entropy_bonus, loss_scale, vcpo
        self.base_loss = self.loss = loss
        self.aggregation, self.correction, self.kl = aggregation, correction, kl
        self.combiner, self.settings = combiner, settings
        self.token_filters = list(token_filters)
        self.aux_terms = list(aux_terms)
        self.distributed = distributed
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.replay = None if settings.routing_replay == "none" else "batch"
        # Rejections decided inside the loop change the normaliser after the fact (module docstring).
        self.rejects_in_loop = correction is not None or bool(self.token_filters)
        self.keep_hidden = any(f.needs_hidden for f in self.token_filters)
        if self.rejects_in_loop and self.aux_terms and not combiner.separable_aux:
            raise ConfigError(
                f"{type(combiner).__name__} pairs each micro-batch's policy gradient with its stability terms, so "
                "it cannot rescale the policy gradient after a rollout correction or token filter rejects tokens "
                "while a retention loss also runs; drop the correction / token filter, or retention.coef."
            )
        if self.replay and self.aux_terms and activation_checkpointing(model):
            raise ConfigError(
                "routing replay with activation checkpointing cannot tell the recomputed policy forward from an "
                "auxiliary loss term's forward; turn off model.gradient_checkpointing or routing_replay."
            )

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        state = {"token_filters": [f.state_dict() for f in self.token_filters], "combiner": self.combiner.state_dict()}
        if self.entropy_bonus is not None:
            state["entropy_bonus"] = self.entropy_bonus.state_dict()
        if self.loss_scale is not None:
            state["loss_scale"] = self.loss_scale.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        for f, s in zip(self.token_filters, state.get("token_filters", [])):
            f.load_state_dict(s)
        self.combiner.load_state_dict(state.get("combiner", {}))
        if self.entropy_bonus is not None:
            self.entropy_bonus.load_state_dict(state.get("entropy_bonus", {}))
        if self.loss_scale is not None:
            self.loss_scale.load_state_dict(state.get("loss_scale", {}))

    def set_trust_region_scale(self, scale: float) -> None:
        """Multiply the configured loss's trust-region widths by ``scale`` (the stability guard's lever)."""
        self.loss = self.base_loss.with_trust_region_scale(scale) if scale != 1.0 else self.base_loss

    # ------------------------------------------------------------------ the update

    def update(self, batch: ScoredBatch) -> UpdateResult:
        """All optimizer steps for one scored batch: ``mini_batches`` per epoch, ``epochs`` passes."""
        acc = MetricAccumulator()
        n = batch.batch_size
        if n % self.settings.mini_batches:
            raise ValueError(
                f"{n} completions per rank do not split into {self.settings.mini_batches} mini-batches; "
                "make prompts_per_step * group_size / world_size a multiple of optim.mini_batches."
            )
        skipped = 0
        for _epoch in range(self.settings.epochs):
            for rows in torch.arange(n, device=batch.advantages.device).chunk(self.settings.mini_batches):
                if batch.policy_version is not None:  # optimizer steps between the sampling policy and this one
                    lag = (self.scheduler.last_epoch - batch.policy_version[rows]).float()
                    acc.add({"rollout/policy_lag_mean": lag.mean(), "rollout/policy_lag_max": lag.max()}, rows.numel())
                skipped += self._optimizer_step(batch.select(rows), acc)
        return UpdateResult(acc.compute(distributed=self.distributed), skipped)

    def _optimizer_step(self, mb: ScoredBatch, acc: MetricAccumulator) -> int:
        s = self.settings
        lr_scale = None
        if self.vcpo is not None:  # OPOB advantages from per-trajectory gradient norms; ESS learning rate
            mb, lr_scale, vcpo_metrics = self.vcpo.prepare(mb, self._trajectory_norms, self._reduce_sum)
            acc.add(vcpo_metrics, 1.0)
        counts = global_counts(mb.token_mask, s.max_len, self._reduce_sum)  # before in-loop rejections
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.zero_grad(set_to_none=True)
        self.combiner.begin(self.params)
        micro_batches = list(torch.arange(mb.batch_size, device=mb.advantages.device).split(s.micro_batch_size))
        loss_total, counted = torch.zeros((), device=mb.advantages.device), []
        for j, rows in enumerate(micro_batches):
            micro = mb.select(rows)
            with routing(self.model, micro.rollout, self.replay):  # MoE experts fixed in forward and backward
                fwd = policy_forward(
                    self.model, micro.rollout, temperature=s.temperature, compute_entropy=True,
                    keep_hidden=self.keep_hidden, autocast_dtype=s.autocast_dtype, support=s.support,
                    entropy_grad=self.entropy_bonus is not None,
                )
                step = micro_batch_terms(
                    micro.loss_inputs(fwd, self._reduce_sum), loss=self.loss, aggregation=self.aggregation,
                    counts=counts, correction=self.correction, token_filters=self.token_filters,
                    hidden=fwd.hidden, lr=lr, kl=self.kl, kl_coef=s.kl_coef,
                )
                if self.entropy_bonus is not None:  # −c·H̄ on the counted tokens (stabilisers/entropy.py)
                    step.terms["entropy"] = self.entropy_bonus.term(fwd.entropy, step.mask, counts)
                terms = step.terms if self.rejects_in_loop else {**step.terms, **self._aux(j, len(micro_batches))}
                self.combiner.backward(self._scaled(terms))
            loss_total = loss_total + sum(t.detach() for t in terms.values())
            counted.append(step.mask)
            acc.add(step.metrics, micro.token_mask.sum())
        if self.rejects_in_loop:
            loss_total = self._renormalise(counts, counted, loss_total, len(micro_batches))
        metrics = self.combiner.finalize(self.params)
        if self.entropy_bonus is not None:
            metrics.update(self.entropy_bonus.end_step(self._reduce_sum))
        if self.loss_scale is not None:  # fp16: back to the true gradient before clipping
            metrics["train/loss_scale"] = torch.tensor(self.loss_scale.scale)
            self.loss_scale.unscale_(self.params)
        norm, skipped = self._apply_gradient(lr_scale)
        metrics["train/nonfinite_weights_max"] = self._weights_nonfinite()
        loss_total = all_reduce_sum(loss_total) if self.distributed else loss_total
        acc.add({"grad/norm": norm, "train/lr": torch.tensor(lr), "policy/loss": loss_total, **metrics}, 1.0)
        return skipped

    def _renormalise(self, counts: GlobalCounts, counted: list[Tensor], loss_total: Tensor, n_micro: int) -> Tensor:
        """Rejections leave the normaliser (module docstring): rescale the policy and KL gradient from the counts
        before rejection to those after, then backpropagate the auxiliary terms, which are not rescaled."""
        final = global_counts(counted, self.settings.max_len, self._reduce_sum)
        scale = normaliser_scale(self.aggregation, counts, final).float()
        self.combiner.rescale(scale)
        loss_total = loss_total * scale
        for j in range(n_micro):
            aux = self._aux(j, n_micro)
            if aux:
                self.combiner.backward(self._scaled(aux))
                loss_total = loss_total + sum(t.detach() for t in aux.values())
        return loss_total

    def _apply_gradient(self, lr_scale: float | None = None) -> tuple[Tensor, int]:
        """Clip, then step unless the gradient is non-finite (the step's one host sync), with the learning rate
        multiplied by ``lr_scale`` for this step only (VCPO); (norm, 1 if skipped)."""
        if self.settings.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.settings.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
        norm = full(norm)  # FSDP: the norm over every rank's shards is a DTensor
        skipped = not torch.isfinite(norm).item()
        if self.loss_scale is not None:
            self.loss_scale.update(finite=not skipped)
        if not skipped:
            groups = self.optimizer.param_groups
            base = [group["lr"] for group in groups]
            if lr_scale is not None:
                for group in groups:
                    group["lr"] = group["lr"] * lr_scale
            self.optimizer.step()
            for group, lr in zip(groups, base):  # the schedule's learning rate, untouched
                group["lr"] = lr
        for f in self.token_filters:
            (f.discard_step if skipped else f.after_step)()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return norm, int(skipped)

    def _trajectory_norms(self, mb: ScoredBatch) -> tuple[Tensor, Tensor]:
        return trajectory_grad_sq_norms(self, mb)

    def _scaled(self, terms: dict[str, Tensor]) -> dict[str, Tensor]:
        """The terms to backpropagate: multiplied by the fp16 loss scale when there is one."""
        return terms if self.loss_scale is None else self.loss_scale.scaled(terms)

    def _weights_nonfinite(self) -> Tensor:
        """1.0 when a parameter holds NaN / inf after the step (a finite gradient can still overflow a weight)."""
        finite = torch.stack([torch.isfinite(local(p)).all() for p in self.params]).all()  # FSDP: this rank's shards
        return (~finite).float()

    def _aux(self, j: int, n: int) -> dict[str, Tensor]:
        terms: dict[str, Tensor] = {}
        for aux in self.aux_terms:
            terms.update(aux(j, n))
        return terms

    @property
    def _reduce_sum(self) -> Callable[[Tensor], Tensor]:
        return all_reduce_sum if self.distributed else _identity


def activation_checkpointing(model: torch.nn.Module) -> bool:
    """Whether the model recomputes activations in backward, under the name this transformers release uses."""
    name = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") else "is_gradient_checkpointing"
    return bool(getattr(model, name, False))


def _identity(x: Tensor) -> Tensor:
    return x
