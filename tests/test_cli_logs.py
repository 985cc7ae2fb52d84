"""Logs a batch job can use (issue 16 item 6), end to end through `steadyrl train`: plain per-step lines when
stderr is not a terminal, eval lines with the bar off, eval samples in RUN_DIR/samples.jsonl and the report,
`mismatch` instead of `kl`, and no pointer to a report that was not written.

    .venv/bin/python -m pytest -q tests/test_cli_logs.py
"""

from __future__ import annotations

import contextlib
import io
import json

import pytest

from steadyrl.cli import main
from steadyrl.evaluate import evaluate
from steadyrl.models import load_model, load_tokenizer
from steadyrl.registry import build_backend, build_task
from steadyrl.rollout.base import SamplingParams
from steadyrl.tasks import score_completions

CONFIG = """\
task: {name: arithmetic, kwargs: {min_digits: 1, max_digits: 2}}
rollout: {prompts_per_step: 4, group_size: 4, max_new_tokens: 4}
optim: {steps: 3, lr: 1.0e-3, micro_batch_size: 16}
eval: {every: 2, num_prompts: 6, pass_k: 2}
logging: {tensorboard: false}
checkpoint: {save_final_model: false}
run: {device: cpu}
"""


def _train(tmp_path, model_dir, *sets: str) -> tuple[int, str, str]:
    config = tmp_path / "tiny.yaml"
    config.write_text(CONFIG)
    out, err = io.StringIO(), io.StringIO()
    argv = ["train", str(config), "--set", f"model.name_or_path={model_dir}", f"run.output_dir={tmp_path / 'run'}", *sets]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    lines = [line for line in err.getvalue().split("\n") if "Loading weights" not in line]  # transformers' own bar
    return code, out.getvalue(), "\n".join(lines)


def test_plain_step_lines_and_eval_samples_without_a_terminal(tmp_path, tiny_model_dir):
    # Before: the tqdm bar's `\r` frames (one per refresh) in the log, `kl=6.6e-14` for the mismatch, no samples.
    code, out, err = _train(tmp_path, tiny_model_dir)
    assert code == 0, err
    assert "\r" not in err
    lines = err.strip().split("\n")
    steps = [line for line in lines if line.startswith("step ")]
    evals = [line for line in lines if line.startswith("[eval step ")]
    assert [line.split()[1] for line in steps] == ["1/3", "2/3", "3/3"]
    assert all(" rew=" in line and " mismatch=" in line and " kl=" not in line for line in steps), steps
    assert [line.split()[2] for line in evals] == ["0]", "2]", "3]"]
    run_dir = tmp_path / "run"
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert sorted({s["step"] for s in samples}) == [0, 2, 3]
    assert all(set(s) == {"step", "prompt", "answer", "completion", "reward", "greedy"} for s in samples)
    assert all(s["greedy"] and s["reward"] in (0.0, 1.0) for s in samples)
    page = (run_dir / "report" / "index.html").read_text()
    assert "<h2>Sample completions</h2>" in page and '<p class="headline">accuracy ' in page
    assert out.strip().endswith(f"run directory: {run_dir}  (report: {run_dir / 'report' / 'index.html'})")


def test_progress_off_keeps_the_eval_lines(tmp_path, tiny_model_dir):
    # Before: logging.progress=false printed nothing at all until the summary.
    code, _, err = _train(tmp_path, tiny_model_dir, "logging.progress=false")
    assert code == 0, err
    lines = [line for line in err.strip().split("\n") if line]
    assert [line.split()[2] for line in lines] == ["0]", "2]", "3]"] and all(l.startswith("[eval step") for l in lines)


def test_summary_does_not_point_to_a_report_that_was_not_written(tmp_path, tiny_model_dir):
    # Before: "(report: RUN_DIR/report/index.html)" with logging.report=false, a file that does not exist.
    code, out, err = _train(tmp_path, tiny_model_dir, "logging.report=false", "eval.every=0")
    assert code == 0, err
    run_dir = tmp_path / "run"
    assert not (run_dir / "report").exists()
    assert out.strip() == f"run directory: {run_dir}  (no report written; `steadyrl report {run_dir}` makes one)"


@pytest.mark.parametrize("greedy", [True, False])
def test_evaluate_hands_back_samples_with_their_rewards(tiny_model_dir, greedy):
    tokenizer = load_tokenizer(tiny_model_dir)
    model = load_model(tiny_model_dir)
    task = build_task("arithmetic", min_digits=1, max_digits=2)
    prompts = task.eval_prompts()[:6]
    got: list[list[dict]] = []
    metrics = evaluate(
        build_backend("hf", model, tokenizer), tokenizer, task, prompts, sampling=SamplingParams(4, 1.0),
        pass_k=3, greedy=greedy, batch_size=4, on_samples=got.append, num_samples=5,
    )
    assert len(got) == 1  # one call per evaluation
    samples = got[0]
    # five samples: the first five prompts in order (across the batches of 4), one completion each
    assert [s["prompt"] for s in samples] == [p.text for p in prompts[:5]]
    assert [s["answer"] for s in samples] == [p.answer for p in prompts[:5]]
    assert all(s["greedy"] is greedy for s in samples)
    rewards = score_completions(task, prompts[:5], [s["completion"] for s in samples])
    assert [s["reward"] for s in samples] == [float(r) for r in rewards]  # the task's own score of that text
    if greedy:  # the greedy accuracy counts the same completions' rewards (over all 6 prompts)
        assert metrics["eval/accuracy"] * 6 >= sum(s["reward"] == 1.0 for s in samples)
