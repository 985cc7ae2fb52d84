"""Call TRL's and verl's own loss / advantage code on given tensors (the parity tests' harness).

TRL computes its GRPO loss inside ``GRPOTrainer._compute_loss(self, model, inputs)``, whose only model call
is ``self._get_per_token_logps_and_entropies``.  ``trl_grpo_loss`` runs that real method unchanged on a
stand-in ``self`` that returns the given log-probs and entropies instead of running a model, and carries
the attributes the method reads (one process, no gradient accumulation).  Nothing of TRL's arithmetic is
replaced.  verl's functions are plain functions: ``verl_actor_config`` builds the config they read.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import torch
from torch import Tensor


class _OneProcess:
    """The accelerator calls ``_compute_loss`` makes, for a single process."""

    num_processes = 1
    sync_gradients = True

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x

    def pad_across_processes(self, x, dim=0, pad_index=0):
        return x


def trl_grpo_loss(
    *,
    loss_type: str,
    logprobs: Tensor,  # (B, T) with grad
    old_logprobs: Tensor,  # (B, T)
    advantages: Tensor,  # (B,) or (B, T)
    mask: Tensor,  # (B, T) bool
    entropies: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    beta: float = 0.0,
    use_bias_correction_kl: bool = True,
    importance_sampling_level: str = "token",
    top_entropy_quantile: float = 1.0,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    delta: float | None = None,
) -> Tensor:
    """TRL 1.16 ``GRPOTrainer._compute_loss`` on these tensors: the scalar it back-propagates."""
    from trl import GRPOTrainer

    batch, length = mask.shape
    ents = entropies if entropies is not None else torch.zeros_like(logprobs.detach())
    stand_in = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logprobs, ents, None),
        aux_loss_enabled=False,
        top_entropy_quantile=top_entropy_quantile,
        off_policy_mask_threshold=None,
        importance_sampling_level=importance_sampling_level,
        beta=beta,
        loss_type=loss_type,
        epsilon_low=epsilon_low,
        epsilon_high=epsilon_high,
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        max_completion_length=length,
        _entropy_bonus_enabled=False,
        use_adaptive_entropy=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        accelerator=_OneProcess(),
        args=SimpleNamespace(
            use_bias_correction_kl=use_bias_correction_kl,
            delta=delta,
            sapo_temperature_pos=sapo_temperature_pos,
            sapo_temperature_neg=sapo_temperature_neg,
            steps_per_generation=1,
        ),
    )
    stand_in.get_high_entropy_mask = GRPOTrainer.get_high_entropy_mask.__get__(stand_in)
    inputs = {
        "prompt_ids": torch.zeros(batch, 1, dtype=torch.long),
        "prompt_mask": torch.ones(batch, 1, dtype=torch.long),
        "completion_ids": torch.zeros(batch, length, dtype=torch.long),
        "completion_mask": mask.long(),
        "advantages": advantages,
        "old_per_token_logps": old_logprobs,
        "num_items_in_batch": mask.sum().to(logprobs.dtype),
    }
    if ref_logprobs is not None:
        inputs["ref_per_token_logps"] = ref_logprobs
    return GRPOTrainer._compute_loss(stand_in, None, inputs)


def verl_actor_config(**kwargs):
    """A verl ``ActorConfig`` as the policy-loss functions read it (single process)."""
    from verl.workers.config.actor import ActorConfig, PolicyLossConfig

    policy_loss = kwargs.pop("policy_loss", None)
    return ActorConfig(
        strategy="fsdp",
        rollout_n=1,
        ppo_mini_batch_size=1,
        ppo_micro_batch_size_per_gpu=1,
        policy_loss=policy_loss if policy_loss is not None else PolicyLossConfig(),
        **kwargs,
    )


class TRLEntropyController:
    """TRL 1.16's entropy bonus and adaptive controller, run by the real ``GRPOTrainer._compute_loss`` on a
    stand-in that keeps its state across calls (``entropy_coef``, ``_last_world_entropy``, the window).

    ``loss(logprobs, entropies, mask, advantages, accumulation, last)`` is one micro-batch of an accumulation
    window of ``accumulation`` micro-batches (``last``: the window's final one, where TRL adapts the coefficient).
    """

    def __init__(self, *, coef: float, adaptive: bool, target: float, delta: float, coef_min: float, coef_max: float):
        accelerator = _OneProcess()
        self.stand_in = SimpleNamespace(
            aux_loss_enabled=False,
            top_entropy_quantile=1.0,
            off_policy_mask_threshold=None,
            importance_sampling_level="token",
            beta=0.0,
            loss_type="bnpo",
            epsilon_low=0.2,
            epsilon_high=0.2,
            use_vllm=False,
            vllm_importance_sampling_correction=False,
            model=SimpleNamespace(training=True),
            current_gradient_accumulation_steps=1,
            max_completion_length=1,
            entropy_coef=coef,
            use_adaptive_entropy=adaptive,
            _entropy_bonus_enabled=coef != 0.0 or adaptive,
            _last_world_entropy=float("inf"),
            _entropy_window_stats=None,
            _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
            accelerator=accelerator,
            args=SimpleNamespace(
                use_bias_correction_kl=True, delta=None, steps_per_generation=1, entropy_target=target,
                entropy_coef_delta=delta, entropy_coef_min=coef_min, entropy_coef_max=coef_max,
            ),
        )

    def loss(self, logprobs: Tensor, entropies: Tensor, mask: Tensor, advantages: Tensor, *, accumulation: int, last: bool) -> Tensor:
        from trl import GRPOTrainer

        s = self.stand_in
        s._get_per_token_logps_and_entropies = lambda *a, **k: (logprobs, entropies, None)
        s.current_gradient_accumulation_steps = accumulation
        s.max_completion_length = mask.shape[1]
        s.accelerator.sync_gradients = last
        batch = mask.shape[0]
        inputs = {
            "prompt_ids": torch.zeros(batch, 1, dtype=torch.long),
            "prompt_mask": torch.ones(batch, 1, dtype=torch.long),
            "completion_ids": torch.zeros_like(mask, dtype=torch.long),
            "completion_mask": mask.long(),
            "advantages": advantages,
            "old_per_token_logps": logprobs.detach(),
            "num_items_in_batch": mask.sum().to(logprobs.dtype),
        }
        return GRPOTrainer._compute_loss(s, None, inputs)
