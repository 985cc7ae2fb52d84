"""A rollout batch after scoring: rewards, advantages and the extra log-probs the update needs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from torch import Tensor

from steadyrl.types import LossInputs, Metrics, RolloutBatch

if TYPE_CHECKING:
    from steadyrl.train.forward import PolicyOutput


@dataclass
class ScoredBatch:
    rollout: RolloutBatch
    rewards: Tensor  # (B,) float, NaN where the reward function returned nothing
    advantages: Tensor  # (B, T) detached
    sample_mask: Tensor  # (B,) bool, False = left out of the loss
    old_logprobs: Tensor | None = None  # (B, T) π_old, only when the batch is used for > 1 optimizer step
    ref_logprobs: Tensor | None = None  # (B, T) π_ref, only with a KL penalty
    old_token_logits: Tensor | None = None  # (B, T) π_old's raw logit of y_t (LCO-MSE/LCH off-policy)
    policy_version: Tensor | None = None  # (B,) long, optimizer steps taken when the sample was drawn
    metrics: Metrics = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return self.rollout.batch_size

    @property
    def token_mask(self) -> Tensor:
        """(B, T) bool: response tokens of samples that take part in the loss."""
        return self.rollout.response_mask & self.sample_mask[:, None]

    def select(self, index: Tensor) -> ScoredBatch:
        pick = lambda t: None if t is None else t[index]  # noqa: E731
        return replace(
            self,
            rollout=self.rollout.select(index),
            rewards=self.rewards[index],
            advantages=self.advantages[index],
            sample_mask=self.sample_mask[index],
            old_logprobs=pick(self.old_logprobs),
            ref_logprobs=pick(self.ref_logprobs),
            old_token_logits=pick(self.old_token_logits),
            policy_version=pick(self.policy_version),
            metrics={},
        )

    def loss_inputs(self, fwd: PolicyOutput, reduce_sum: Callable[[Tensor], Tensor] | None = None) -> LossInputs:
        """What a loss, correction or filter reads for this batch, given its training forward ``fwd``.

        On-policy (no π_old forward ran) π_old is π_θ detached, and so is π_old's token logit.
        """
        on_policy = self.old_logprobs is None
        return LossInputs(
            logprobs=fwd.logprobs,
            old_logprobs=fwd.logprobs.detach() if on_policy else self.old_logprobs,
            advantages=self.advantages,
            response_mask=self.token_mask,
            rollout_logprobs=self.rollout.rollout_logprobs,
            ref_logprobs=self.ref_logprobs,
            entropy=None if fwd.entropy is None else fwd.entropy.detach(),  # losses read it as a measurement
            token_logits=fwd.token_logits,
            old_token_logits=fwd.token_logits.detach() if on_policy else self.old_token_logits,
            token_ids=self.rollout.completion_ids,
            **({"reduce_sum": reduce_sum} if reduce_sum is not None else {}),
        )

