"""The preflight for biased importance ratios: at equal weights π_old/μ must be 1, and the check names the cause.

    .venv/bin/python -m pytest -q tests/train/test_doctor.py
"""

from __future__ import annotations

import pytest

from steadyrl.cli import main
from steadyrl.config import GuardConfig
from steadyrl.config_load import load_config
from steadyrl.report import read_metrics
from steadyrl.stabilisers.guard import StabilityGuard
from steadyrl.train.doctor import check_ratios
from steadyrl.train.trainer import Trainer

BASE = ["model.name_or_path=embedded:tiny-adder", "rollout.prompts_per_step=8", "rollout.group_size=4",
        "eval.every=0", "logging.progress=false", "logging.report=false", "logging.tensorboard=false", "run.device=cpu"]


def _trainer(tmp_path, *overrides):
    return Trainer(load_config(None, [*BASE, f"run.output_dir={tmp_path / 'run'}", *overrides]))


def test_top_p_in_the_sampler_only_is_caught_and_named(tmp_path):
    report = check_ratios(_trainer(tmp_path, "rollout.top_p=0.8"))
    assert not report.ok and report.ratio_mean < 0.999  # E_μ[π/μ] = π's mass inside the nucleus < 1
    assert len(report.causes) == 1 and "set rollout.trainer_truncation=true" in report.causes[0]


def test_replaying_the_truncation_makes_the_step_zero_ratio_one(tmp_path):
    trainer = _trainer(tmp_path, "rollout.top_p=0.8", "rollout.trainer_truncation=true", "optim.steps=1")
    report = check_ratios(trainer)
    assert report.ok and report.abs_log_ratio_max < 1e-5 and report.ratio_mean == pytest.approx(1.0, abs=1e-6)
    trainer.train()
    (row,) = read_metrics(tmp_path / "run")
    assert row["mismatch/abs_logprob_diff_max"] < 1e-5  # the training step saw the same ratio


def test_a_bf16_sampler_is_within_its_precision(tmp_path):
    report = check_ratios(_trainer(tmp_path, "rollout.sampler_dtype=bfloat16"))
    assert report.ok and 1e-4 < report.abs_log_ratio_mean < report.tolerance


def test_an_fp8_sampler_is_within_its_precision_and_named_at_fp32_tolerance(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path, "rollout.sampler_quant=fp8")
    report = check_ratios(trainer)
    assert report.ok and report.tolerance == 5e-2 and report.abs_log_ratio_mean > 1e-4  # a real gap, like bf16's
    monkeypatch.setattr("steadyrl.train.doctor._tolerance", lambda trainer: 1e-4)  # judged as an fp32 sampler
    report = check_ratios(trainer)
    assert not report.ok and any("an fp8 fake-quantised copy (rollout.sampler_quant)" in c for c in report.causes)


def test_doctor_command_prints_the_verdict_and_exits_1_when_biased(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("model: {name_or_path: 'embedded:tiny-adder'}\nrollout: {prompts_per_step: 8, top_p: 0.8}\n"
                      "run: {device: cpu}\n")
    assert main(["doctor", str(config)]) == 1
    out = capsys.readouterr().out
    assert "BIASED" in out and "cause: the sampler truncates" in out
    assert main(["doctor", str(config), "--set", "rollout.trainer_truncation=true"]) == 0


def test_mismatch_is_logged_beside_a_correction_and_the_policy_lag_is_recorded(tmp_path):
    trainer = _trainer(tmp_path, "correction=token_tis", "optim.mini_batches=2", "optim.steps=1", "run.preflight=false")
    trainer.train()
    (row,) = read_metrics(tmp_path / "run")
    assert {"mismatch/ratio_mean", "mismatch/chi2", "mismatch/is_ess"} <= set(row)
    assert row["rollout/policy_lag_mean"] == 0.5 and row["rollout/policy_lag_max"] == 1.0  # 2 mini-batches: 0, 1


def test_the_guard_alarms_when_the_mean_ratio_drifts():
    guard = StabilityGuard(GuardConfig(ratio_drift=0.01))
    fired, seen = guard.signals({"mismatch/ratio_mean": 0.98})
    assert fired == ["ratio_drift mean π/μ 0.980 is 0.020 from 1 > 0.01"] and seen["ratio_mean"] == 0.98
    assert guard.signals({"mismatch/ratio_mean": 0.998})[0] == []
