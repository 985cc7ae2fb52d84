"""The entropy bonus and Skywork-OR1's adaptive entropy coefficient (arXiv 2505.22312 §3.2; TRL
``entropy_coef`` + ``use_adaptive_entropy``), a stateful stabiliser of the update stage.

Every micro-batch adds the loss term

    entropy = −c_applied · Σ_{counted tokens} H_t / N_tokens          (N_tokens: the optimizer step's global count)

so that, summed over micro-batches, it is −c_applied times the mean per-token entropy of π_θ over the step's
counted tokens, whatever the loss's own aggregation (TRL: "the bonus is always the mean per-token entropy
regardless of loss_type"). H_t is the full-vocabulary entropy at the sampling temperature, with gradient
(``ops.logprobs.logprobs_from_hidden(entropy_grad=True)``). "Counted" are the tokens after every rejection,
as the policy term's (TRL: the completion mask × the 80/20 entropy mask).

The adaptive controller (TRL's arithmetic, `GRPOTrainer._compute_loss`): after the optimizer step's last
micro-batch, with Ĥ = Σ H_t / Σ 1 over the step's counted tokens on every rank,

    c ← min(c + δ, c_max)   if Ĥ ≤ target,      c ← max(c − δ, c_min)   otherwise,      Ĥ_last ← Ĥ

and the next step applies c_applied = c if Ĥ_last ≤ target else 0 (Ĥ_last = +∞ before the first step, so
the first step applies none). Without ``adaptive``, c_applied = c throughout.

Two readings differ from TRL and are deliberate: TRL divides each micro-batch's entropy mean by the number of
micro-batches (equal to ours when micro-batches hold equal token counts); here the step's global token count
divides, so the bonus does not depend on the split. With a rejecting correction or token filter the update
stage rescales the accumulated gradient by the aggregation's normaliser ratio (train/update.py), which is
the token ratio for ``token_mean`` and an approximation for the sequence aggregations [INF].

State (``state_dict``: c and Ĥ_last) is kept across steps and restored by a checkpoint and a guard rollback
(``PolicyUpdater.state_dict``). No host sync: c is a tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from steadyrl.config import ConfigError, EntropyConfig
from steadyrl.ops.masking import masked_sum
from steadyrl.types import GlobalCounts, Metrics


class EntropyBonus:
    def __init__(self, cfg: EntropyConfig) -> None:
        if cfg.delta < 0 or cfg.coef_min > cfg.coef_max:
            raise ConfigError(
                f"entropy: need delta >= 0 and coef_min <= coef_max, got delta={cfg.delta}, "
                f"coef_min={cfg.coef_min}, coef_max={cfg.coef_max}."
            )
        self.cfg = cfg
        self.coef = torch.tensor(float(cfg.coef), dtype=torch.float64)
        self.last_entropy = torch.tensor(math.inf, dtype=torch.float64)
        self._window: Tensor | None = None  # (2,) Σ H·mask, Σ mask over this step's micro-batches
        self._applied: Tensor | None = None

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        return {"coef": self.coef.detach().cpu().clone(), "last_entropy": self.last_entropy.detach().cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.coef = torch.as_tensor(state["coef"], dtype=torch.float64).clone()
            self.last_entropy = torch.as_tensor(state["last_entropy"], dtype=torch.float64).clone()

    # ------------------------------------------------------------------ per step

    def applied_coef(self) -> Tensor:
        """c_applied of the current optimizer step (fixed by the state at its start), 0-d float64."""
        if not self.cfg.adaptive:
            return self.coef
        return torch.where(self.last_entropy <= self.cfg.target, self.coef, torch.zeros_like(self.coef))

    def term(self, entropy: Tensor, mask: Tensor, counts: GlobalCounts) -> Tensor:
        """This micro-batch's share of −c_applied·H̄ (0-d, with gradient through ``entropy`` (B, T)); records
        the entropy the controller measures."""
        device = entropy.device
        if self.coef.device != device:
            self.coef, self.last_entropy = self.coef.to(device), self.last_entropy.to(device)
        if self._applied is None:
            self._applied = self.applied_coef()
        stats = torch.stack([masked_sum(entropy.detach().double(), mask), mask.sum().double()])
        self._window = stats if self._window is None else self._window + stats
        num_tokens = torch.as_tensor(counts.num_tokens, dtype=torch.float64, device=device).clamp(min=1.0)
        share = masked_sum(entropy, mask) / num_tokens.to(entropy.dtype)
        return -self._applied.to(entropy.dtype) * share

    def end_step(self, reduce_sum: Callable[[Tensor], Tensor]) -> Metrics:
        """After the step's last micro-batch: adapt c (adaptive) and reset the window; the step's metrics."""
        applied = self._applied if self._applied is not None else self.applied_coef()
        metrics: Metrics = {"entropy/applied_coef": applied.float()}
        if self._window is not None:
            window = reduce_sum(self._window)
            measured = window[0] / window[1].clamp(min=1.0)
            metrics["entropy/measured"] = measured.float()
            if self.cfg.adaptive:
                c = self.cfg
                up = torch.clamp(self.coef + c.delta, max=c.coef_max)
                down = torch.clamp(self.coef - c.delta, min=c.coef_min)
                self.coef = torch.where(measured <= c.target, up, down)
                self.last_entropy = measured
        metrics["entropy/coef"] = self.coef.float()
        self._window, self._applied = None, None
        return metrics
