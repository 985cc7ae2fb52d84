"""End-to-end runs of the trainer on a tiny random model (CPU, seconds each)."""

from __future__ import annotations

import math

import pytest
import torch

from resume_check import assert_resume_is_exact
from sevens_task import SevensTask
from steadyrl.report import read_metrics
from steadyrl.train.trainer import Trainer


def _finite_rows(run_dir):
    rows = read_metrics(run_dir)
    assert rows, "no metrics were logged"
    for row in rows:
        for key, value in row.items():
            if key.endswith("_min") or key.endswith("_max"):
                continue  # empty-set identities (±inf) are legitimate for extremes
            assert math.isfinite(value), f"step {row['step']}: {key} = {value}"
    return rows


def test_every_parameter_changes_and_metrics_are_finite(tiny_config):
    cfg = tiny_config("optim.steps=3")
    trainer = Trainer(cfg, task=SevensTask())
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    summary = trainer.train()
    for name, param in trainer.model.named_parameters():
        assert not torch.equal(before[name], param.detach()), f"{name} did not change"
    rows = _finite_rows(cfg.run.output_dir)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("reward/mean", "policy/entropy", "grad/norm", "ratio/clip_frac_high", "adv/zero_std_frac"):
        assert key in rows[-1]
    assert summary["steps"] == 3 and summary["skipped_steps"] == 0


@pytest.mark.parametrize(
    "overrides",
    [
        ("optim.mini_batches=2", "optim.epochs=2", "loss.name=reinforce_is", "aggregation.name=seq_mean_token_sum"),
        ("kl.coef=0.1", "correction.name=token_tis", "aggregation.name=seq_mean_token_mean"),
        ("advantage.name=dr_grpo", "loss.name=cispo", "aggregation.name=constant_norm", "rollout.sampler_dtype=bfloat16"),
        ("loss.name=gspo", "kl.coef=0.05", "kl.reference=old", "optim.mini_batches=2"),
        ("loss.name=lco_kld",),
        ("loss.name=lco_mse", "loss.beta=0.5", "optim.mini_batches=2"),
        ("loss.name=lco_lch", "loss.target=ratio", "optim.epochs=2"),
    ],
)
def test_method_combinations_train_with_finite_metrics(tiny_config, overrides):
    cfg = tiny_config(*overrides)
    Trainer(cfg, task=SevensTask()).train()
    rows = _finite_rows(cfg.run.output_dir)
    if "kl.coef=0.1" in overrides:
        assert "kl/ref_k3" in rows[-1] and "mismatch/is_ess" in rows[-1]


@pytest.mark.parametrize(
    "extra",
    [(), ("token_filters=[{name: capo, fisher_tau: 10.0, hessian_tau: 10.0, optimizer_model: adam}]",)],
    ids=["grpo", "capo"],  # CAPO's optimizer-model moments must survive the checkpoint too
)
def test_resume_is_exact(tiny_config, tmp_path, extra):
    def config_for(out):
        return tiny_config("optim.steps=6", "checkpoint.every=3", f"run.output_dir={out}", "eval.every=3", *extra)

    assert_resume_is_exact(config_for, tmp_path, stop_after=3)


def test_rows_of_an_attempt_without_checkpoint_are_replaced(tiny_config, tmp_path):
    # An earlier attempt crashed before its first checkpoint: its rows must not mix with the new run's.
    out = tmp_path / "crashed"
    out.mkdir()
    (out / "metrics.jsonl").write_text("".join(f'{{"step": {s}, "reward/mean": 9.0}}\n' for s in range(5)))
    Trainer(tiny_config(f"run.output_dir={out}"), task=SevensTask()).train()
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["reward/mean"] != 9.0 for r in rows)
