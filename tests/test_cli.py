"""The ``steadyrl`` command line: methods, train, report, eval, errors, and the installed console script.

    .venv/bin/python -m pytest -q tests/test_cli.py
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from steadyrl import registry
from steadyrl.cli import main
from steadyrl.models import build_char_tokenizer, build_tiny_model, tiny_model_config
from steadyrl.models.tokenizer import ARITHMETIC_ALPHABET
from steadyrl.runtime.checkpoint import save_pretrained_atomic

CONFIG = """\
task:
  name: arithmetic
  kwargs: {min_digits: 1, max_digits: 2}
rollout: {prompts_per_step: 4, group_size: 4, max_new_tokens: 4}
loss: {name: ppo_clip, clip_high: 0.28}
optim: {steps: 5, lr: 1.0e-3, micro_batch_size: 8}
eval: {every: 2, num_prompts: 4, pass_k: 2}
logging: {progress: false}
checkpoint: {save_final_model: false}
run: {device: cpu}
"""


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def _console_script() -> str:
    beside_python = Path(sys.executable).parent / "steadyrl"
    found = str(beside_python) if beside_python.is_file() else shutil.which("steadyrl")
    assert found, "the `steadyrl` console script is not installed (pip install -e .)"
    return found


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli-model")
    tok = build_char_tokenizer(ARITHMETIC_ALPHABET)
    cfg = tiny_model_config("qwen2", vocab_size=len(tok), hidden_size=32, num_layers=1, num_heads=2)
    save_pretrained_atomic(build_tiny_model(cfg, seed=0), tok, path)
    return path


@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli-config") / "tiny.yaml"
    path.write_text(CONFIG)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, model_dir, config_file):
    """One `steadyrl train` run, 2 steps (the file says 5: the override wins), with eval, TensorBoard, report."""
    run_dir = tmp_path_factory.mktemp("cli-run") / "run"
    code, out, err = _run(
        ["train", config_file, "--set", f"model.name_or_path={model_dir}", f"run.output_dir={run_dir}", "optim.steps=2"]
    )
    assert code == 0, err
    return run_dir, out


# ----------------------------------------------------------------------------- methods


def test_methods_lists_every_registered_name():
    code, out, _ = _run(["methods"])
    assert code == 0
    for family in registry.METHOD_FAMILIES:
        table = registry.FAMILIES[family].table
        if table:
            assert re.search(rf"^{family}\s+\[.*\]:$", out, re.MULTILINE), f"no header for {family}"
        for name, entry in table.items():
            assert re.search(rf"^\s+{re.escape(name)}\s", out, re.MULTILINE), f"{family} {name} not listed"
            assert entry.description in out


def test_methods_markdown_has_one_row_per_name():
    code, out, _ = _run(["methods", "--markdown"])
    assert code == 0
    rows = [line for line in out.splitlines() if line.startswith("| ") and "`" in line]
    for family in registry.METHOD_FAMILIES:
        for name in registry.FAMILIES[family].table:
            assert any(row.startswith(f"| {family} (") and f"| `{name}` |" in row for row in rows), f"{family} {name}"


def test_methods_cite_papers_and_existing_project_pages_not_design_sections():
    code, out, _ = _run(["methods"])
    assert code == 0
    assert "§" not in out  # sections of an internal design document a user does not have
    assert "[arXiv 2510.00819; docs/methods/capo.md]" in out
    repo = Path(__file__).resolve().parents[1]
    for page in set(re.findall(r"docs/[\w/.-]+\.md", out)):
        assert (repo / page).is_file(), page


def test_installed_console_script_runs():
    result = subprocess.run([_console_script(), "methods"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "ppo_clip" in result.stdout and "token_mean" in result.stdout


def test_installed_console_script_reports_bad_input_in_one_line(tmp_path):
    missing = tmp_path / "missing.yaml"
    result = subprocess.run([_console_script(), "train", str(missing)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        f"steadyrl: error: config file {missing} does not exist; pass the path of a YAML file (see configs/)."
    )


# ----------------------------------------------------------------------------- train


def test_train_writes_the_run_directory(trained):
    run_dir, out = trained
    assert (run_dir / "config.yaml").is_file()
    assert "steps: 2" in (run_dir / "config.yaml").read_text()  # the resolved config, overrides applied
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "policy/loss" in r] == [1, 2]
    assert any("eval/accuracy" in r for r in rows)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["wall_s"] > 0
    assert 0.0 <= summary["eval_start"] <= 1.0 and 0.0 <= summary["eval_end"] <= 1.0
    assert list((run_dir / "tb").glob("events.out.tfevents.*")), "no TensorBoard event file"
    assert f"run directory: {run_dir}" in out and "before RL ->" in out


def _report_images(run_dir: Path) -> list[str]:
    html = (run_dir / "report" / "index.html").read_text()
    return re.findall(r'<img src="([^"]+)"', html)


def test_train_report_references_existing_plots(trained):
    run_dir, _ = trained
    images = _report_images(run_dir)
    assert images, "the report has no plots"
    for name in images:
        assert name.endswith(".png") and (run_dir / "report" / name).is_file(), name


def test_report_regenerates_the_report(trained):
    run_dir, _ = trained
    shutil.rmtree(run_dir / "report")
    code, out, _ = _run(["report", run_dir])
    assert code == 0
    assert out.strip() == str((run_dir / "report" / "index.html").resolve())
    images = _report_images(run_dir)
    assert images and all((run_dir / "report" / name).is_file() for name in images)


def test_report_of_a_directory_that_is_not_a_run(tmp_path):
    code, out, err = _run(["report", tmp_path])
    assert code == 2 and out == ""
    assert err == f"steadyrl: error: {tmp_path} has no metrics.jsonl; pass the run directory of a `steadyrl train` run.\n"


# ----------------------------------------------------------------------------- eval


def test_eval_prints_json_metrics(model_dir):
    code, out, _ = _run(["eval", model_dir, "--num-prompts", "8", "--pass-k", "2", "--max-new-tokens", "4"])
    assert code == 0
    metrics = json.loads(out)
    assert "eval/accuracy" in metrics and "eval/pass@1" in metrics
    for key, value in metrics.items():
        assert key.startswith("eval/") and isinstance(value, (int, float)), key
    assert 0.0 <= metrics["eval/accuracy"] <= 1.0


# ----------------------------------------------------------------------------- bad input: exit 2, one line


@pytest.mark.parametrize(
    "overrides,fragment",
    [
        (["optim.lrr=1e-3"], "unknown key(s) 'lrr' in section 'optim'; valid keys: steps, lr,"),
        (["loss.name=ppo_clipp"], "unknown loss 'ppo_clipp'; valid names:"),
        (["model.name_or_path=/no/such/model"], "model path /no/such/model does not exist"),
        (["optim.mini_batches=3"], "choose a divisor of 16"),
        (["optim.steps=two"], "optim.steps must be an integer"),
        (["task.kwargs={digits: 3}"], "unknown setting(s) 'digits' for task 'arithmetic'"),
        (["model.prompt_format=chat"], "model.prompt_format is chat but the tokenizer"),
        (["task={name: python, kwargs: {reward: nope.py:f, data: x.jsonl}}"], "reward file nope.py does not exist"),
    ],
)
def test_bad_input_exits_2_with_one_line(config_file, model_dir, tmp_path, overrides, fragment):
    sets = [f"model.name_or_path={model_dir}", f"run.output_dir={tmp_path / 'run'}", *overrides]
    code, out, err = _run(["train", config_file, "--set", *sets])
    assert code == 2
    assert err.startswith("steadyrl: error: ") and err.endswith("\n") and err.count("\n") == 1, err
    assert fragment in err, err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # it stopped before training


@pytest.mark.parametrize(
    "extra,fragment",
    [
        (["--task-kwargs", "{max_digits: 3}"], "is not valid JSON"),
        (["--task-kwargs", "[3]"], "must be a JSON object"),
        (["--task-kwargs", '{"digits": 3}'], "unknown setting(s) 'digits' for task 'arithmetic'"),
        (["--task", "sudoku"], "unknown task 'sudoku'"),
        (["--prompt-format", "chat"], "has no chat template"),
    ],
)
def test_eval_bad_task_options_exit_2(model_dir, extra, fragment):
    code, out, err = _run(["eval", model_dir, "--num-prompts", "1", *extra])
    assert code == 2 and out == "" and err.count("\n") == 1 and fragment in err, err


def test_eval_of_a_missing_model_exits_2(tmp_path):
    code, _, err = _run(["eval", tmp_path / "nothing", "--num-prompts", "1"])
    assert code == 2 and f"model path {tmp_path / 'nothing'} does not exist" in err and err.count("\n") == 1


def test_override_without_equals_exits_2(config_file):
    code, _, err = _run(["train", config_file, "--set", "optim.lr"])
    assert code == 2 and "section.key=value" in err and err.count("\n") == 1


def test_unknown_command_is_an_argparse_error():
    with pytest.raises(SystemExit) as info, contextlib.redirect_stderr(io.StringIO()):
        main(["trian"])
    assert info.value.code == 2
