"""The trainer runs with rollout.backend=native (CPU, seconds).

Run: .venv/bin/python -m pytest -q tests/rollout/test_native_trainer.py
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from steadyrl.config import load_config
from steadyrl.models import build_char_tokenizer, build_tiny_model, tiny_model_config
from steadyrl.models.tokenizer import ARITHMETIC_ALPHABET
from steadyrl.report import read_metrics
from steadyrl.rollout import NativeRolloutBackend
from steadyrl.tasks import Prompt
from steadyrl.train.checkpoint import save_pretrained_atomic
from steadyrl.train.trainer import Trainer


class _SevensTask:
    """Reward = share of '7' characters: a random policy already has reward variance."""

    name = "sevens"

    def sample(self, split: str, n: int, seed: int) -> list[Prompt]:
        rng = random.Random(seed * 2 + (split == "eval"))
        return [
            Prompt(id=f"{split}-{seed}-{i}", text=f"{rng.randint(0, 99)}+{rng.randint(0, 99)}=", answer="7")
            for i in range(n)
        ]

    def eval_prompts(self) -> list[Prompt]:
        return self.sample("eval", 8, 0)

    def reward(self, prompt: Prompt, completion: str) -> float:
        return completion.count("7") / max(1, len(completion))

    def demonstration(self, prompt: Prompt, rng: random.Random) -> str:
        return "777"


@pytest.mark.parametrize("sampler_dtype", [None, "bfloat16"])
def test_trainer_trains_with_the_native_backend(tmp_path, sampler_dtype):
    tokenizer = build_char_tokenizer(ARITHMETIC_ALPHABET)
    cfg = tiny_model_config("qwen2", vocab_size=len(tokenizer), hidden_size=32, num_layers=2, num_heads=2)
    save_pretrained_atomic(build_tiny_model(cfg, seed=0), tokenizer, tmp_path / "model")
    overrides = [
        f"model.name_or_path={tmp_path / 'model'}",
        "rollout.backend=native",
        "rollout.prompts_per_step=4",
        "rollout.group_size=4",
        "rollout.max_new_tokens=4",
        "optim.steps=2",
        "optim.lr=1e-2",
        "optim.micro_batch_size=8",
        "eval.every=0",
        "logging.progress=false",
        "logging.report=false",
        "logging.tensorboard=false",
        "checkpoint.save_final_model=false",
        f"run.output_dir={tmp_path / 'run'}",
        "run.device=cpu",
    ]
    if sampler_dtype:
        overrides.append(f"rollout.sampler_dtype={sampler_dtype}")
    trainer = Trainer(load_config(None, overrides), task=_SevensTask())
    assert isinstance(trainer.backend, NativeRolloutBackend) and trainer.backend.fused
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert any(not torch.equal(before[n], p.detach()) for n, p in trainer.model.named_parameters())
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert all(math.isfinite(v) for k, v in row.items() if not k.endswith(("_min", "_max")))
    if sampler_dtype:  # a separate bf16 sampler, refreshed by the trainer before every rollout
        assert trainer.backend.separate_sampler
        assert next(trainer.backend.sampler.parameters()).dtype == torch.bfloat16
