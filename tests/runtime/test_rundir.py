"""Run directories: steadyrl never deletes or writes into what it did not create, and resumes only its own run.

    .venv/bin/python -m pytest -q tests/runtime/test_rundir.py

The data-loss cases use real directories holding a user's files (issue: a quickstart deleted another run with
its notes, and a project folder with its code).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sevens_task import SevensTask
from steadyrl.cli import main
from steadyrl.config import ConfigError
from steadyrl.runtime import rundir
from steadyrl.runtime.checkpoint import save_pretrained_atomic
from steadyrl.train.trainer import Trainer

QUICK = ["optim.steps=1", "eval.every=0", "logging.report=false", "logging.progress=false",
         "logging.tensorboard=false", "checkpoint.save_final_model=false", "rollout.prompts_per_step=4"]


def _project(tmp_path):
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "important.py").write_text("print('work')\n")
    (project / "config.yaml").write_text("mine: true\n")
    return project


def test_quickstart_refuses_a_folder_it_did_not_create(tmp_path, capsys):
    project = _project(tmp_path)
    assert main(["quickstart", "--out", str(project), "--set", *QUICK]) == 2
    assert "holds files steadyrl did not write" in capsys.readouterr().err
    assert (project / "src" / "important.py").read_text() == "print('work')\n"
    assert (project / "config.yaml").read_text() == "mine: true\n"


def test_training_into_a_foreign_folder_is_refused_before_loading(tiny_config, tmp_path):
    project = _project(tmp_path)
    with pytest.raises(ConfigError, match=r"holds files steadyrl did not write \(src\)"):
        Trainer(tiny_config(f"run.output_dir={project}"), task=SevensTask())
    assert sorted(p.name for p in project.iterdir()) == ["config.yaml", "src"]


def test_quickstart_clears_only_its_own_files_from_its_own_run(tmp_path):
    out = tmp_path / "demo"
    assert main(["quickstart", "--out", str(out), "--set", *QUICK]) == 0
    (out / "notes.txt").write_text("the lr looked high\n")  # a user's note in the run directory
    assert main(["quickstart", "--out", str(out), "--set", *QUICK]) == 0
    assert (out / "notes.txt").read_text() == "the lr looked high\n"
    assert (out / rundir.MARKER).is_file() and (out / "metrics.jsonl").is_file()


def test_a_different_config_does_not_resume_another_run(tiny_config, capsys):
    cfg = tiny_config("optim.steps=2", "checkpoint.every=1")
    Trainer(cfg, task=SevensTask()).train()
    with pytest.raises(ConfigError, match=r"holds a run with another config \(optim.lr: 0.01 → 0.02\)"):
        Trainer(tiny_config("optim.steps=2", "checkpoint.every=1", "optim.lr=0.02"), task=SevensTask())
    # only resumable settings changed: it continues, and says so
    capsys.readouterr()
    trainer = Trainer(tiny_config("optim.steps=3", "checkpoint.every=1", "eval.every=1"), task=SevensTask())
    assert trainer.start_step == 2
    assert "from step 2 (of 3)" in capsys.readouterr().out


def test_a_run_written_before_the_marker_is_adopted(tiny_config):
    cfg = tiny_config("optim.steps=1")
    Trainer(cfg, task=SevensTask()).train()
    marker = Path(cfg.run.output_dir) / rundir.MARKER
    marker.unlink()  # as steadyrl 0.1 left a run
    assert rundir.inspect(cfg.run.output_dir).kind == "legacy"
    Trainer(tiny_config("optim.steps=2"), task=SevensTask())
    assert marker.is_file()


def test_an_export_never_replaces_a_folder_with_other_files(tmp_path):
    from steadyrl.models import ARITHMETIC_ALPHABET, build_char_tokenizer, build_tiny_model, tiny_model_config

    tokenizer = build_char_tokenizer(ARITHMETIC_ALPHABET)
    model = build_tiny_model(tiny_model_config("qwen2", vocab_size=len(tokenizer), hidden_size=16, num_layers=1, num_heads=2))
    out = tmp_path / "export"
    save_pretrained_atomic(model, tokenizer, out)
    save_pretrained_atomic(model, tokenizer, out)  # an export replaces an export
    (out / "README.md").write_text("my model card\n")
    with torch.no_grad():
        model.lm_head.weight.zero_()
    with pytest.raises(ConfigError, match=r"holds files a model export does not write \(README.md\)"):
        save_pretrained_atomic(model, tokenizer, out)
    assert (out / "README.md").read_text() == "my model card\n"
    assert not any(p.name.startswith(".tmp") for p in tmp_path.iterdir())
