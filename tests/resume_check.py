"""One check several tests share: a run stopped after a checkpoint and resumed equals the uninterrupted run."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from sevens_task import SevensTask
from steadyrl.report.sinks import read_metrics
from steadyrl.train.trainer import Trainer


def comparable(rows: list[dict]) -> list[dict]:
    """Metric rows without the timing columns, which no two runs share."""
    return [{k: v for k, v in r.items() if not k.startswith("perf/") and k != "wall_s"} for r in rows]


def assert_resume_is_exact(config_for: Callable[[Path], object], tmp_path: Path, stop_after: int) -> tuple[Trainer, Trainer]:
    """Train ``config_for(out)`` straight through, and again stopped after ``stop_after`` steps and resumed;
    assert equal metric rows and bit-equal parameters; return (straight, resumed) for further checks."""

    def run(out: Path, stop: int | None = None) -> Trainer:
        trainer = Trainer(config_for(out), task=SevensTask())
        trainer.train(stop_after=stop)
        return trainer

    straight = run(tmp_path / "straight")
    run(tmp_path / "resumed", stop_after)
    resumed = run(tmp_path / "resumed")
    assert resumed.start_step == stop_after
    assert comparable(read_metrics(tmp_path / "straight")) == comparable(read_metrics(tmp_path / "resumed"))
    for (name, a), b in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), name
    return straight, resumed
