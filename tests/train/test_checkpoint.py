"""Checkpoints: exact round trip and resume, RNG restore, crash atomicity, keep_last pruning, HF export.

Run: .venv/bin/python -m pytest -q tests/train/test_checkpoint.py   (add `-m slow` for the real HF export)
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from torch import nn

from steadyrl.runtime import checkpoint as ckpt
from steadyrl.runtime.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    save_pretrained_atomic,
)


class TinyPolicy(nn.Module):
    """Dropout makes the forward consume the torch RNG, so a wrong RNG restore changes the trajectory."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Dropout(0.3), nn.Linear(8, 2))

    def forward(self, x):
        return self.net(x)


def _make(seed: int = 0):
    torch.manual_seed(seed)
    model = TinyPolicy()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    return model, optimizer, scheduler


def _train_step(model, optimizer, scheduler) -> None:
    # Data drawn from all three RNGs, as a trainer's sampler / shuffler might.
    x = torch.rand(5, 4) + float(np.random.rand()) + random.random()
    loss = model(x).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    scheduler.step()


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _draws():
    return (
        torch.rand(3),
        torch.randn(3),
        random.random(),
        random.gauss(0, 1),
        np.random.rand(3),
        np.random.randn(3),
    )


def _assert_draws_equal(a, b) -> None:
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[2] == b[2] and a[3] == b[3]
    np.testing.assert_array_equal(a[4], b[4])
    np.testing.assert_array_equal(a[5], b[5])


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


# ----------------------------------------------------------------------------- layout and round trip


def test_layout_and_latest_pointer(tmp_path):
    model, optimizer, scheduler = _make()
    path = save_checkpoint(tmp_path, 7, model=model, optimizer=optimizer, scheduler=scheduler, extra={"a": 1})
    assert path == tmp_path / "checkpoints" / "step-00000007"
    names = sorted(p.name for p in path.iterdir())
    assert names == ["meta.json", "model.pt", "optimizer.pt", "rng.pt", "scheduler.pt", "state.pt"]
    meta = json.loads((path / "meta.json").read_text())
    assert meta["step"] == 7 and meta["format_version"] == 1
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-00000007"
    assert latest_checkpoint(tmp_path) == path
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_model_only_checkpoint(tmp_path):
    model, _, _ = _make(0)
    path = save_checkpoint(tmp_path, 0, model=model)
    assert not (path / "optimizer.pt").exists()
    other, optimizer, _ = _make(1)
    assert load_checkpoint(path, model=other) == {"step": 0, "extra": {}}
    assert all(torch.equal(a, b) for a, b in zip(_params(model), _params(other)))
    with pytest.raises(FileNotFoundError, match="optimizer.pt"):
        load_checkpoint(path, model=other, optimizer=optimizer)


def test_round_trip_restores_every_state_exactly(tmp_path):
    model, optimizer, scheduler = _make(0)
    for _ in range(3):
        _train_step(model, optimizer, scheduler)
    extra = {"sampler_epoch": 2, "order": [3, 1, 2], "name": "run", "ema": torch.tensor([0.5, 0.25])}
    path = save_checkpoint(tmp_path, 3, model=model, optimizer=optimizer, scheduler=scheduler, extra=extra)

    other_model, other_opt, other_sched = _make(1)
    out = load_checkpoint(path, model=other_model, optimizer=other_opt, scheduler=other_sched)
    assert out["step"] == 3
    assert out["extra"]["order"] == [3, 1, 2] and out["extra"]["name"] == "run"
    assert torch.equal(out["extra"]["ema"], extra["ema"])
    assert all(torch.equal(a, b) for a, b in zip(_params(model), _params(other_model)))
    for p, q in zip(model.parameters(), other_model.parameters()):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(optimizer.state[p][key], other_opt.state[q][key])
    assert other_sched.last_epoch == 3 and other_sched.get_last_lr() == scheduler.get_last_lr()


class CompiledLike(nn.Module):
    """Holds the model as ``_orig_mod`` like torch.compile's OptimizedModule (without compiling anything)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self._orig_mod = model


@pytest.mark.parametrize("wrap", [CompiledLike, nn.DataParallel, lambda m: nn.DataParallel(CompiledLike(m))])
def test_wrappers_are_unwrapped(tmp_path, wrap):
    model, _, _ = _make(0)
    wrapped = wrap(model)
    assert set(wrapped.state_dict()) != set(model.state_dict())  # the wrapper would add a name prefix
    path = save_checkpoint(tmp_path, 1, model=wrapped)
    keys = torch.load(path / "model.pt", weights_only=True).keys()
    assert set(keys) == set(model.state_dict())  # plain names, loadable without the wrapper
    plain, _, _ = _make(1)
    load_checkpoint(path, model=plain)
    assert all(torch.equal(a, b) for a, b in zip(_params(model), _params(plain)))
    other, _, _ = _make(2)
    load_checkpoint(path, model=wrap(other))  # and into a wrapped model too
    assert all(torch.equal(a, b) for a, b in zip(_params(model), _params(other)))


# ----------------------------------------------------------------------------- RNG and exact resume


def test_rng_restore_gives_the_same_next_draws(tmp_path):
    model, _, _ = _make()
    _seed_all(123)
    np.random.randn()  # leave a cached gaussian in numpy's state
    random.gauss(0, 1)  # and in Python's
    save_checkpoint(tmp_path, 1, model=model)
    expected = _draws()
    _draws()  # move every generator on
    load_checkpoint(latest_checkpoint(tmp_path), model=model)
    _assert_draws_equal(_draws(), expected)


def test_restore_rng_false_leaves_generators_alone(tmp_path):
    model, _, _ = _make()
    _seed_all(5)
    save_checkpoint(tmp_path, 1, model=model)
    _seed_all(6)
    expected = _draws()
    _seed_all(6)
    load_checkpoint(latest_checkpoint(tmp_path), model=model, restore_rng=False)
    _assert_draws_equal(_draws(), expected)


def test_resume_is_bit_exact(tmp_path):
    total, cut = 6, 3
    _seed_all(0)
    model, optimizer, scheduler = _make(0)
    for _ in range(total):
        _train_step(model, optimizer, scheduler)
    reference = _params(model)
    reference_next = _draws()

    _seed_all(0)
    model, optimizer, scheduler = _make(0)
    for _ in range(cut):
        _train_step(model, optimizer, scheduler)
    save_checkpoint(tmp_path, cut, model=model, optimizer=optimizer, scheduler=scheduler)
    _train_step(model, optimizer, scheduler)  # work lost in the "crash"

    _seed_all(999)  # a fresh process with a different seed
    model, optimizer, scheduler = _make(42)
    step = load_checkpoint(
        latest_checkpoint(tmp_path), model=model, optimizer=optimizer, scheduler=scheduler
    )["step"]
    for _ in range(step, total):
        _train_step(model, optimizer, scheduler)
    assert all(torch.equal(a, b) for a, b in zip(reference, _params(model)))
    _assert_draws_equal(_draws(), reference_next)


# ----------------------------------------------------------------------------- atomicity


def _save_two(tmp_path):
    model, optimizer, scheduler = _make(0)
    save_checkpoint(tmp_path, 1, model=model, optimizer=optimizer, scheduler=scheduler, extra={"tag": "one"})
    _train_step(model, optimizer, scheduler)
    return model, optimizer, scheduler


def _assert_step_one_is_latest_and_loads(tmp_path):
    path = latest_checkpoint(tmp_path)
    assert path is not None and path.name == "step-00000001"
    model, optimizer, scheduler = _make(3)
    loaded = load_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler)
    assert loaded == {"step": 1, "extra": {"tag": "one"}}


@pytest.mark.parametrize("failing_call", [1, 2, 4, 5])  # model.pt, optimizer.pt, state.pt, rng.pt
def test_crash_while_writing_files_keeps_previous_checkpoint(tmp_path, monkeypatch, failing_call):
    model, optimizer, scheduler = _save_two(tmp_path)
    real_save = torch.save
    calls = {"n": 0}

    def flaky_save(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == failing_call:
            f.write(b"half a tensor")  # a partly written file, then the crash
            raise OSError("disk full")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "save", flaky_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 2, model=model, optimizer=optimizer, scheduler=scheduler)
    monkeypatch.setattr(ckpt.torch, "save", real_save)

    root = tmp_path / "checkpoints"
    assert (root / ".tmp-step-00000002").is_dir()  # the leftover is there ...
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1]  # ... and ignored
    _assert_step_one_is_latest_and_loads(tmp_path)

    save_checkpoint(tmp_path, 2, model=model, optimizer=optimizer, scheduler=scheduler)
    assert not list(root.glob(".tmp-*"))  # cleaned by the next save
    assert latest_checkpoint(tmp_path).name == "step-00000002"


@pytest.mark.parametrize("failing_target", ["step-00000002", "latest"])
def test_crash_at_rename_keeps_previous_latest(tmp_path, monkeypatch, failing_target):
    model, optimizer, scheduler = _save_two(tmp_path)
    real_replace = ckpt.os.replace

    def flaky_replace(src, dst):
        if str(dst).endswith(failing_target):
            raise OSError("power cut")
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", flaky_replace)
    with pytest.raises(OSError, match="power cut"):
        save_checkpoint(tmp_path, 2, model=model, optimizer=optimizer, scheduler=scheduler)
    monkeypatch.setattr(ckpt.os, "replace", real_replace)
    _assert_step_one_is_latest_and_loads(tmp_path)


def test_latest_falls_back_to_newest_complete_checkpoint(tmp_path):
    model, _, _ = _make()
    for step in (1, 2):
        save_checkpoint(tmp_path, step, model=model, keep_last=None)
    root = tmp_path / "checkpoints"
    (root / "latest").write_text("step-00000009\n")  # names a checkpoint that does not exist
    assert latest_checkpoint(tmp_path).name == "step-00000002"
    (root / "latest").unlink()
    assert latest_checkpoint(tmp_path).name == "step-00000002"
    (root / "step-00000002" / "meta.json").unlink()  # incomplete dirs are never returned
    assert latest_checkpoint(tmp_path).name == "step-00000001"
    with pytest.raises(FileNotFoundError, match="not a complete"):
        load_checkpoint(root / "step-00000002", model=model)


def test_no_checkpoint(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    assert list_checkpoints(tmp_path) == []


def test_resaving_a_step_replaces_it(tmp_path):
    model, optimizer, scheduler = _make(0)
    save_checkpoint(tmp_path, 4, model=model, extra={"version": 1})
    save_checkpoint(tmp_path, 4, model=model, extra={"version": 2})
    assert load_checkpoint(latest_checkpoint(tmp_path), model=model)["extra"] == {"version": 2}
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4]
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


# ----------------------------------------------------------------------------- pruning


def test_keep_last_prunes_oldest(tmp_path):
    model, _, _ = _make()
    for step in range(1, 6):
        save_checkpoint(tmp_path, step, model=model, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 5]
    save_checkpoint(tmp_path, 6, model=model, keep_last=1)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [6]


def test_keep_last_none_keeps_all_and_zero_is_rejected(tmp_path):
    model, _, _ = _make()
    for step in range(3):
        save_checkpoint(tmp_path, step, model=model, keep_last=None)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [0, 1, 2]
    with pytest.raises(ValueError, match="keep_last"):
        save_checkpoint(tmp_path, 3, model=model, keep_last=0)


def test_pruning_leaves_later_steps_of_an_abandoned_branch(tmp_path):
    model, _, _ = _make()
    for step in (2, 4, 10):
        save_checkpoint(tmp_path, step, model=model, keep_last=None)
    # resumed from step 4 and saving step 5: step 10 is not "older", the new save becomes latest
    save_checkpoint(tmp_path, 5, model=model, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 5, 10]
    assert latest_checkpoint(tmp_path).name == "step-00000005"


# ----------------------------------------------------------------------------- HF export


class FakePretrained:
    """Duck-typed stand-in for a HF model / tokenizer: save_pretrained writes named files."""

    def __init__(self, files: dict[str, str], fail: bool = False) -> None:
        self.files, self.fail = files, fail

    def save_pretrained(self, directory) -> None:
        for name, text in self.files.items():
            (directory / name).write_text(text)
            if self.fail:
                raise OSError("disk full")


def test_save_pretrained_atomic_writes_and_replaces(tmp_path):
    out = tmp_path / "final"
    save_pretrained_atomic(FakePretrained({"model.bin": "v1"}), FakePretrained({"tok.json": "t1"}), out)
    assert (out / "model.bin").read_text() == "v1" and (out / "tok.json").read_text() == "t1"
    save_pretrained_atomic(FakePretrained({"model.bin": "v2"}), None, out)
    assert sorted(p.name for p in out.iterdir()) == [".steadyrl-export", "model.bin"]  # replaced whole, nothing stale
    assert (out / "model.bin").read_text() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_save_pretrained_atomic_crash_keeps_previous_export(tmp_path):
    out = tmp_path / "final"
    save_pretrained_atomic(FakePretrained({"model.bin": "v1"}), FakePretrained({"tok.json": "t1"}), out)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained_atomic(
            FakePretrained({"model.bin": "v2"}), FakePretrained({"tok.json": "t2"}, True), out
        )
    assert (out / "model.bin").read_text() == "v1" and (out / "tok.json").read_text() == "t1"
    save_pretrained_atomic(FakePretrained({"model.bin": "v3"}), None, out)  # the leftover is cleaned
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


@pytest.mark.slow  # importing transformers' model classes takes several seconds on a small CPU
def test_save_pretrained_atomic_real_hf_round_trip(tmp_path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        GPT2Config,
        GPT2LMHeadModel,
        PreTrainedTokenizerFast,
    )

    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=1, n_embd=8, n_head=2, vocab_size=4, n_positions=8, bos_token_id=1, eos_token_id=1
    )
    model = GPT2LMHeadModel(config)
    vocab = {"[UNK]": 0, "<eos>": 1, "a": 2, "b": 3}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="[UNK]")), unk_token="[UNK]", eos_token="<eos>"
    )
    out = save_pretrained_atomic(model, tokenizer, tmp_path / "final")
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    assert AutoTokenizer.from_pretrained(out).convert_tokens_to_ids("b") == 3
