"""Run directories: steadyrl writes, resumes and clears only directories it created, and only its own files.

A run directory that steadyrl created holds a marker file (``.steadyrl-run``). Everything here follows three
rules:

* a directory with files steadyrl did not write is never written into, resumed or cleared: the user is told
  to choose another directory, and nothing is touched;
* a run is resumed only when its saved config matches the new one, apart from the settings that may change
  on resume (``RESUMABLE``); otherwise the user is told what differs;
* clearing a run (``steadyrl quickstart`` starts fresh each time) removes only the entries steadyrl writes.

A directory written by steadyrl 0.1 (before the marker) is recognised by holding only steadyrl's entries, and
adopted.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from steadyrl._io import atomic_write_text
from steadyrl.config import ConfigError

MARKER = ".steadyrl-run"
OWN_ENTRIES = frozenset(
    {MARKER, "config.yaml", "metrics.jsonl", "checkpoints", "final", "final-adapter", "report", "tb", "guard.jsonl",
     "summary.json", "samples.jsonl", "wandb", "doctor.json"}
)
"""Every entry steadyrl writes at the top of a run directory."""

RESUMABLE = ("optim.steps", "eval.", "logging.", "checkpoint.", "run.resume", "run.device", "run.output_dir")
"""Settings that may differ between a run and its resumption (prefixes end with a dot)."""


@dataclass(frozen=True)
class RunDir:
    path: Path
    kind: str
    """absent | empty | steadyrl | legacy (a steadyrl 0.1 run, no marker) | foreign"""
    foreign: tuple[str, ...] = ()
    """Entries steadyrl does not write."""

    @property
    def holds_run(self) -> bool:
        return self.kind in ("steadyrl", "legacy") and (self.path / "config.yaml").is_file()


def inspect(path: str | Path) -> RunDir:
    path = Path(path)
    if not path.exists():
        return RunDir(path, "absent")
    if not path.is_dir():
        raise ConfigError(f"run.output_dir {path} is a file; choose a directory path (nothing was changed).")
    names = sorted(p.name for p in path.iterdir())
    foreign = tuple(n for n in names if n not in OWN_ENTRIES)
    if not names:
        return RunDir(path, "empty")
    if (path / MARKER).is_file():
        return RunDir(path, "steadyrl", foreign)
    if not foreign:  # only entries steadyrl writes: a run from before the marker, or an attempt cut short
        return RunDir(path, "legacy")
    return RunDir(path, "foreign", foreign)


def claim(path: str | Path) -> None:
    """Create the directory if needed and mark it as a steadyrl run directory."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if not (path / MARKER).is_file():
        atomic_write_text(path / MARKER, json.dumps({"created_by": "steadyrl"}) + "\n")


def refuse_foreign(run: RunDir, what: str = "run.output_dir") -> None:
    if run.kind == "foreign":
        shown = ", ".join(run.foreign[:3]) + (" ..." if len(run.foreign) > 3 else "")
        raise ConfigError(
            f"{what} {run.path} holds files steadyrl did not write ({shown}); choose a new or empty directory "
            "(nothing was changed)."
        )


def config_differences(saved: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: old → new`` for every setting that differs, apart from the resumable ones."""
    flat_saved, flat_new = _flatten(saved), _flatten(new)
    out = []
    for key in sorted(set(flat_saved) | set(flat_new)):
        if key in RESUMABLE or key.startswith(tuple(p for p in RESUMABLE if p.endswith("."))):
            continue
        a, b = flat_saved.get(key, "(unset)"), flat_new.get(key, "(unset)")
        if a != b:
            out.append(f"{key}: {a!r} → {b!r}")
    return out


def check_resume_matches(run: RunDir, new_config: dict[str, Any]) -> None:
    """Refuse to continue a run in ``run`` with a config that is not the run's own."""
    if not run.holds_run:
        return
    saved = yaml.safe_load((run.path / "config.yaml").read_text()) or {}
    diff = config_differences(saved, new_config)
    if diff:
        shown = "; ".join(diff[:3]) + (f"; and {len(diff) - 3} more" if len(diff) > 3 else "")
        raise ConfigError(
            f"run.output_dir {run.path} holds a run with another config ({shown}); resume it with its own config "
            "(only optim.steps and the eval, logging and checkpoint settings may change), or choose a new "
            "run.output_dir (nothing was changed)."
        )


def clear_own(path: str | Path) -> list[str]:
    """Remove the entries steadyrl writes from a steadyrl run directory; anything else stays. Returns what was
    removed. Refuses a directory that steadyrl did not create."""
    run = inspect(path)
    if run.kind in ("absent", "empty"):
        return []
    if run.kind == "foreign":
        refuse_foreign(run)
    removed = []
    for name in sorted(OWN_ENTRIES - {MARKER}):
        entry = run.path / name
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        elif entry.exists() or entry.is_symlink():
            entry.unlink()
        else:
            continue
        removed.append(name)
    return removed


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and "name" not in v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
