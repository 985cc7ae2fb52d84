"""A rollout batch after scoring: rewards, advantages and the extra log-probs the update needs."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from torch import Tensor

from steadyrl.types import Metrics, RolloutBatch


@dataclass
class ScoredBatch:
    rollout: RolloutBatch
    rewards: Tensor  # (B,) float, NaN where the reward function returned nothing
    advantages: Tensor  # (B, T) detached
    sample_mask: Tensor  # (B,) bool, False = left out of the loss
    old_logprobs: Tensor | None = None  # (B, T) π_old, only when the batch is used for > 1 optimizer step
    ref_logprobs: Tensor | None = None  # (B, T) π_ref, only with a KL penalty
    old_token_logits: Tensor | None = None  # (B, T) π_old's raw logit of y_t (LCO-MSE/LCH off-policy)
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
            metrics={},
        )
