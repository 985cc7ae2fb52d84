"""One line, not a traceback (issue 16 item 5): each error below printed a Python traceback (or, for the hub,
a minute of retries) before; now it is one line on stderr, exit 2, raised before the expensive part.

    .venv/bin/python -m pytest -q tests/test_cli_errors.py
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from steadyrl.cli import main
from steadyrl.config import ConfigError
from steadyrl.config_load import load_config
from steadyrl.models import ModelLoadError, load_model, load_tokenizer, loading
from steadyrl.runtime import paths
from steadyrl.runtime.paths import check_writable_dir, disk_full_message

TINY = """\
task: {name: arithmetic, kwargs: {min_digits: 1, max_digits: 2}}
rollout: {prompts_per_step: 4, group_size: 4, max_new_tokens: 4}
optim: {steps: 8, lr: 1.0e-3, micro_batch_size: 16}
eval: {every: 0}
checkpoint: {every: 5, save_final_model: false}
logging: {progress: false, tensorboard: false, report: false}
run: {device: cpu}
"""


def _run(argv: list) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def _ours(err: str) -> str:
    """stderr without transformers' own "Loading weights" progress bar (printed when a model loads)."""
    return "\n".join(line for line in err.split("\n") if "Loading weights" not in line)


def _one_line(err: str) -> str:
    err = _ours(err)
    assert "Traceback" not in err
    assert err.startswith("steadyrl: error: ") and err.endswith("\n") and err.count("\n") == 1, err
    return err[len("steadyrl: error: ") : -1]


@pytest.fixture
def config_file(tmp_path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return path


# ----------------------------------------------------------------------------- YAML syntax


BAD_YAML = """\
model:
  name_or_path: embedded:tiny-adder
optim:
  steps: 60
  lr: 3.0e-4
 warmup_steps: 5
"""


def test_yaml_syntax_error_names_the_file_and_line(tmp_path):
    # Before: a 50-line yaml.parser.ParserError traceback naming "<unicode string>".
    path = tmp_path / "bad.yaml"
    path.write_text(BAD_YAML)
    code, out, err = _run(["train", path])
    assert code == 2 and out == ""
    assert _one_line(err).startswith(f"{path}, line 6, column 2: invalid YAML (expected <block end>")


@pytest.mark.parametrize(
    "text,line", [("a: [1, 2\n", 2), ("a: 'open\n", 2), ("a: 1\n\tb: 2\n", 2), ("a: {b: 1\nc: 2\n", 2)]
)
def test_yaml_syntax_errors_are_config_errors_with_a_line(tmp_path, text, line):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"^{path}, line {line}, column \d+: invalid YAML \("):
        load_config(path)


def test_an_override_that_is_not_yaml_is_one_line(config_file):
    code, _, err = _run(["train", config_file, "--set", "task.kwargs={max_digits: 3"])
    assert code == 2 and "override 'task.kwargs={max_digits: 3': the value is not valid YAML" in _one_line(err)


# ----------------------------------------------------------------------------- output path


def test_output_path_checks(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("not a directory")
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        check_writable_dir(afile)
    with pytest.raises(ConfigError, match=f"cannot be created because {afile} is a file"):
        check_writable_dir(afile / "run" / "deeper")
    new = tmp_path / "a" / "b"
    check_writable_dir(new)  # fine, and nothing is created, probe files included
    assert not (tmp_path / "a").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def _read_only_dir(tmp_path: Path) -> Path:
    """A directory this process cannot write: chmod 555 (root ignores the bits: /sys, which refuses root too)."""
    if os.geteuid() != 0:
        path = tmp_path / "ro"
        path.mkdir()
        path.chmod(0o555)
        return path
    if not os.path.isdir("/sys") or _can_create_in("/sys"):
        pytest.skip("running as root without a directory root cannot write (/sys) to test with")
    return Path("/sys")


def _can_create_in(directory: str) -> bool:
    try:
        fd, name = tempfile.mkstemp(dir=directory)
    except OSError:
        return False
    os.close(fd)
    os.unlink(name)
    return True


def test_read_only_output_dir_is_refused(tmp_path):
    read_only = _read_only_dir(tmp_path)
    with pytest.raises(ConfigError, match=rf"run.output_dir {read_only}/run is not writable \({read_only}: "):
        check_writable_dir(read_only / "run", "run.output_dir")


@pytest.mark.parametrize("kind", ["file", "under_file", "read_only"])
def test_bad_output_path_is_refused_before_the_model_loads(config_file, tmp_path, kind):
    # Before: FileExistsError / NotADirectoryError / PermissionError tracebacks after the model had loaded.
    afile = tmp_path / "afile"
    afile.write_text("x")
    out_dir = {"file": afile, "under_file": afile / "run", "read_only": _read_only_dir(tmp_path) / "run"}[kind]
    # The model path does not exist: an error about the output path proves it was checked first.
    sets = ["model.name_or_path=/no/such/model", f"run.output_dir={out_dir}"]
    code, _, err = _run(["train", config_file, "--set", *sets])
    assert code == 2
    assert f"run.output_dir {out_dir}" in _one_line(err)


def test_trainer_checks_the_output_path_itself(tiny_config, tmp_path):
    """The Python API gets the same check (train/setup.validate_run_dir), before any model is loaded."""
    from steadyrl.train.trainer import Trainer

    afile = tmp_path / "afile"
    afile.write_text("x")
    cfg = tiny_config(f"run.output_dir={afile}", "model.name_or_path=/no/such/model")
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        Trainer(cfg)


# ----------------------------------------------------------------------------- disk full


def test_disk_full_is_recognised_in_torch_and_os_errors(tmp_path):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system to produce a real ENOSPC")
    with pytest.raises(BaseException) as info, open("/dev/full", "wb") as f:
        torch.save({"w": torch.zeros(1000)}, f)  # torch's own error: "unexpected pos", no path, no errno
    assert disk_full_message(info.value, tmp_path).startswith(f"disk full while writing {tmp_path} (")
    named = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "model.pt"))
    assert disk_full_message(named, "elsewhere").startswith(f"disk full while writing {tmp_path / 'model.pt'} (")
    assert " MB free there)" in disk_full_message(named, "elsewhere")
    assert disk_full_message(OSError(errno.EACCES, "Permission denied"), tmp_path) is None
    assert disk_full_message(RuntimeError("CUDA out of memory"), tmp_path) is None


def test_disk_full_during_a_checkpoint_is_one_line(config_file, tiny_model_dir, tmp_path, monkeypatch):
    # Before: three chained tracebacks ending in "unexpected pos 64 vs 0" / "OSError: [Errno 28]".
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system to produce a real ENOSPC")
    real_save = torch.save

    def save_to_full_disk(obj, f, *args, **kwargs):  # every checkpoint write hits a full disk
        with open("/dev/full", "wb") as target:
            real_save(obj, target, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_to_full_disk)
    run_dir = tmp_path / "run"
    code, _, err = _run(["train", config_file, "--set", f"model.name_or_path={tiny_model_dir}", f"run.output_dir={run_dir}"])
    assert code == 2
    message = _one_line(err)
    assert message.startswith(f"disk full while writing {run_dir} (")
    assert message.endswith(
        "free some space or choose a run.output_dir on a disk with room, then rerun the same command to start "
        "again (no checkpoint was saved yet)"
    )


def test_disk_full_after_a_checkpoint_says_where_a_rerun_resumes(monkeypatch, tmp_path):
    from steadyrl.runtime.checkpoint import save_checkpoint

    save_checkpoint(tmp_path, 5, model=torch.nn.Linear(1, 1))
    cfg = load_config(None, [f"run.output_dir={tmp_path}"])
    args = type("Args", (), {"cfg": cfg})()
    from steadyrl.cli_stops import one_line

    message = one_line(args, RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0"))
    assert message.endswith("then rerun the same command to resume from step 5")


# ----------------------------------------------------------------------------- W&B


def test_wandb_missing_is_refused_before_loading(config_file, tmp_path, monkeypatch):
    # Before: ImportError traceback after the model had loaded.
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` fails
    sets = ["model.name_or_path=/no/such/model", f"run.output_dir={tmp_path / 'run'}", "logging.wandb_project=demo"]
    code, _, err = _run(["train", config_file, "--set", *sets])
    assert code == 2
    assert _one_line(err) == (
        "logging.wandb_project is set but wandb is not installed; run `pip install wandb` (or "
        "`pip install steadyrl[wandb]`), or remove logging.wandb_project."
    )


# ----------------------------------------------------------------------------- Ctrl-C


def _interrupt_at(monkeypatch, step: int) -> None:
    """Python turns SIGINT into KeyboardInterrupt in the main thread: raise it inside RL step ``step``."""
    from steadyrl.train.trainer import Trainer

    real = Trainer.rl_step

    def rl_step(self, current):
        if current == step:
            raise KeyboardInterrupt
        return real(self, current)

    monkeypatch.setattr(Trainer, "rl_step", rl_step)


def test_ctrl_c_says_where_it_stopped_and_where_a_rerun_resumes(config_file, tiny_model_dir, tmp_path, monkeypatch):
    # Before: a 60-line KeyboardInterrupt traceback, nothing about resuming.
    _interrupt_at(monkeypatch, 7)
    run_dir = tmp_path / "run"
    argv = ["train", config_file, "--set", f"model.name_or_path={tiny_model_dir}", f"run.output_dir={run_dir}"]
    code, _, err = _run(argv)
    assert code == 130
    assert _ours(err) == "\nsteadyrl: interrupted at step 7; rerun the same command to resume from step 5\n"
    monkeypatch.undo()
    code, _, err = _run(argv)  # and it does resume: the run finishes with 8 steps
    assert code == 0, err


def test_ctrl_c_before_the_first_checkpoint(config_file, tiny_model_dir, tmp_path, monkeypatch):
    _interrupt_at(monkeypatch, 3)
    sets = [f"model.name_or_path={tiny_model_dir}", f"run.output_dir={tmp_path / 'run'}"]
    code, _, err = _run(["train", config_file, "--set", *sets])
    assert code == 130
    assert _ours(err) == (
        "\nsteadyrl: interrupted at step 3; rerun the same command to start again (no checkpoint was saved yet)\n"
    )


def test_ctrl_c_while_loading(config_file, tmp_path, monkeypatch):
    from steadyrl.train import trainer

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer.Trainer, "__init__", interrupted)
    code, _, err = _run(["train", config_file, "--set", f"run.output_dir={tmp_path / 'run'}"])
    assert code == 130
    assert err == (
        "\nsteadyrl: interrupted before training started; rerun the same command to start again "
        "(no checkpoint was saved yet)\n"
    )


# ----------------------------------------------------------------------------- unreachable hub


@pytest.fixture
def unreachable_hub(monkeypatch, tmp_path):
    """The hub endpoint is a closed local port, the HF cache an empty directory, no proxy."""
    import huggingface_hub.constants as constants

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(loading, "_probe_cache", {}, raising=False)
    return tmp_path / "hf-cache"


def test_unreachable_hub_fails_fast_and_says_no_such_local_directory(unreachable_hub, monkeypatch, tmp_path):
    # Before: 5 retries per file with back-off (62 s in the setting), then a hub error only.
    monkeypatch.chdir(tmp_path)
    started = time.monotonic()
    for load in (load_tokenizer, load_model):
        with pytest.raises(ModelLoadError) as info:
            load("checkpoints/final")
        message = str(info.value)
        assert message.startswith(f"model 'checkpoints/final': no such local directory ({tmp_path / 'checkpoints/final'})")
        assert "Hugging Face hub, which is unreachable (127.0.0.1:" in message and "Connection refused" in message
    assert time.monotonic() - started < 10


def test_unreachable_hub_loads_a_cached_model(unreachable_hub, tiny_model_dir, monkeypatch):
    """A model in the local cache loads without waiting on the network: no retry backs off (before: 165 s of
    them). transformers' own adapter lookup still tries the endpoint once, which fails at once."""
    from huggingface_hub.utils import _http

    snapshot = unreachable_hub / "models--steadyrl-test--tiny" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_model_dir, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    loading.hub_unreachable_reason()  # the probe (one TCP connect) happens first and is cached

    def no_backoff(seconds):
        raise AssertionError(f"a hub request backed off {seconds} s for a cached model")

    monkeypatch.setattr(_http.time, "sleep", no_backoff)  # the hub's retries sleep between attempts
    tokenizer = load_tokenizer("steadyrl-test/tiny")
    model = load_model("steadyrl-test/tiny")
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)


def test_unreachable_hub_in_the_cli_is_one_line(unreachable_hub):
    code, _, err = _run(["eval", "Qwen/Qwen2.5-0.5B-Instruct", "--num-prompts", "1"])
    assert code == 2 and "no such local directory" in _one_line(err) and "unreachable" in err


def test_probe_is_skipped_when_offline_mode_is_set(unreachable_hub, monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("probed in offline mode"))
    assert loading.hub_unreachable_reason() == "HF_HUB_OFFLINE is set"


def test_probe_goes_to_the_proxy_when_one_is_set(unreachable_hub, monkeypatch):
    seen = []

    class Conn:
        def close(self):
            pass

    monkeypatch.setenv("HTTP_PROXY", "http://proxy.example:3128")  # the test endpoint is http://
    monkeypatch.setattr(socket, "create_connection", lambda address, timeout: seen.append(address) or Conn())
    assert loading.hub_unreachable_reason() is None
    assert seen == [("proxy.example", 3128)]


# ----------------------------------------------------------------------------- torchrun ranks


@pytest.mark.parametrize("rank,printed", [("0", True), ("1", False)])
def test_only_rank_0_prints_a_config_error(config_file, monkeypatch, rank, printed):
    monkeypatch.setenv("RANK", rank)
    code, out, err = _run(["train", config_file, "--set", "optim.lrr=1e-3"])
    assert code == 2 and out == ""  # every rank exits the same way
    assert (err != "") == printed


def test_torchrun_prints_a_config_error_once(config_file):
    # Before: one "steadyrl: error:" line per rank.
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "steadyrl.cli", "train",
         str(config_file), "--set", "optim.lrr=1e-3"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode != 0
    errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("steadyrl: error:")]
    assert errors == ["steadyrl: error: unknown key(s) 'lrr' in section 'optim'; valid keys: steps, lr, weight_decay, "
                      "betas, eps, warmup_steps, schedule, min_lr_ratio, grad_clip, mini_batches, epochs, "
                      "micro_batch_size, loss_scale."]


def test_paths_module_has_no_heavy_imports():
    """The output-path check runs before transformers is imported (it is what makes the check instant)."""
    result = subprocess.run(
        [sys.executable, "-c", "import sys, steadyrl.runtime.paths; print('transformers' in sys.modules)"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.stdout.strip() == "False", result.stderr
    assert paths.is_disk_full(OSError(errno.ENOSPC, "x"))


def test_ctrl_c_in_quickstart_does_not_promise_a_resume(tmp_path, monkeypatch):
    """quickstart replaces its previous run, so a rerun starts again, checkpoint or not."""
    _interrupt_at(monkeypatch, 2)
    sets = ["eval.every=0", "checkpoint.every=1", "rollout.prompts_per_step=4", "rollout.group_size=4",
            "logging.progress=false", "logging.tensorboard=false"]
    code, _, err = _run(["quickstart", "--out", tmp_path / "qs", "--set", *sets])
    assert code == 130
    assert _ours(err).endswith("\nsteadyrl: interrupted at step 2; rerun the same command to start again\n")
