"""The stability guard: watch each RL step's diagnostics; when a collapse looks imminent, roll back and slow down.

    guard = StabilityGuard(cfg.guard, log_path=run_dir / "guard.jsonl")
    guard.bind(trainer.training_state(), start_step=0)   # what a rollback restores; snapshot of the start
    action = guard.observe(step, metrics)                # pure decision from the step's metrics
    guard.apply(action)                                  # snapshot / rollback / alarm

Signals (each fires on its own; thresholds in config.GuardConfig, a threshold of 0 switches a signal off):

    nonfinite     reward/mean, policy/loss, policy/entropy or grad/norm is NaN / ±inf
    skipped       train/skipped_steps went up (the updater dropped a step with a non-finite gradient)
    reward_drop   mean of the last reward_window rewards < best such mean − reward_drop
    grad_spike    grad/norm > grad_spike × median of the last ``window`` healthy grad norms
    entropy       least-squares slope b of policy/entropy over the last ``window`` steps, as a relative change
                  across the window, b·(n − 1) / mean(H), > entropy_rise, or < −entropy_fall while the reward
                  mean is below its best (entropy falling as the reward sets new highs is convergence)
    ess_drop      mismatch/is_ess < ess_drop × its running median
    kl_spike      mismatch/kl_k3 > kl_spike × its running median and > kl_min
    ratio_drift   |mismatch/ratio_mean − 1| > ratio_drift: the sampler/trainer ratio is wrong on average (a biased
                  ratio: truncation, temperature or dtype handled differently on the two sides; `steadyrl doctor`)

A firing step outside the cooldown, with rollbacks left, becomes a **rollback**: the training state is
restored from the oldest kept snapshot (so a collapse that started before the newest snapshot is undone too):
exactly what a checkpoint restores besides the run's progress, i.e. the ``state`` mapping the trainer binds
(model, optimizer, scheduler, and the updater: token-filter and combiner state). The learning rate is then
multiplied by ``lr_factor`` (optimizer param groups and the scheduler's base_lrs, so the schedule keeps it),
and the loss's trust-region widths by ``clip_factor`` through ``updater.set_trust_region_scale`` (which
hyper-parameters are widths is a registry fact of each loss). The scheduler goes back with the weights: the retry replays the schedule from the snapshot
(its warm-up included, which a restored Adam state with few steps needs), so a run with rollbacks ends that
many steps short of the schedule's end. The run's progress is not rewound: the RL step counter (samples drawn are spent), the count of skipped
optimizer steps and the guard's own counters record what happened. The
run's starting state is the first snapshot; healthy steps outside the cooldown take another every
``snapshot_every`` steps.

Why in memory: a snapshot is a CPU copy of the state dicts, taken every few steps. Writing the full
checkpoint that often would cost disk bandwidth and fsyncs on every snapshot, and a rollback would have
to read it back. For the lab's sub-million-parameter models a copy costs milliseconds. The copy holds the
model plus Adam's two moments, about 3x the fp32 weights. For a large model, raise snapshot_every, set
keep_snapshots to 1, or leave the guard off. With ``checkpoint_snapshots`` the snapshots go into the
training checkpoint, so a resumed run rolls back to the same state as an uninterrupted one.

Every rollback, alarm and snapshot is a line of RUN_DIR/guard.jsonl with the signal values that triggered
it; metrics guard/rollbacks, guard/lr_scale, guard/clip_scale, guard/alarm join the step's row.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from steadyrl.config import GuardConfig

NONFINITE_KEYS = ("reward/mean", "policy/loss", "policy/entropy", "grad/norm")


@dataclass(frozen=True)
class GuardAction:
    kind: str
    """none | snapshot | rollback | alarm (a signal fired but no rollback was possible: cooldown over, none left)."""
    step: int
    reasons: tuple[str, ...] = ()
    signals: dict[str, float] = field(default_factory=dict)
    """The values the signals saw at this step (with their thresholds), for the log."""


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    return ordered[n // 2] if n % 2 else 0.5 * (ordered[n // 2 - 1] + ordered[n // 2])


def relative_slope(values: list[float]) -> float:
    """Least-squares slope b of ``values`` against 0..n−1, as a relative change across them: b·(n − 1) / mean.

    E.g. [1, 2, 3] → b = 1, mean 2 → 1·2/2 = 1.0. The mean (not the median) so that a crash to exactly 0
    ([3, 0, 0] → −1.5·2/1 = −3) still measures; 0 when the mean is not positive.
    """
    n = len(values)
    if n < 2:
        return 0.0
    x_mean = (n - 1) / 2
    y_mean = sum(values) / n
    num = sum((i - x_mean) * (y - y_mean) for i, y in enumerate(values))
    den = sum((i - x_mean) ** 2 for i in range(n))
    return (num / den) * (n - 1) / y_mean if y_mean > 0 else 0.0


def _finite(value: Any) -> bool:
    return value is not None and math.isfinite(float(value))


@dataclass
class Snapshot:
    step: int
    state: dict[str, Any]
    """``name -> cpu copy of state_dict()`` of every bound stateful object."""
    best_reward: float
    lr_scale: float


def _cpu_copy(state: Any) -> Any:
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {k: _cpu_copy(v) for k, v in state.items()}
    if isinstance(state, list | tuple):
        return type(state)(_cpu_copy(v) for v in state)
    return copy.deepcopy(state)


def scale_learning_rate(optimizer: torch.optim.Optimizer, scheduler: Any, factor: float) -> None:
    """Multiply the live LR of every param group and the scheduler's base_lrs, so the schedule keeps the cut."""
    for group in optimizer.param_groups:
        group["lr"] *= factor
        if "initial_lr" in group:
            group["initial_lr"] *= factor
    if scheduler is not None and hasattr(scheduler, "base_lrs"):
        scheduler.base_lrs = [lr * factor for lr in scheduler.base_lrs]
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


class StabilityGuard:
    def __init__(self, cfg: GuardConfig, *, log_path: str | Path | None = None) -> None:
        self.cfg = cfg
        self.log_path = Path(log_path) if log_path is not None else None
        self.rollbacks = 0
        self.alarms = 0
        self.lr_scale = 1.0
        self.clip_scale = 1.0
        self.cooldown_until = 0
        self.healthy_since_snapshot = 0
        self.skipped_seen = 0
        self.best_reward = -math.inf
        self.rewards: list[float] = []
        self.history: dict[str, list[float]] = {"grad": [], "entropy": [], "ess": [], "kl": []}
        self.snapshots: list[Snapshot] = []
        self.state: Mapping[str, Any] = {}

    # ------------------------------------------------------------------ decision

    def signals(self, metrics: dict[str, float]) -> tuple[list[str], dict[str, float]]:
        """Which signals fire on this step's metrics, against the history so far (which is not updated)."""
        c, h = self.cfg, self.history
        fired: list[str] = []
        seen: dict[str, float] = {}
        for key in NONFINITE_KEYS:
            if key in metrics and not _finite(metrics[key]):
                fired.append(f"nonfinite {key}")
        if metrics.get("train/nonfinite_weights_max", 0.0) > 0:
            fired.append("nonfinite weights after an optimizer step")
        skipped = metrics.get("train/skipped_steps")
        if _finite(skipped) and skipped > self.skipped_seen:
            fired.append(f"skipped steps {int(self.skipped_seen)} -> {int(skipped)}")
        reward = metrics.get("reward/mean")
        reward_mean = None
        if _finite(reward) and len(self.rewards) >= c.reward_window - 1:
            window = [*self.rewards[len(self.rewards) - c.reward_window + 1 :], float(reward)]
            reward_mean = sum(window) / len(window)
            seen.update({"reward_mean": reward_mean, "reward_best": self.best_reward})
            if c.reward_drop > 0 and reward_mean < self.best_reward - c.reward_drop:
                fired.append(f"reward_drop {reward_mean:.3f} < best {self.best_reward:.3f} - {c.reward_drop}")
        grad = metrics.get("grad/norm")
        if c.grad_spike > 0 and _finite(grad) and len(h["grad"]) >= c.min_history:
            median = _median(h["grad"][-c.window :])
            seen.update({"grad_norm": float(grad), "grad_median": median})
            if median > 0 and grad > c.grad_spike * median:
                fired.append(f"grad_spike {grad:.3g} > {c.grad_spike} x median {median:.3g}")
        entropy = metrics.get("policy/entropy")
        if (c.entropy_rise > 0 or c.entropy_fall > 0) and _finite(entropy) and len(h["entropy"]) >= c.window - 1:
            change = relative_slope([*h["entropy"][len(h["entropy"]) - c.window + 1 :], float(entropy)])
            seen["entropy_rel_change"] = change
            if c.entropy_rise > 0 and change > c.entropy_rise:
                fired.append(f"entropy rising {change:+.2f} over {c.window} steps > {c.entropy_rise}")
            improving = reward_mean is not None and reward_mean >= self.best_reward
            if c.entropy_fall > 0 and change < -c.entropy_fall and not improving:
                fired.append(f"entropy falling {change:+.2f} over {c.window} steps < -{c.entropy_fall}")
        ess = metrics.get("mismatch/is_ess")
        if c.ess_drop > 0 and _finite(ess) and len(h["ess"]) >= c.min_history:
            median = _median(h["ess"][-c.window :])
            seen.update({"is_ess": float(ess), "is_ess_median": median})
            if ess < c.ess_drop * median:
                fired.append(f"ess_drop {ess:.3f} < {c.ess_drop} x median {median:.3f}")
        ratio = metrics.get("mismatch/ratio_mean")
        if c.ratio_drift > 0 and _finite(ratio) and abs(ratio - 1.0) > c.ratio_drift:
            seen["ratio_mean"] = float(ratio)
            fired.append(f"ratio_drift mean π/μ {ratio:.3f} is {abs(ratio - 1.0):.3f} from 1 > {c.ratio_drift}")
        kl = metrics.get("mismatch/kl_k3")
        if c.kl_spike > 0 and _finite(kl) and len(h["kl"]) >= c.min_history:
            median = _median(h["kl"][-c.window :])
            seen.update({"kl_k3": float(kl), "kl_k3_median": median})
            if kl > max(c.kl_spike * median, c.kl_min):
                fired.append(f"kl_spike {kl:.3g} > max({c.kl_spike} x median {median:.3g}, {c.kl_min})")
        return fired, seen

    def observe(self, step: int, metrics: dict[str, float]) -> GuardAction:
        """Decide what to do after RL step ``step``; updates the guard's history, touches no model."""
        c = self.cfg
        fired, seen = self.signals(metrics)
        skipped = metrics.get("train/skipped_steps")
        if _finite(skipped):
            self.skipped_seen = max(self.skipped_seen, float(skipped))
        urgent = any(r.startswith(("nonfinite", "skipped")) for r in fired)
        cooling = step < self.cooldown_until
        if fired and (urgent or not cooling):
            if self.rollbacks < c.max_rollbacks and self.snapshots:
                return GuardAction("rollback", step, tuple(fired), seen)
            self.alarms += 1
            self._record(step, metrics)
            return GuardAction("alarm", step, tuple(fired), seen)
        self._record(step, metrics)
        if not fired and not cooling:
            self.healthy_since_snapshot += 1
            if not self.snapshots or self.healthy_since_snapshot >= c.snapshot_every:
                return GuardAction("snapshot", step, (), seen)
        return GuardAction("none", step, tuple(fired), seen)

    def _record(self, step: int, metrics: dict[str, float]) -> None:
        """Append a step's values to the history (windows of the running medians / slope / best reward)."""
        c = self.cfg
        for name, key in (("grad", "grad/norm"), ("entropy", "policy/entropy"), ("ess", "mismatch/is_ess"), ("kl", "mismatch/kl_k3")):
            if _finite(metrics.get(key)):
                self.history[name] = [*self.history[name], float(metrics[key])][-max(c.window, 1) :]
        reward = metrics.get("reward/mean")
        if _finite(reward):
            self.rewards = [*self.rewards, float(reward)][-max(c.reward_window, 1) :]
            if len(self.rewards) >= c.reward_window:
                self.best_reward = max(self.best_reward, sum(self.rewards) / len(self.rewards))

    # ------------------------------------------------------------------ effect

    def bind(self, state: Mapping[str, Any], *, start_step: int = 0, snapshot: bool = True) -> None:
        """Attach to a run before its first step.

        ``state``: name -> object with ``state_dict()`` / ``load_state_dict()``, everything a rollback restores;
        it must hold "optimizer" and "scheduler" (the LR lever) and "updater" (``set_trust_region_scale``, the
        trust-region lever). Re-applies a restored clip_scale, drops guard.jsonl lines after ``start_step``
        (all of them on a fresh run) and snapshots the state the run starts from.

        That first snapshot matters: a snapshot taken after step s holds step s's update, whose effect the
        metrics only show from step s + 1 on, so the newest snapshot may already hold the damage.
        """
        if self.log_path is not None and self.log_path.is_file():
            kept = [line for line in self.log_path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and start_step > 0 and json.loads(line).get("step", 0) <= start_step]
            self.log_path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        self.state = state
        if "updater" in state:
            state["updater"].set_trust_region_scale(self.clip_scale)
        if snapshot and not self.snapshots:
            self.apply(GuardAction("snapshot", start_step))

    def apply(self, action: GuardAction) -> None:
        if action.kind == "snapshot":
            self.snapshots.append(self._take(action.step))
            self.snapshots = self.snapshots[-max(self.cfg.keep_snapshots, 1) :]
            self.healthy_since_snapshot = 0
            self._log({"event": "snapshot", "step": action.step})
        elif action.kind == "rollback":
            self._rollback(action)
        elif action.kind == "alarm":
            self._log({"event": "alarm", "step": action.step, "reasons": list(action.reasons), "signals": action.signals,
                       "why_no_rollback": "no snapshot yet" if not self.snapshots else "max_rollbacks reached"})

    def _take(self, step: int) -> Snapshot:
        state = {name: _cpu_copy(obj.state_dict()) for name, obj in self.state.items()}
        return Snapshot(step=step, state=state, best_reward=self.best_reward, lr_scale=self.lr_scale)

    def _rollback(self, action: GuardAction) -> None:
        c = self.cfg
        target = self.snapshots[0]
        for name, obj in self.state.items():
            obj.load_state_dict(target.state[name])
        optimizer, scheduler = self.state["optimizer"], self.state.get("scheduler")
        self.lr_scale *= c.lr_factor
        # the restored LRs carry the scale of the snapshot's time; bring them to the new one
        scale_learning_rate(optimizer, scheduler, self.lr_scale / target.lr_scale)
        if c.clip_factor != 1.0:
            self.clip_scale *= c.clip_factor
            if "updater" in self.state:
                self.state["updater"].set_trust_region_scale(self.clip_scale)
        self.rollbacks += 1
        self.snapshots = [target]
        self.best_reward = target.best_reward
        self.rewards = []
        self.history = {name: [] for name in self.history}
        self.cooldown_until = action.step + c.cooldown + 1
        # the first healthy step after the cooldown snapshots the retry, so a later rollback need not go this far back
        self.healthy_since_snapshot = max(c.snapshot_every - 1, 0)
        self._log(
            {
                "event": "rollback",
                "step": action.step,
                "restored_step": target.step,
                "reasons": list(action.reasons),
                "signals": action.signals,
                "rollbacks": self.rollbacks,
                "lr_scale": self.lr_scale,
                "clip_scale": self.clip_scale,
                "lr": optimizer.param_groups[0]["lr"],
            }
        )

    def metrics(self) -> dict[str, float]:
        return {
            "guard/rollbacks": float(self.rollbacks),
            "guard/alarms": float(self.alarms),
            "guard/lr_scale": self.lr_scale,
            "guard/clip_scale": self.clip_scale,
        }

    def _log(self, event: dict[str, Any]) -> None:
        if self.log_path is None:
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(event, default=float) + "\n")

    # ------------------------------------------------------------------ checkpoint

    _COUNTERS = ("rollbacks", "alarms", "lr_scale", "clip_scale", "cooldown_until", "healthy_since_snapshot",
                 "skipped_seen", "best_reward", "rewards", "history")

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {name: copy.deepcopy(getattr(self, name)) for name in self._COUNTERS}
        if self.cfg.checkpoint_snapshots:
            state["snapshots"] = [vars(s).copy() for s in self.snapshots]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in self._COUNTERS:
            if name in state:
                setattr(self, name, copy.deepcopy(state[name]))
        self.snapshots = [Snapshot(**_current_layout(s)) for s in state.get("snapshots", [])]


def _current_layout(snapshot: dict[str, Any]) -> dict[str, Any]:
    """A snapshot saved by steadyrl 0.1 (one field per object) in today's layout (one state mapping)."""
    if "state" in snapshot:
        return snapshot
    state = {"model": snapshot["model"], "optimizer": snapshot["optimizer"], "scheduler": snapshot["scheduler"],
             "updater": {"token_filters": snapshot.get("token_filters", []), "combiner": {}}}
    return {"step": snapshot["step"], "state": state, "best_reward": snapshot["best_reward"],
            "lr_scale": snapshot["lr_scale"]}
