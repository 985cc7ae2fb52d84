"""steadyrl's stability guard in a TRL run: a TrainerCallback with the trainer in hand, so rollback is possible.

    trainer = SteadyGRPOTrainer(..., guard={"max_rollbacks": 3})      # GuardConfig's keys; logging_steps=1

After every optimizer step TRL logs the step's metrics; ``on_log`` renames them to the names the guard reads
(reward → reward/mean, grad_norm → grad/norm, steadyrl/policy/* → policy/*, steadyrl/mismatch/* → mismatch/*),
lets the guard decide (``StabilityGuard.observe``) and applies its action to the trainer's model, optimizer,
LR scheduler, token filters and loss (``StabilityGuard.apply``): snapshot, alarm, or rollback with LR and
trust-region back-off. The guard needs every step's metrics, hence ``logging_steps=1``. Not carried: the
guard's snapshots are not written into TRL checkpoints, and a rollback does not discard completions TRL has
already buffered for the rest of a generation batch (steps_per_generation > gradient_accumulation_steps).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from steadyrl.config import ConfigError, GuardConfig, from_dict
from steadyrl.train.guard import StabilityGuard

_RENAMES = {"reward": "reward/mean", "grad_norm": "grad/norm"}


def guard_config(value: GuardConfig | dict[str, Any]) -> GuardConfig:
    """A GuardConfig from the YAML ``guard`` section (checked by steadyrl's config code)."""
    return value if isinstance(value, GuardConfig) else from_dict(GuardConfig, dict(value), "guard")


def steadyrl_metrics(logs: dict[str, float]) -> dict[str, float]:
    """TRL's log row under the names of steadyrl's trainer metrics."""
    out = {_RENAMES[k]: v for k, v in logs.items() if k in _RENAMES}
    out.update({k.removeprefix("steadyrl/"): v for k, v in logs.items() if k.startswith("steadyrl/")})
    return out


class GuardCallback(TrainerCallback):
    def __init__(self, trainer: Any, cfg: GuardConfig | dict[str, Any]) -> None:
        if trainer.args.logging_steps != 1:
            raise ConfigError(
                f"the stability guard reads every optimizer step's metrics; set logging_steps=1 "
                f"(got {trainer.args.logging_steps})."
            )
        self.trainer = trainer
        self.guard = StabilityGuard(guard_config(cfg), log_path=Path(trainer.args.output_dir) / "guard.jsonl")

    def _state(self) -> dict[str, Any]:
        t = self.trainer
        return {"model": t.model, "optimizer": t.optimizer, "scheduler": t.lr_scheduler}

    def on_train_begin(self, args, state, control, **kwargs):
        self.guard.bind(self.trainer, start_step=state.global_step, **self._state())

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "grad_norm" not in logs:  # eval and end-of-training rows
            return
        action = self.guard.observe(state.global_step, steadyrl_metrics(logs))
        self.guard.apply(action, updater=self.trainer, **self._state())
        logs.update(self.guard.metrics())
