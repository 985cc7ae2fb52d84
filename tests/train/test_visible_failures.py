"""Failures a user sees: skipped steps, rollbacks and alarms as lines, a failed run that says so, exits non-zero
and exports nothing, and weights that turn non-finite stopping the run with one line.

    .venv/bin/python -m pytest -q tests/train/test_visible_failures.py

Runs on the embedded model (warm-started, so the lab's collapse definition applies as in the lab).
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from steadyrl.cli import main
from steadyrl.config_load import load_config
from steadyrl.train.trainer import Trainer
from steadyrl.train.watch import TrainingFailed

EMBEDDED = ["model.name_or_path=embedded:tiny-adder", "rollout.prompts_per_step=8", "rollout.group_size=4",
            "eval.every=2", "eval.num_prompts=16", "eval.pass_k=0", "logging.progress=false",
            "logging.report=false", "logging.tensorboard=false", "run.device=cpu"]


def _train(tmp_path: Path, *overrides: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    config = tmp_path / "defaults.yaml"
    config.write_text("{}\n")  # the defaults, overridden below
    argv = ["train", str(config), "--set", *EMBEDDED, f"run.output_dir={tmp_path / 'run'}", *overrides]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def test_an_absurd_learning_rate_is_reported_fails_and_is_not_exported(tmp_path):
    # the case: optim.lr=1e6 skipped 3 of 4 steps, collapsed, exited 0 and exported the collapsed model
    code, out, _ = _train(tmp_path, "optim.steps=4", "optim.lr=1e6")
    assert code == 3
    assert "skipped 1 optimizer step(s) with a non-finite gradient" in out or "made the weights non-finite" in out
    assert "the run failed:" in out and "the final model was not exported" in out
    assert not (tmp_path / "run" / "final").exists()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["verdict"]["collapsed"] and summary["warnings"]


def test_a_reward_that_never_scores_fails_the_run(tmp_path):
    class NeverScores:
        name = "never"

        def __init__(self):
            from steadyrl.registry import build_task

            self.inner = build_task("arithmetic")

        def sample(self, split, n, seed):
            return self.inner.sample(split, n, seed)

        def eval_prompts(self):
            return self.inner.eval_prompts()[:8]

        def reward(self, prompt, completion):
            return None

    cfg = load_config(None, [*EMBEDDED, "eval.every=0", "optim.steps=2", f"run.output_dir={tmp_path / 'run'}"])
    summary = Trainer(cfg, task=NeverScores()).train()
    assert summary["verdict"]["unscorable"] and "every reward was unscorable" in summary["verdict"]["reasons"]
    assert summary["warnings"][0] == "step 1: no completion could be scored (the reward returned None / NaN for all)"
    assert not (tmp_path / "run" / "final").exists()


def test_weights_that_turn_non_finite_stop_the_run_with_one_line(tmp_path):
    cfg = load_config(None, [*EMBEDDED, "optim.steps=3", "optim.lr=.inf", "optim.grad_clip=0",
                             f"run.output_dir={tmp_path / 'run'}"])
    with pytest.raises(TrainingFailed, match=r"step 1: an optimizer step made the weights non-finite \(optim.lr=inf\).*"
                                             r"guard.max_rollbacks=3.*there is no checkpoint yet"):
        Trainer(cfg).train()


def test_with_the_guard_non_finite_weights_roll_back_instead(tmp_path):
    cfg = load_config(None, [*EMBEDDED, "optim.steps=2", "optim.lr=.inf", "optim.grad_clip=0",
                             "guard.max_rollbacks=1", f"run.output_dir={tmp_path / 'run'}"])
    trainer = Trainer(cfg)
    with pytest.raises(TrainingFailed):  # lr·0.3 is still inf: the second time there is no rollback left
        trainer.train()
    assert trainer.guard.rollbacks == 1
    assert any("stability guard rolled back: nonfinite weights" in w for w in trainer.watch.warnings)


def test_eval_scores_the_current_weights_when_the_sampler_is_a_copy(tiny_config, tmp_path):
    # with rollout.sampler_dtype the sampler is a bf16 copy refreshed before each rollout: after the update the
    # copy is one step stale, and eval (and the retention measure) generate with it
    import torch

    from sevens_task import SevensTask

    cfg = tiny_config("rollout.sampler_dtype=bfloat16", "optim.lr=0.1", f"run.output_dir={tmp_path / 'copy'}")
    trainer = Trainer(cfg, task=SevensTask())
    trainer.rl_step(1)
    current = [p.detach().to(torch.bfloat16) for p in trainer.model.parameters()]
    stale = [p.detach().clone() for p in trainer.backend.sampler.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(current, stale))  # the update moved the policy
    trainer.evaluate(step=1)
    for a, b in zip(current, trainer.backend.sampler.parameters()):
        assert torch.equal(a, b)


def test_the_report_opens_with_a_banner_when_the_run_failed(tmp_path):
    code, _, _ = _train(tmp_path, "optim.steps=4", "optim.lr=1e6", "logging.report=true")
    assert code == 3
    page = (tmp_path / "run" / "report" / "index.html").read_text()
    assert '<div class="banner"><strong>This run failed: accuracy' in page and "non-finite gradient" in page
