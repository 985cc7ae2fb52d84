"""What a user must see of a run: each skipped optimizer step, guard rollback and alarm as a line above the
progress bar, a warning summary at the end, and the run's verdict, which decides the export and the exit code.

The verdict applies the stability lab's collapse definition (``report.collapse``) to the run's own metrics, and
adds one rule of its own: a run in which no completion could be scored (the reward returned None / NaN for
every one) trained on nothing, whatever its loss says.
"""

from __future__ import annotations

from typing import Any

from steadyrl.report.collapse import RunCurves, collapse_verdict


class TrainingFailed(RuntimeError):
    """The run cannot go on (e.g. the weights became non-finite without a guard to roll back); the message says
    what happened and what to change."""


class RunWatch:
    def __init__(self) -> None:
        self.warnings: list[str] = []
        self.unscorable_steps = 0
        self.steps = 0
        self._skipped = 0

    def observe(self, step: int, metrics: dict[str, float], guard_action: Any = None) -> list[str]:
        """Lines to print for this step (empty when it was uneventful); each is also kept for the summary."""
        lines = []
        self.steps += 1
        skipped = int(metrics.get("train/skipped_steps", self._skipped))
        if skipped > self._skipped:
            lines.append(
                f"step {step}: skipped {skipped - self._skipped} optimizer step(s) with a non-finite gradient "
                f"({skipped} so far); lower optim.lr or set optim.grad_clip"
            )
            self._skipped = skipped
        if metrics.get("train/nonfinite_weights_max", 0.0) > 0:
            lines.append(f"step {step}: an optimizer step made the weights non-finite")
        if metrics.get("reward/nan_frac", 0.0) >= 1.0:
            self.unscorable_steps += 1
            lines.append(f"step {step}: no completion could be scored (the reward returned None / NaN for all)")
        if guard_action is not None and guard_action.kind in ("rollback", "alarm"):
            what = "rolled back" if guard_action.kind == "rollback" else "alarm (no rollback left)"
            lines.append(f"step {step}: stability guard {what}: {'; '.join(guard_action.reasons)}")
        self.warnings += lines
        return lines

    def verdict(self, rows: list[dict[str, Any]], steps: int) -> dict[str, Any]:
        """{"collapsed": bool, "reasons": [...], "unscorable": bool} for the run's metric rows."""
        verdict = collapse_verdict(RunCurves.from_rows(rows), steps)
        unscorable = self.steps > 0 and self.unscorable_steps == self.steps
        reasons = list(verdict.reasons) + (["every reward was unscorable"] if unscorable else [])
        return {"collapsed": verdict.collapsed, "unscorable": unscorable, "reasons": reasons}

    def state_dict(self) -> dict[str, Any]:
        return {"warnings": list(self.warnings), "unscorable_steps": self.unscorable_steps, "steps": self.steps,
                "skipped": self._skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.warnings = list(state.get("warnings", []))
        self.unscorable_steps = int(state.get("unscorable_steps", 0))
        self.steps = int(state.get("steps", 0))
        self._skipped = int(state.get("skipped", 0))


def print_warnings(summary: dict, exported: bool) -> None:
    warnings, verdict = summary["warnings"], summary["verdict"]
    if warnings:
        shown = warnings[-10:]
        print(f"\nwarnings ({len(warnings)}):" + "".join(f"\n  {w}" for w in shown), flush=True)
    if verdict["collapsed"] or verdict["unscorable"]:
        tail = "" if exported else "; the final model was not exported"
        print(f"the run failed: {'; '.join(verdict['reasons'])}{tail}", flush=True)
