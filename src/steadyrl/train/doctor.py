"""Preflight for biased importance ratios: with identical weights the sampler/trainer ratio π_old/μ must be 1.

The failures reported in TRL and verl during 2026 were ratios that are wrong *on average*, not noisy: the
sampler truncated with top-k / top-p and the trainer scored the full softmax, temperature applied on one side
only, sums taken where means were meant, a micro-batch split that changed the numbers. Each makes every
importance weight, clip and correction act on a distorted ratio from the first step.

``check_ratios(trainer)`` samples one batch at the current weights, scores it with the trainer's own forward,
and compares. When the ratio is off it tests the causes it can test here, each by changing one thing and
seeing whether the gap closes, and names the fix. ``steadyrl doctor CONFIG`` runs it; the trainer runs it at
step 0 (``run.preflight``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from steadyrl.ops.correction import mismatch_metrics
from steadyrl.runtime.distributed import all_reduce_
from steadyrl.train.batch import ScoredBatch
from steadyrl.train.setup import autocast_dtype


@dataclass
class RatioReport:
    ratio_mean: float
    """mean over sampled tokens of π_old/μ (1 in expectation when the two are the same distribution)"""
    abs_log_ratio_mean: float
    abs_log_ratio_max: float
    kl_k3: float
    tolerance: float
    """the largest mean |log ρ| the sampler's and trainer's dtypes explain"""
    causes: list[str] = field(default_factory=list)
    """what closes the gap, each with its fix"""

    @property
    def ok(self) -> bool:
        return self.abs_log_ratio_mean <= self.tolerance

    def lines(self) -> list[str]:
        head = (f"sampler/trainer ratio at equal weights: mean π/μ {self.ratio_mean:.6f}, mean |log π/μ| "
                f"{self.abs_log_ratio_mean:.2e} (max {self.abs_log_ratio_max:.2e}, k3 {self.kl_k3:.2e}); "
                f"tolerance {self.tolerance:.0e}: {'ok' if self.ok else 'BIASED'}")
        if self.ok:
            return [head]
        return [head] + [f"  cause: {c}" for c in self.causes or ["not one this check can isolate (see docs/normalisation.md)"]]


def _tolerance(trainer) -> float:
    """fp32 on both sides agrees to rounding; a bf16 / fp16 sampler or autocast to its precision (≈ 1e-2)."""
    low = trainer.cfg.rollout.sampler_dtype not in (None, "float32") or trainer.cfg.model.dtype != "float32"
    return 5e-2 if low or autocast_dtype(trainer.cfg) is not None else 1e-4  # model.autocast or autocast_bf16


def _score(trainer, batch: ScoredBatch, **settings) -> torch.Tensor:
    scorer = trainer.scorer
    saved = scorer.settings
    scorer.settings = replace(saved, **settings)
    try:
        replay = None if scorer.settings.routing_replay == "none" else "batch"
        return scorer.forward(trainer.model, batch, replay=replay, record=False).logprobs
    finally:
        scorer.settings = saved


def _gap(logprobs: torch.Tensor, batch: ScoredBatch) -> float:
    m = mismatch_metrics(logprobs, batch.rollout.rollout_logprobs, batch.token_mask)
    return float(m["mismatch/abs_logprob_diff_mean"])


@torch.no_grad()
def check_ratios(trainer, step: int = 0) -> RatioReport:
    """Sample one batch at the current weights (the step's prompts), score it as the trainer does, compare."""
    trainer.backend.sync_weights()
    batch = trainer.collector.collect(step).batch
    logprobs = _score(trainer, batch)
    metrics = mismatch_metrics(logprobs, batch.rollout.rollout_logprobs, batch.token_mask)
    if trainer.info.enabled:  # one verdict on every rank: the causes below run forwards, collectives under FSDP
        gap = all_reduce_(metrics["mismatch/abs_logprob_diff_mean"].detach().float().reshape(1).clone(), "max")
        metrics["mismatch/abs_logprob_diff_mean"] = gap[0]
    m = {k: float(v) for k, v in metrics.items()}
    report = RatioReport(
        ratio_mean=m["mismatch/ratio_mean"], abs_log_ratio_mean=m["mismatch/abs_logprob_diff_mean"],
        abs_log_ratio_max=m["mismatch/abs_logprob_diff_max"], kl_k3=m["mismatch/kl_k3"], tolerance=_tolerance(trainer),
    )
    if report.ok:
        return report
    base = report.abs_log_ratio_mean
    r, s = trainer.cfg.rollout, trainer.scorer.settings

    def closes(gap: float) -> bool:
        return gap <= max(report.tolerance, 0.1 * base)

    truncates = (r.top_k or r.top_p < 1.0) and s.support == (0, 1.0)
    if truncates and closes(_gap(_score(trainer, batch, support=(r.top_k, r.top_p)), batch)):
        report.causes.append(
            f"the sampler truncates (top_k={r.top_k}, top_p={r.top_p}) and the trainer scores the full softmax: "
            "set rollout.trainer_truncation=true so both use the same support"
        )
    if s.temperature != 1.0 and closes(_gap(_score(trainer, batch, temperature=1.0), batch)):
        report.causes.append(f"temperature {s.temperature} is applied on one side only")
    if trainer.backend.separate_sampler:
        sampler_logprobs = _score_with(trainer, trainer.backend.sampler, batch)
        if closes(_gap(sampler_logprobs, batch)):
            report.causes.append(
                f"the sampler is a {r.sampler_dtype} copy (rollout.sampler_dtype): the gap is its precision; keep it "
                "and correct for it (e.g. correction: token_tis), or sample in the training dtype"
            )
    one = _score(trainer, batch, micro_batch_size=1)
    if not torch.allclose(one, logprobs, atol=1e-5, rtol=0):
        report.causes.append(
            "the trainer's log-probs change with the micro-batch split (padding or attention differs between "
            "micro-batches): check model.attn_implementation and the pad token"
        )
    if s.routing_replay == "none" and batch.rollout.routed_experts is not None:
        report.causes.append("an MoE router picks other experts in the trainer than in the sampler: routing_replay=R3")
    return report


def _score_with(trainer, model: torch.nn.Module, batch: ScoredBatch) -> torch.Tensor:
    """The trainer's forward, run on another module (the sampler copy): isolates precision from code paths."""
    scorer = trainer.scorer
    replay = None if scorer.settings.routing_replay == "none" else "batch"
    return scorer.forward(model, batch, replay=replay, record=False).logprobs.float()
