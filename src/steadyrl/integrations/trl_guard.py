"""steadyrl's stability guard in a TRL run: a TrainerCallback with the trainer in hand, so rollback is possible.

    trainer = SteadyGRPOTrainer(..., guard={"max_rollbacks": 3})      # GuardConfig's keys; logging_steps=1

After every optimizer step TRL logs the step's metrics; ``on_log`` renames them to the names the guard reads
(reward → reward/mean, grad_norm → grad/norm, steadyrl/policy/* → policy/*, steadyrl/mismatch/* → mismatch/*),
lets the guard decide (``StabilityGuard.observe``) and applies its action (``StabilityGuard.apply``): snapshot,
alarm, or rollback with LR and trust-region back-off. The guard is bound, as in steadyrl's trainer, to the
state a rollback restores: the model (a PEFT model's adapters only), the optimizer, the LR scheduler, and an
"updater" holding the token filters' state and the loss's trust-region lever
(``SteadyGRPOTrainer.set_trust_region_scale``). The guard needs every step's metrics, hence
``logging_steps=1``. Not carried: the guard's snapshots are not written into TRL checkpoints, and a rollback
does not discard completions TRL has already buffered for the rest of a generation batch
(steps_per_generation > gradient_accumulation_steps).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from steadyrl.config import ConfigError, GuardConfig
from steadyrl.config_load import from_dict
from steadyrl.models.lora import AdapterState, is_peft_model
from steadyrl.stabilisers.guard import StabilityGuard

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

    def training_state(self) -> dict[str, Any]:
        """What a rollback restores, under the names StabilityGuard.bind expects."""
        t = self.trainer
        model = t.accelerator.unwrap_model(t.model)
        return {"model": AdapterState(model) if is_peft_model(model) else model, "optimizer": t.optimizer,
                "scheduler": t.lr_scheduler, "updater": _UpdaterState(t)}

    def on_train_begin(self, args, state, control, **kwargs):
        self.guard.bind(self.training_state(), start_step=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "grad_norm" not in logs:  # eval and end-of-training rows
            return
        self.guard.apply(self.guard.observe(state.global_step, steadyrl_metrics(logs)))
        logs.update(self.guard.metrics())


class _UpdaterState:
    """The SteadyGRPOTrainer's part of the training state: token-filter state and the trust-region lever."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        return {"token_filters": [f.state_dict() for f in self.trainer.token_filters]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for f, s in zip(self.trainer.token_filters, state.get("token_filters", [])):
            f.load_state_dict(s)

    def set_trust_region_scale(self, scale: float) -> None:
        self.trainer.set_trust_region_scale(scale)
