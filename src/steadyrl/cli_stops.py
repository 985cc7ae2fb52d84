"""How a command ended, in the one line a person reads: where an interrupted run stopped and how to resume it,
and which errors are the user's to fix (printed without a traceback) rather than bugs."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from steadyrl.config import ConfigError


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _resume_point(run_dir: str | Path) -> int | None:
    """The step the latest complete checkpoint in ``run_dir`` holds (what a rerun resumes from), else None."""
    from steadyrl.runtime.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        return None
    try:
        return int(json.loads((ckpt / "meta.json").read_text())["step"])
    except (OSError, ValueError, KeyError):
        return None


def _step_in_flight(args: argparse.Namespace) -> int | None:
    """The step a run was in when it stopped: one past ``trainer.last_completed_step`` when the trainer has that
    attribute, else one past the last step in RUN_DIR/metrics.jsonl (each finished step is a row there)."""
    trainer = getattr(args, "trainer", None)
    if trainer is None:
        return None  # stopped while setting up: no step had started
    done = getattr(trainer, "last_completed_step", None)
    if done is None:
        from steadyrl.report.sinks import read_metrics

        try:
            done = max((int(row["step"]) for row in read_metrics(args.cfg.run.output_dir)), default=0)
        except (OSError, ValueError):
            return None
    return int(done) + 1


def _how_to_resume(args: argparse.Namespace) -> str:
    """"rerun the same command to resume from step N", or what a rerun does instead."""
    cfg = getattr(args, "cfg", None)
    if getattr(args, "starts_over", False):
        return "rerun the same command to start again"
    resumed = _resume_point(cfg.run.output_dir) if cfg is not None else None
    if resumed is None:
        return "rerun the same command to start again (no checkpoint was saved yet)"
    if not cfg.run.resume:
        return f"rerun with run.resume=true to resume from step {resumed}"
    return f"rerun the same command to resume from step {resumed}"


def interrupted(args: argparse.Namespace) -> str:
    step = _step_in_flight(args)
    where = f"at step {step}" if step is not None else "before training started"
    return f"interrupted {where}; {_how_to_resume(args)}"


def one_line(args: argparse.Namespace, exc: Exception) -> str | None:
    """The one-line message for an error a person can act on, else None (a bug: the traceback is kept)."""
    if isinstance(exc, ConfigError):  # tested first: user_errors() imports transformers, seconds a typo need not wait
        return str(exc)
    if isinstance(exc, user_errors()):
        return str(exc)
    from steadyrl.runtime.paths import disk_full_message

    cfg = getattr(args, "cfg", None)
    full = disk_full_message(exc, cfg.run.output_dir if cfg is not None else Path.cwd())
    if full is not None:
        return f"{full}; free some space or choose a run.output_dir on a disk with room, then {_how_to_resume(args)}"
    return None


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors a person fixes by changing their input: printed as one line, without a traceback."""
    from steadyrl.models import ModelLoadError
    from steadyrl.tasks import RewardError, TaskError
    from steadyrl.train.watch import TrainingFailed

    return (ConfigError, ModelLoadError, TaskError, RewardError, FileNotFoundError, TrainingFailed)
