"""CAPO as a token filter: curvature masks from the training forward, plus CAPO's own optimizer model.

Curvature-Aware Policy Optimization (arXiv 2510.00819; methods.md §4). The math is in ``ops/curvature.py``;
this class holds the state around it:

* the optimizer model's Adam moments, stored sparsely by vocabulary id (a (V,) id → row index and compact
  (M, H) fp32 tables that grow as ids are first updated), on the LM head's device;
* the current optimizer step's LM-head gradient sums per vocabulary id over *kept* tokens, accumulated over
  the step's micro-batches in a dense (V, H) fp32 buffer (LM-head sized; only for adam / adamw) and turned into
  one moment update in ``after_step`` (summed over ranks first): the batch-mean gradient per id of
  ``update_effective_gradient_moments``. The official code scores after masking again only to log and to
  feed this update; token-level scores do not depend on the mask, so recording the kept tokens' gradient
  rows is the same thing;

Per micro-batch: top-K policy from (hidden, LM head) → token scores m_F, m_H with η = the current LR →
masks at the chosen level → metrics. The scores use the LM head's logits without temperature, as the code.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from steadyrl.config import ConfigError
from steadyrl.ops.curvature import (
    OPTIMIZER_MODELS,
    AdamMoments,
    CurvatureScores,
    adam_moment_update,
    curvature_keep,
    group_curvature_scores,
    token_curvature_scores,
    topk_policy,
    vocab_gradient_sums,
)
from steadyrl.ops.masking import masked_max, masked_mean
from steadyrl.runtime.distributed import all_reduce_sum
from steadyrl.stabilisers.filters import FilterResult, TokenFilter
from steadyrl.types import LossInputs, Metrics

LEVELS = {
    "token": ("token",),
    "sequence": ("sequence",),
    "global": ("global",),
    "sequential": ("token", "sequence", "global"),
}


class CapoFilter(TokenFilter):
    """Mask the tokens whose predicted policy shift (m_F) or objective shift (m_H) is too large.

    Hyper-parameters (the official flag in brackets):
        fisher_tau, hessian_tau   τ_F [fisher_token_mask_tau], τ_H [hessian_token_mask_tau]; 0 = off.
        hessian_symmetric         −τ_H < m_H < τ_H, else 0 ≤ m_H < τ_H [hessian_symmetric_clipping].
        level                     token | sequence | global | sequential (token → sequence → global, the
                                  same τ at every level [INF: the code has one τ per level]).
        sequential_rescore        in ``sequential``, score each level on the tokens the previous levels kept.
                                  The code computes those re-scores but masks with the first-pass scores,
                                  so ``False`` reproduces it exactly (then sequential = all levels at once).
        optimizer_model           sgd | adam | adamw [optim_model_type]; betas / eps / weight_decay default to
                                  the trainer's AdamW settings (``optim.*``), as the code reads them from
                                  TrainingArguments; set them here only to model a different optimizer.
        top_k                     K of the top-K softmax (the code: the sampler's top_k, 50).
        fisher_lambda, hessian_lambda
                                  > 0: add λ·m_F / λ·m_H to the per-token loss instead of masking with that
                                  score [*_token_lambda]. The code computes the scores under no_grad, so its
                                  penalty is a constant with no effect on the update; ``penalty_grad=True``
                                  (default) makes it differentiable through h and W [INF], ``False`` matches
                                  the code. Token level only.
        chunk_size, logits_chunk_size
                                  tokens per chunk for the adam scores (memory O(chunk·K·H)) and for the
                                  top-K logits (memory O(chunk·V)).
    """

    needs_hidden = True

    def __init__(
        self,
        *,
        model: torch.nn.Module,
        distributed: bool = False,
        optimizer_defaults: dict[str, Any] | None = None,
        fisher_tau: float = 1e-4,
        hessian_tau: float = 1e-2,
        hessian_symmetric: bool = True,
        level: str = "token",
        sequential_rescore: bool = True,
        optimizer_model: str = "adam",
        betas: tuple[float, float] | list[float] | None = None,
        eps: float | None = None,
        weight_decay: float | None = None,
        top_k: int = 50,
        fisher_lambda: float = 0.0,
        hessian_lambda: float = 0.0,
        penalty_grad: bool = True,
        chunk_size: int = 128,
        logits_chunk_size: int = 1024,
    ) -> None:
        super().__init__(model=model, distributed=distributed)
        trainer = {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, **(optimizer_defaults or {})}
        betas = trainer["betas"] if betas is None else betas
        eps = trainer["eps"] if eps is None else eps
        weight_decay = trainer["weight_decay"] if weight_decay is None else weight_decay
        if level not in LEVELS:
            raise ConfigError(f"capo level must be one of {', '.join(LEVELS)}, got {level!r}.")
        if optimizer_model not in OPTIMIZER_MODELS:
            raise ConfigError(
                f"capo optimizer_model must be one of {', '.join(OPTIMIZER_MODELS)}, got {optimizer_model!r}."
            )
        if len(betas) != 2:
            raise ConfigError(f"capo betas must be two numbers [β1, β2], got {betas!r}.")
        if min(fisher_tau, hessian_tau, fisher_lambda, hessian_lambda, weight_decay) < 0:
            raise ConfigError(
                "capo thresholds, lambdas and weight_decay must be >= 0 (0 switches a criterion off)."
            )
        if int(top_k) < 1 or int(chunk_size) < 1 or int(logits_chunk_size) < 1:
            raise ConfigError("capo top_k, chunk_size and logits_chunk_size must be positive integers.")
        if model.get_output_embeddings() is None:
            raise ConfigError(
                f"CAPO needs the LM head: {type(model).__name__} has no get_output_embeddings()."
            )
        if not model.get_output_embeddings().weight.requires_grad:
            # LoRA (model.lora) freezes the head: the update then moves adapters inside the decoder, not W.
            raise ConfigError(
                "CAPO scores each token by the policy change an optimizer step on the LM head's weight W would make "
                "(its last-layer model, arXiv 2510.00819), but the LM head is frozen here (model.lora trains adapters "
                "in the decoder only), so the scores would model an update that never happens; train without "
                "model.lora to use CAPO."
            )
        self.fisher_tau, self.hessian_tau = float(fisher_tau), float(hessian_tau)
        self.hessian_symmetric = bool(hessian_symmetric)
        self.level, self.sequential_rescore = level, bool(sequential_rescore)
        self.optimizer_model = optimizer_model
        self.beta1, self.beta2 = float(betas[0]), float(betas[1])
        self.eps, self.weight_decay = float(eps), float(weight_decay)
        self.top_k = int(top_k)
        self.fisher_lambda, self.hessian_lambda = float(fisher_lambda), float(hessian_lambda)
        self.penalty_grad = bool(penalty_grad)
        self.chunk_size, self.logits_chunk_size = int(chunk_size), int(logits_chunk_size)
        # Optimizer-model state (sparse by vocabulary id) and this step's gradient record.
        self._row_of: Tensor | None = None  # (V,) long
        self._exp_avg: Tensor | None = None  # (M, H)
        self._exp_avg_sq: Tensor | None = None  # (M, H)
        self._step = 0
        self._sums: Tensor | None = None  # (V, H)
        self._counts: Tensor | None = None  # (V,)
        self._recorded = False

    # ------------------------------------------------------------------ the filter

    def __call__(self, inputs: LossInputs, hidden: Tensor | None, lr: float) -> FilterResult:
        if hidden is None:
            raise RuntimeError(
                "CapoFilter needs the final hidden states; the trainer must honour needs_hidden."
            )
        if inputs.token_ids is None:
            raise RuntimeError("CapoFilter needs LossInputs.token_ids (the sampled completion ids).")
        head = self.model.get_output_embeddings()
        weight, bias = head.weight, getattr(head, "bias", None)
        mask = inputs.response_mask
        advantages = inputs.advantages.detach()
        penalise = self.fisher_lambda > 0 or self.hessian_lambda > 0
        with_grad = penalise and self.penalty_grad and torch.is_grad_enabled()
        with torch.set_grad_enabled(with_grad):
            h = hidden if with_grad else hidden.detach()
            topk = topk_policy(
                h,
                weight if with_grad else weight.detach(),
                inputs.token_ids,
                top_k=self.top_k,
                lm_head_bias=None if bias is None else (bias if with_grad else bias.detach()),
                chunk_size=self.logits_chunk_size,
            )
            token = token_curvature_scores(
                h, topk, advantages, lr, mask=mask, **self._model_kwargs(weight, with_grad)
            )
        with torch.no_grad():
            h = hidden.detach()
            topk = type(topk)(*(t.detach() for t in topk))
            token_scores = CurvatureScores(token.fisher.detach(), token.hessian.detach())
            keep_fisher, keep_hessian = self._masks(h, topk, advantages, mask, lr, token_scores, inputs)
            keep = keep_fisher & keep_hessian
            if self.optimizer_model != "sgd":
                self._record(h, topk, advantages, mask & keep, weight.shape[0])
            metrics = self._metrics(token_scores, keep, keep_fisher, keep_hessian, topk, mask)
        penalty = None
        if penalise:
            penalty = self.fisher_lambda * token.fisher + self.hessian_lambda * token.hessian
            penalty = penalty if with_grad else penalty.detach()
            metrics["capo/penalty_mean"] = masked_mean(penalty.detach(), mask)
        return FilterResult(keep & mask, torch.ones_like(advantages, dtype=torch.float32), penalty, metrics)

    def after_step(self) -> None:
        """One moment update from the step's kept tokens (summed over micro-batches and ranks)."""
        if not self._recorded:
            return
        sums, counts = self._sums, self._counts
        if self.distributed:
            sums, counts = all_reduce_sum(sums), all_reduce_sum(counts)
        touched = (counts > 0).nonzero().squeeze(-1)  # host sync: once per optimizer step, outside the loop
        self._update_moments(touched, sums[touched] / counts[touched].unsqueeze(-1))
        self._step += 1
        self._sums.zero_()
        self._counts.zero_()
        self._recorded = False

    def discard_step(self) -> None:
        """A skipped optimizer step: drop its recorded gradient sums so they do not leak into the next step."""
        if self._sums is not None:
            self._sums.zero_()
            self._counts.zero_()
        self._recorded = False

    # ------------------------------------------------------------------ state

    @property
    def moments(self) -> AdamMoments | None:
        if self._row_of is None:
            return None
        return AdamMoments(self._row_of, self._exp_avg, self._exp_avg_sq, self._step)

    def state_dict(self) -> dict[str, Any]:
        """The optimizer model's moments (for exact resume; the trainer's checkpoint must save it)."""
        return {
            "step": self._step,
            "row_of": self._row_of,
            "exp_avg": self._exp_avg,
            "exp_avg_sq": self._exp_avg_sq,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = self.model.get_output_embeddings().weight.device
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        self._step = int(state["step"])
        self._row_of, self._exp_avg, self._exp_avg_sq = (
            move(state["row_of"]),
            move(state["exp_avg"]),
            move(state["exp_avg_sq"]),
        )

    def _model_kwargs(self, weight: Tensor, with_grad: bool) -> dict[str, Any]:
        return {
            "optimizer_model": self.optimizer_model,
            "moments": self.moments if self.optimizer_model != "sgd" else None,
            "lm_head_weight": weight if with_grad else weight.detach(),
            "beta1": self.beta1,
            "beta2": self.beta2,
            "eps": self.eps,
            "weight_decay": self.weight_decay,
            "chunk_size": self.chunk_size,
        }

    def _record(self, hidden: Tensor, topk, advantages: Tensor, kept: Tensor, vocab_size: int) -> None:
        if self._sums is None:
            self._sums = torch.zeros(vocab_size, hidden.shape[-1], dtype=torch.float32, device=hidden.device)
            self._counts = torch.zeros(vocab_size, dtype=torch.float32, device=hidden.device)
        vocab_gradient_sums(
            hidden,
            topk,
            advantages,
            kept,
            vocab_size,
            chunk_size=self.chunk_size,
            out=(self._sums, self._counts),
        )
        self._recorded = True

    def _update_moments(self, ids: Tensor, grads: Tensor) -> None:
        vocab, width = self._sums.shape
        if self._row_of is None:
            self._row_of = torch.full((vocab,), -1, dtype=torch.long, device=grads.device)
            self._exp_avg = grads.new_zeros((0, width))
            self._exp_avg_sq = grads.new_zeros((0, width))
        new_ids = ids[self._row_of[ids] < 0]
        if new_ids.numel():
            first = self._exp_avg.shape[0]
            self._row_of[new_ids] = torch.arange(first, first + new_ids.numel(), device=grads.device)
            self._exp_avg = torch.cat([self._exp_avg, grads.new_zeros((new_ids.numel(), width))])
            self._exp_avg_sq = torch.cat([self._exp_avg_sq, grads.new_zeros((new_ids.numel(), width))])
        rows = self._row_of[ids]
        m, v = adam_moment_update(
            self._exp_avg[rows], self._exp_avg_sq[rows], grads, beta1=self.beta1, beta2=self.beta2
        )
        self._exp_avg[rows] = m
        self._exp_avg_sq[rows] = v

    # ------------------------------------------------------------------ masks and metrics

    def _masks(self, hidden, topk, advantages, mask, lr, token: CurvatureScores, inputs: LossInputs):
        fisher_tau = 0.0 if self.fisher_lambda > 0 else self.fisher_tau  # a penalised score does not mask
        hessian_tau = 0.0 if self.hessian_lambda > 0 else self.hessian_tau
        keep_fisher = torch.ones_like(mask)
        keep_hessian = torch.ones_like(mask)
        if fisher_tau == 0.0 and hessian_tau == 0.0:
            return keep_fisher, keep_hessian
        current = mask.clone()
        for level in LEVELS[self.level]:
            if level == "token":
                scores = token
            else:
                rescore = self.level == "sequential" and self.sequential_rescore
                scores = group_curvature_scores(
                    hidden,
                    topk,
                    advantages,
                    current if rescore else mask,
                    lr,
                    level=level,
                    reduce_sum=inputs.reduce_sum,
                    **self._model_kwargs(self.model.get_output_embeddings().weight, False),
                )
            keep_f, keep_h = curvature_keep(
                scores.fisher,
                scores.hessian,
                fisher_tau=fisher_tau,
                hessian_tau=hessian_tau,
                hessian_symmetric=self.hessian_symmetric,
            )
            if level == "sequence":
                keep_f, keep_h = keep_f.unsqueeze(-1), keep_h.unsqueeze(-1)
            keep_fisher = keep_fisher & keep_f
            keep_hessian = keep_hessian & keep_h
            current = current & keep_f & keep_h
        return keep_fisher, keep_hessian

    @staticmethod
    def _metrics(token: CurvatureScores, keep, keep_fisher, keep_hessian, topk, mask) -> Metrics:
        quantiles = torch.tensor([0.5, 0.9], device=mask.device)
        nan = torch.full_like(token.fisher, float("nan"))
        fisher = torch.where(mask, token.fisher, nan).reshape(-1)
        hessian_abs = torch.where(mask, token.hessian.abs(), nan).reshape(-1)
        fisher_q = torch.nan_to_num(torch.nanquantile(fisher, quantiles), nan=0.0)
        hessian_q = torch.nan_to_num(torch.nanquantile(hessian_abs, quantiles), nan=0.0)
        return {
            "capo/rejected_frac": masked_mean((~keep).float(), mask),
            "capo/rejected_fisher_frac": masked_mean((~keep_fisher).float(), mask),
            "capo/rejected_hessian_frac": masked_mean((~keep_hessian).float(), mask),
            "capo/fisher_q50": fisher_q[0],
            "capo/fisher_q90": fisher_q[1],
            "capo/hessian_abs_q50": hessian_q[0],
            "capo/hessian_abs_q90": hessian_q[1],
            "capo/fisher_max": masked_max(token.fisher, mask),
            "capo/hessian_abs_max": masked_max(token.hessian.abs(), mask),
            "capo/outside_topk_frac": masked_mean((~topk.sampled_in_topk).float(), mask),
        }
