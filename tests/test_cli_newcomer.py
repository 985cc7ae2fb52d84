"""A newcomer's first ten minutes (issue 16 item 9): --help says what steadyrl is for, --version, train --help
points to the config reference and says a run directory is resumed, `steadyrl config` prints the defaults and
a merged config that loads back, eval options have help, the README's commands and Python example work, and
the stability recipes ship inside the wheel.

    .venv/bin/python -m pytest -q tests/test_cli_newcomer.py
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from steadyrl import __version__
from steadyrl.cli import build_parser, main
from steadyrl.config import TrainConfig
from steadyrl.config_load import load_config
from steadyrl.config_reference import field_docs

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def _run(argv: list) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exit_:  # --help / --version
            code = exit_.code
    return code, out.getvalue(), err.getvalue()


# ----------------------------------------------------------------------------- help and version


def test_help_says_what_steadyrl_is_for():
    code, out, _ = _run(["--help"])
    assert code == 0
    assert "stable RL post-training of language models with verifiable rewards" in out
    for command in ("train", "config", "methods", "eval", "report", "quickstart"):
        assert f"`steadyrl {command}" in out or f"  {command} " in out, command


def test_version():
    code, out, _ = _run(["--version"])
    assert code == 0 and out == f"steadyrl {__version__}\n"


def test_train_help_points_to_the_config_reference_and_says_resume():
    code, out, _ = _run(["train", "--help"])
    assert code == 0
    text = " ".join(out.split())
    assert "`steadyrl config` prints every key with its default and meaning" in text
    assert "training resumes from its latest checkpoint" in text and "rerun the same command" in text


def _subparser(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[name]


def test_every_eval_option_has_help():
    # Before: `steadyrl eval --help` listed 9 of its 10 options without a word.
    options = [a for a in _subparser("eval")._actions if not isinstance(a, argparse._HelpAction)]
    assert len(options) >= 10
    assert [a.dest for a in options if not a.help] == []


# ----------------------------------------------------------------------------- steadyrl config


def test_config_prints_the_defaults_as_yaml_that_loads_back(tmp_path):
    code, out, _ = _run(["config"])
    assert code == 0
    assert out.startswith("# steadyrl config: the defaults\n")
    (tmp_path / "defaults.yaml").write_text(out)
    assert load_config(tmp_path / "defaults.yaml") == TrainConfig()


def test_config_merges_the_file_and_the_overrides(tmp_path):
    recipe = REPO / "configs" / "capo.yaml"
    sets = ["optim.lr=3e-4", "loss.clip_high=0.28"]
    code, out, _ = _run(["config", recipe, "--set", *sets])
    assert code == 0
    assert out.startswith(f"# steadyrl config: the defaults <- {recipe} <- --set optim.lr=3e-4 loss.clip_high=0.28\n")
    (tmp_path / "merged.yaml").write_text(out)
    assert load_config(tmp_path / "merged.yaml") == load_config(recipe, sets)
    code, plain, _ = _run(["config", recipe, "--set", *sets, "--no-comments"])
    assert [line for line in plain.splitlines() if not line.startswith("#")] == [
        line for line in out.splitlines() if not line.lstrip().startswith("#")
    ]


def _all_fields(cls: type, prefix: str = ""):
    for f in dataclasses.fields(cls):
        yield cls, f, prefix + f.name


def test_config_explains_every_documented_key_and_each_method():
    code, out, _ = _run(["config"])
    assert code == 0
    lines = out.splitlines()
    # every documented field of every section: its docstring's first words in the comment just above it
    for section in (TrainConfig, *{type(getattr(TrainConfig(), f.name)) for f in dataclasses.fields(TrainConfig)}):
        if not dataclasses.is_dataclass(section):
            continue
        for name, doc in field_docs(section).items():
            first_words = " ".join(doc.replace("``", "`").split()[:4])
            index = next((i for i, line in enumerate(lines) if re.match(rf"\s*{name}:", line) and
                          any(first_words in c for c in lines[max(0, i - 8) : i])), None)
            assert index is not None, f"{section.__name__}.{name}: no comment '{first_words}'"
    assert "# ppo_clip settings (default): clip_low=0.2, clip_high=0.2, dual_clip=None" in lines
    assert "guard: null" in lines and "#   max_rollbacks: 3" in lines  # an optional section's defaults


def test_config_of_a_bad_file_is_one_line(tmp_path):
    code, out, err = _run(["config", tmp_path / "missing.yaml"])
    assert code == 2 and out == "" and err.count("\n") == 1 and "does not exist" in err


# ----------------------------------------------------------------------------- the README


def _readme_block(after: str, language: str) -> str:
    start = README.index(after)
    match = re.search(rf"```{language}\n(.*?)```", README[start:], re.DOTALL)
    assert match, f"no {language} block after {after!r}"
    return match.group(1)


def test_readme_says_how_to_run_the_installed_command():
    using = README[README.index("## Using it") : README.index("## One RL step")]
    assert "source .venv/bin/activate" in using and ".venv/bin/steadyrl" in using
    assert "pip install ." in using


def test_readme_commands_parse():
    """Every `steadyrl ...` line of "Using it" is a command the parser accepts (no stale option)."""
    parser = build_parser()
    using = README[README.index("## Using it") : README.index("## One RL step")]
    shell = "".join(re.findall(r"```bash\n(.*?)```", using, re.DOTALL))
    commands = [line.split("#")[0].strip() for line in shell.splitlines() if line.startswith("steadyrl ")]
    assert len(commands) >= 10
    for command in commands:
        argv = shlex.split(command)[1:]
        if argv in (["--help"], ["--version"]):
            continue
        parser.parse_args(argv)


def test_readme_makefile_torch_claims_match_the_makefile():
    makefile = (REPO / "Makefile").read_text()
    assert 'python -c "import torch" 2>/dev/null || $(PIP) install -c $(LOCK) "$(TORCH_SPEC)"' in makefile
    torch_spec = re.search(r"^TORCH_SPEC \?= (\S+)$", makefile, re.MULTILINE).group(1)
    assert f"`TORCH_SPEC` (default `{torch_spec}`)" in README
    lock = (REPO / "requirements" / "lock.txt").read_text()
    # "On Linux ... PyPI's CUDA 13 build": the lock resolves torch's Linux dependencies to the CUDA 13 wheels
    assert re.search(r"^nvidia-nccl-cu13==\S+ ; sys_platform == 'linux'\n    # via torch", lock, re.MULTILINE)


def test_readme_python_example_runs(tmp_path, tiny_model_dir, monkeypatch):
    """The Python API example, shortened to one step on the tiny test model."""
    code = _readme_block("From Python", "python")
    overrides = '"optim.steps=20", "run.output_dir=runs/partial-credit"'
    assert overrides in code
    code = code.replace('"configs/quickstart.yaml"', repr(str(REPO / "configs" / "quickstart.yaml"))).replace(
        overrides,
        f'"optim.steps=1", "run.output_dir=runs/partial-credit", "model.name_or_path={tiny_model_dir}", '
        '"rollout.prompts_per_step=4", "rollout.group_size=4", "eval.num_prompts=4", "eval.pass_k=0", '
        '"logging.progress=false", "logging.report=false", "logging.tensorboard=false", '
        '"checkpoint.save_final_model=false"',
    )
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        exec(compile(code, "README.md", "exec"), {"__name__": "readme_example"})
    assert re.fullmatch(r"eval/accuracy \d\.\d+ -> \d\.\d+\n", out.getvalue())
    assert (tmp_path / "runs" / "partial-credit" / "summary.json").is_file()


# ----------------------------------------------------------------------------- package data


def test_bench_finds_its_recipes_from_any_directory(tmp_path, monkeypatch):
    # Before: "no stability recipes found (looked in configs/stability, ...)" outside the repository.
    from steadyrl.bench.stability import find_configs_dir, plan_cells, quick_spec

    monkeypatch.chdir(tmp_path)
    found = find_configs_dir()
    assert found.is_dir() and found.parent.parent.name == "steadyrl"  # steadyrl/configs/stability
    assert {p.stem for p in found.glob("*.yaml")} >= {"grpo", "grpo_guard", "capo", "minirl", "cispo", "lco_kld"}
    cells = plan_cells(quick_spec(out=str(tmp_path / "map")))
    assert all(Path(c.config).is_file() for c in cells)


def test_repository_configs_stability_is_the_packaged_directory():
    assert (REPO / "configs" / "stability").resolve() == (REPO / "src" / "steadyrl" / "configs" / "stability").resolve()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """`pip wheel . --no-deps` of a copy of the source tree (the build leaves build/ behind)."""
    pytest.importorskip("setuptools", reason="building the wheel offline needs setuptools in this venv")
    root = tmp_path_factory.mktemp("wheel")
    source = root / "src-copy"
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", ".venv*", "runs", ".pytest_cache")
    shutil.copytree(REPO / "src", source / "src", ignore=skip)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q", "-w", str(root)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    (path,) = root.glob("steadyrl-*.whl")
    return path


def test_wheel_holds_every_subpackage_and_the_recipes(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    package = REPO / "src" / "steadyrl"
    subpackages = {p.parent for p in package.rglob("*.py") if "__pycache__" not in p.parts}
    for folder in subpackages:
        init = folder.relative_to(package.parent) / "__init__.py"
        assert init.as_posix() in names, f"{init} is not in the wheel"
    data = [p for p in (package / "configs").rglob("*.yaml")] + [p for p in (package / "assets").rglob("*") if p.is_file()]
    assert any("stability" in p.parts for p in data)
    for path in data:
        assert path.relative_to(package.parent).as_posix() in names, f"{path} is not in the wheel"


def test_bench_stability_runs_from_the_installed_wheel(wheel, tmp_path):
    """The wheel's own files, not this checkout: plan the quick map and read a recipe from a bare directory."""
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    script = (
        "import steadyrl, sys; from steadyrl.bench.stability import plan_cells, quick_spec; "
        "cells = plan_cells(quick_spec(out='map')); print(steadyrl.__file__); print(cells[0].config)"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    module, recipe = result.stdout.split()
    assert module.startswith(str(site)) and recipe.startswith(str(site / "steadyrl" / "configs" / "stability"))
    assert Path(recipe).is_file()
