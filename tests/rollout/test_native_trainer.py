"""The trainer runs with rollout.backend=native (CPU, seconds).

Run: .venv/bin/python -m pytest -q tests/rollout/test_native_trainer.py
"""

from __future__ import annotations

import math

import pytest
import torch

from sevens_task import SevensTask
from steadyrl.report import read_metrics
from steadyrl.rollout import NativeRolloutBackend
from steadyrl.train.trainer import Trainer


@pytest.mark.parametrize("sampler_dtype", [None, "bfloat16"])
def test_trainer_trains_with_the_native_backend(tiny_config, sampler_dtype):
    overrides = ["rollout.backend=native"] + ([f"rollout.sampler_dtype={sampler_dtype}"] if sampler_dtype else [])
    cfg = tiny_config(*overrides)
    trainer = Trainer(cfg, task=SevensTask())
    assert isinstance(trainer.backend, NativeRolloutBackend) and trainer.backend.fused
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert any(not torch.equal(before[n], p.detach()) for n, p in trainer.model.named_parameters())
    rows = read_metrics(cfg.run.output_dir)
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert all(math.isfinite(v) for k, v in row.items() if not k.endswith(("_min", "_max")))
    if sampler_dtype:  # a separate bf16 sampler, refreshed by the trainer before every rollout
        assert trainer.backend.separate_sampler
        assert next(trainer.backend.sampler.parameters()).dtype == torch.bfloat16
