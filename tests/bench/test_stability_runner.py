"""The collapse-map runner on a tiny model: a 2-cell matrix in spawned workers, errors recorded, cells cached."""

from __future__ import annotations

import json

import pytest

from steadyrl.bench.stability import Cell, plan_cells, quick_spec, run_cell, run_matrix, run_stability
from steadyrl.cli import main
from steadyrl.config import ConfigError
from steadyrl.models import build_char_tokenizer, build_tiny_model, tiny_model_config
from steadyrl.models.tokenizer import ARITHMETIC_ALPHABET
from steadyrl.runtime.checkpoint import save_pretrained_atomic

TINY = (  # shrink the lab's recipe to seconds: 4 prompts x 4 samples, 4 tokens, 8 eval prompts
    "rollout.prompts_per_step=4",
    "rollout.group_size=4",
    "rollout.max_new_tokens=4",
    "optim.micro_batch_size=8",
    "optim.warmup_steps=0",
    "eval.num_prompts=8",
)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-model")
    tok = build_char_tokenizer(ARITHMETIC_ALPHABET)
    cfg = tiny_model_config("qwen2", vocab_size=len(tok), hidden_size=32, num_layers=2, num_heads=2)
    save_pretrained_atomic(build_tiny_model(cfg, seed=0), tok, path)
    return str(path)


def test_plan_cells_overrides_and_order(tiny_model, tmp_path):
    spec = quick_spec(methods=("grpo", "capo"), lrs=(3e-4, 3e-3), seeds=(0,), steps=7, out=str(tmp_path), model=tiny_model)
    cells = plan_cells(spec)
    assert [c.name for c in cells] == ["capo_lr0.0003_s0", "capo_lr0.003_s0", "grpo_lr0.0003_s0", "grpo_lr0.003_s0"]
    o = cells[1].overrides
    for expected in ("optim.steps=7", "optim.lr=0.003", "run.seed=0", f"model.name_or_path={tiny_model}", "run.device=cpu",
                     "eval.pass_k=0", f"run.output_dir={tmp_path}/runs/capo_lr0.003_s0"):
        assert expected in o
    with pytest.raises(ConfigError, match="no recipe for method"):
        plan_cells(quick_spec(methods=("grpo", "nonsense")))


@pytest.mark.parametrize(
    "workers",
    [1, pytest.param(2, marks=pytest.mark.slow)],  # 2: spawned workers, each importing torch (slow on a busy CPU)
)
def test_two_cell_matrix_writes_every_output(tiny_model, tmp_path, workers):
    spec = quick_spec(methods=("grpo", "grpo_guard"), lrs=(1e-3,), seeds=(0,), steps=2, eval_every=1,
                      out=str(tmp_path), model=tiny_model, workers=workers, extra=TINY)
    meta = run_stability(spec, command="test", log=lambda _: None)
    for name in ("results.jsonl", "meta.json", "report.md", "report.html", "heatmap.png", "curves.png"):
        assert (tmp_path / name).is_file(), name
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert sorted(r["method"] for r in rows) == ["grpo", "grpo_guard"]
    for r in rows:
        assert r["status"] == "ok" and r["steps_done"] == 2 and r["completions_per_step"] == 16
        assert r["curve"]["eval_steps"] == [0, 1, 2] and isinstance(r["collapsed"], bool)
    assert (tmp_path / "runs" / "grpo_guard_lr0.001_s0" / "guard.jsonl").is_file()
    assert meta["cells"] == 2 and meta["wall_s"] > 0
    assert "src='heatmap.png'" in (tmp_path / "report.html").read_text()


def test_a_failing_cell_is_recorded_and_the_rest_run(tiny_model, tmp_path):
    good = Cell("grpo", 1e-3, 0, "configs/stability/grpo.yaml", (*TINY, f"model.name_or_path={tiny_model}",
                "optim.steps=1", "eval.every=0", "run.device=cpu", f"run.output_dir={tmp_path / 'good'}"), str(tmp_path / "good"))
    bad = Cell("grpo", 3e-3, 0, "configs/stability/grpo.yaml", ("model.name_or_path=/nonexistent/model",
               f"run.output_dir={tmp_path / 'bad'}"), str(tmp_path / "bad"))
    rows = run_matrix([bad, good], workers=1, log=lambda _: None)
    assert rows[0]["status"] == "error" and rows[0]["collapsed"] is None and "nonexistent" in rows[0]["error"]
    assert rows[1]["status"] == "ok" and rows[1]["steps_done"] == 1
    # finished cells are cached: the second pass runs nothing (a run would overwrite result.json)
    stamp = (tmp_path / "good" / "result.json").stat().st_mtime_ns
    again = run_matrix([bad, good], workers=1, log=lambda _: None)
    assert (tmp_path / "good" / "result.json").stat().st_mtime_ns == stamp and again[1]["status"] == "ok"


def test_a_crash_after_training_began_counts_as_collapse(tiny_model, tmp_path, monkeypatch):
    from steadyrl.train import trainer as trainer_module

    original = trainer_module.Trainer.rl_step

    def crash_on_step_2(self, step):
        if step == 2:
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return original(self, step)

    monkeypatch.setattr(trainer_module.Trainer, "rl_step", crash_on_step_2)
    cell = Cell("grpo", 1e-2, 0, "configs/stability/grpo.yaml", (*TINY, f"model.name_or_path={tiny_model}", "optim.steps=3",
                "eval.every=0", "run.device=cpu", f"run.output_dir={tmp_path / 'c'}"), str(tmp_path / "c"))
    row = run_cell(cell)
    assert row["status"] == "error" and row["collapsed"] is True and row["steps_done"] == 1
    assert row["collapse_reasons"][0].startswith("crashed: RuntimeError: probability tensor")


def test_cli_bad_list_is_a_one_line_error(capsys):
    assert main(["bench", "stability", "--quick", "--lrs", "3e-4,fast"]) == 2
    assert "must be a comma-separated list" in capsys.readouterr().err
