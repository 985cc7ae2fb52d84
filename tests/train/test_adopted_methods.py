"""Every method of issue 14 (docs/methods/adopted.md) trains the tiny test model for two RL steps with finite
metrics: the registered losses, corrections, advantages and KL estimator, and the trainer switches (entropy
bonus, VCPO, FP32 LM head, fp16). A registry entry documented in adopted.md without a row here fails.

    .venv/bin/python -m pytest -q tests/train/test_adopted_methods.py
"""

from __future__ import annotations

import math

import pytest

from sevens_task import SevensTask
from steadyrl import registry
from steadyrl.report import read_metrics
from steadyrl.train.trainer import Trainer

# registry name (or switch) -> the overrides that train with it; each runs with the sevens task (reward varies)
METHODS: dict[str, list[str]] = {
    "sapo": ["loss=sapo"],
    "gmpo": ["loss=gmpo", "aggregation=seq_mean_token_mean"],
    "luspo": ["loss=luspo", "aggregation=seq_mean_token_sum"],
    "dro": ["loss=dro", "optim.mini_batches=2"],
    "kimi_dppo": ["loss=kimi_dppo", "rollout.sampler_dtype=bfloat16"],
    "dcpo": ["loss=dcpo", "optim.mini_batches=2"],
    "high_entropy": ["correction=high_entropy"],
    "m2po": ["correction=m2po", "rollout.sampler_dtype=bfloat16"],
    "gdpo": ["advantage=gdpo"],
    "maxrl": ["advantage=maxrl"],
    "gpg": ["advantage=gpg", "loss=reinforce"],
    "optimal_token_baseline": ["advantage=optimal_token_baseline"],
    "kl_k3_is": ["kl.coef=0.05", "kl.estimator=kl_k3_is", "optim.mini_batches=2"],
    "entropy_adaptive": ["entropy.adaptive=true", "entropy.target=100.0"],
    "vcpo": ["vcpo.baseline=true", "rollout.sampler_dtype=bfloat16", "optim.mini_batches=2", "rollout.prompts_per_step=4"],
    "vcpo_minibatch": ["vcpo.scope=minibatch", "optim.mini_batches=4"],
    "lm_head_fp32": ["model.lm_head_fp32=true", "model.dtype=bfloat16"],
    "fp16": ["model.autocast=float16", "rollout.sampler_dtype=float16"],
}
SWITCHES = {"entropy_adaptive", "vcpo", "vcpo_minibatch", "lm_head_fp32", "fp16"}


def test_every_adopted_registry_entry_has_a_row():
    documented = {
        entry.name
        for family in registry.METHOD_FAMILIES
        for entry in registry.FAMILIES[family].table.values()
        if entry.doc == "docs/methods/adopted.md"
    }
    assert documented == set(METHODS) - SWITCHES


@pytest.mark.parametrize("name", sorted(METHODS))
def test_the_method_trains_two_steps(name, tiny_config, tmp_path):
    trainer = Trainer(tiny_config(*METHODS[name]), task=SevensTask())
    summary = trainer.train()
    assert summary["steps"] == 2 and summary["skipped_steps"] == 0
    rows = read_metrics(trainer.run_dir)
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        for key, value in row.items():
            if not key.endswith(("_min", "_max")):
                assert math.isfinite(value), f"{name}: {key} = {value}"


def test_steadyrl_methods_lists_them():
    from steadyrl.methods_table import methods_table

    listed = {line.split()[0] for line in methods_table().splitlines() if line.startswith("  ")}
    assert set(METHODS) - {"entropy_adaptive", "vcpo_minibatch", "fp16"} <= listed
    assert {"adaptive_entropy", "vcpo", "lm_head_fp32", "fp16"} <= listed
