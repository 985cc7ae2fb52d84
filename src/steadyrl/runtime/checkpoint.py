"""Atomic, exactly-resumable training checkpoints, and an atomic Hugging Face export.

Layout of ``RUN_DIR/checkpoints/``::

    step-00000040/  model.pt  optimizer.pt  scheduler.pt  state.pt  rng.pt  meta.json  [hf/  hf-adapter/]
    step-00000050/  ...
    latest          text file holding "step-00000050"

``exports`` adds directories that are not resumable state but belong to the step, e.g. the policy in Hugging
Face format (``hf/``, which ``from_pretrained`` loads while the run goes on): they are written inside the same
temporary directory, so they appear, and are pruned, together with the checkpoint.

Every file is written with ``torch.save`` (bit-exact tensors, any state-dict layout) into a temporary
sibling ``.tmp-step-XXXXXXXX`` and fsync'ed; the directory is then renamed into place (atomic on POSIX),
the parent fsync'ed, ``latest`` replaced atomically, and only then are old checkpoints pruned. A crash at
any point leaves the previous ``latest`` checkpoint complete and loadable; ``.tmp-*`` leftovers are ignored
by readers and removed by the next save.

``rng.pt`` holds the torch CPU generator, every CUDA generator (when CUDA is available), numpy's global
``RandomState`` and Python's ``random`` state, so that after ``load_checkpoint`` the next draws equal those
of an uninterrupted run. All files load with ``torch.load(weights_only=True)``; ``extra`` should therefore
hold plain containers, numbers, strings and tensors (or pass ``weights_only=False`` for a trusted file).

Distributed runs: call ``save_checkpoint`` on rank 0 only (after the optimizer step, with the unwrapped or
DDP-wrapped model; ``.module`` / ``._orig_mod`` wrappers are unwrapped here). No collective is called
inside, so the caller adds a barrier if other ranks must wait for the files. Sharded (FSDP) state is gathered
by the caller first (every rank takes part; ``runtime/fsdp.py``) and passed in as full state dicts. Every rank calls ``load_checkpoint`` and gets the same state; CUDA RNG states are restored for as
many devices as both the checkpoint and this process have.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from steadyrl._io import fsync_dir
from steadyrl.config import ConfigError

CHECKPOINT_DIR = "checkpoints"
LATEST_FILE = "latest"
META_FILE = "meta.json"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"step-(\d{8,})")
_EXPORT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


def _save_synced(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _write_text_synced(text: str, path: Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_tree(root: Path) -> None:
    """fsync every file under ``root`` and every directory, deepest first (``root`` included)."""
    for file in root.rglob("*"):
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
    for directory in sorted((d for d in root.rglob("*") if d.is_dir()), key=lambda d: -len(d.parts)):
        fsync_dir(directory)
    fsync_dir(root)


def _unwrap(model: nn.Module) -> nn.Module:
    """The module whose state dict has plain parameter names (DDP ``.module``, torch.compile ``._orig_mod``)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


# ----------------------------------------------------------------------------- RNG state


def capture_rng_state() -> dict[str, Any]:
    """Torch CPU, all CUDA, numpy global and Python ``random`` states, in weights_only-loadable form."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    return {
        "torch_cpu": torch.get_rng_state(),
        "torch_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "kind": str(np_kind),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),  # uint32 values fit in int64
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "python": {"version": py_version, "internal": list(py_internal), "gauss_next": py_gauss},
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of ``capture_rng_state``."""
    torch.set_rng_state(state["torch_cpu"])
    cuda_states = state.get("torch_cuda") or []
    if cuda_states and torch.cuda.is_available():
        count = torch.cuda.device_count()
        if len(cuda_states) != count:
            warnings.warn(
                f"checkpoint holds {len(cuda_states)} CUDA RNG states but {count} devices are visible; "
                f"restoring the first {min(count, len(cuda_states))}.",
                stacklevel=2,
            )
        for index, cuda_state in enumerate(cuda_states[:count]):
            torch.cuda.set_rng_state(cuda_state, device=index)
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["kind"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    py_state = state["python"]
    random.setstate((py_state["version"], tuple(py_state["internal"]), py_state["gauss_next"]))


# ----------------------------------------------------------------------------- listing


def _is_complete(path: Path) -> bool:
    return path.is_dir() and (path / META_FILE).is_file()


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints ``(step, path)`` in increasing step order; ``.tmp-*`` dirs are ignored."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.fullmatch(path.name)
        if match and _is_complete(path):
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint ``latest`` names; if that is missing or incomplete, the highest complete step; else None."""
    root = Path(run_dir) / CHECKPOINT_DIR
    latest_file = root / LATEST_FILE
    if latest_file.is_file():
        name = latest_file.read_text(encoding="utf-8").strip()
        if _STEP_DIR.fullmatch(name) and _is_complete(root / name):
            return root / name
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def _remove_leftovers(root: Path) -> None:
    for path in root.glob(".tmp-*"):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- save / load


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    extra: dict[str, Any] | None = None,
    keep_last: int | None = 2,
    exports: Mapping[str, Callable[[Path], Any]] | None = None,
) -> Path:
    """Write ``RUN_DIR/checkpoints/step-{step:08d}/`` atomically, point ``latest`` at it, prune old ones.

    ``keep_last``: how many checkpoints with step <= ``step`` survive (this one included); None keeps all.
    ``exports``: ``{name: write(path)}``; each ``write`` creates the directory ``path`` (``step-N/name``, e.g.
    ``model.save_pretrained``) before the checkpoint is complete; loading ignores them.
    Checkpoints with a higher step (left by an abandoned branch of a resumed run) are not touched.
    Saving a step that already exists replaces it. Call on rank 0 only. Returns the checkpoint path.
    """
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 (or None to keep every checkpoint), got {keep_last}.")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}.")
    for export_name in exports or {}:
        if not _EXPORT_NAME.fullmatch(export_name):
            raise ValueError(f"export name {export_name!r} must be a plain directory name (letters, digits, _ and -).")
    root = Path(run_dir) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(root)

    name = checkpoint_name(step)
    final = root / name
    tmp = root / f".tmp-{name}"
    tmp.mkdir()
    files = ["model.pt"]
    _save_synced(_unwrap(model).state_dict(), tmp / "model.pt")
    if optimizer is not None:
        _save_synced(optimizer.state_dict(), tmp / "optimizer.pt")
        files.append("optimizer.pt")
    if scheduler is not None:
        _save_synced(scheduler.state_dict(), tmp / "scheduler.pt")
        files.append("scheduler.pt")
    _save_synced({"step": int(step), "extra": dict(extra or {})}, tmp / "state.pt")
    _save_synced(capture_rng_state(), tmp / "rng.pt")
    files += ["state.pt", "rng.pt"]
    for export_name, write in (exports or {}).items():
        write(tmp / export_name)
        _fsync_tree(tmp / export_name)
        files.append(f"{export_name}/")
    # meta.json last: a directory that has it is complete.
    meta = {"format_version": FORMAT_VERSION, "step": int(step), "files": files}
    _write_text_synced(json.dumps(meta, indent=1) + "\n", tmp / META_FILE)
    fsync_dir(tmp)

    if final.exists():  # re-saving a step: move the old copy aside (a .tmp-* name, so it is cleaned later)
        old = root / f".tmp-old-{name}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(root)

    latest_tmp = root / f".tmp-{LATEST_FILE}"
    _write_text_synced(name + "\n", latest_tmp)
    os.replace(latest_tmp, root / LATEST_FILE)
    fsync_dir(root)

    if keep_last is not None:
        older = [(s, p) for s, p in list_checkpoints(run_dir) if s <= step]
        for _, path in older[:-keep_last]:
            shutil.rmtree(path, ignore_errors=True)
    return final


def load_checkpoint(
    path: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    map_location: str | torch.device = "cpu",
    restore_rng: bool = True,
    weights_only: bool = True,
) -> dict[str, Any]:
    """Load a checkpoint directory into ``model`` (strict) / ``optimizer`` / ``scheduler``; restore RNGs.

    Returns ``{"step": int, "extra": dict}``. Asking for optimizer or scheduler state that the checkpoint
    does not hold is an error; state the caller does not ask for is ignored.
    """
    path = Path(path)
    if not _is_complete(path):
        raise FileNotFoundError(
            f"{path} is not a complete steadyrl checkpoint (no {META_FILE}); "
            "use latest_checkpoint(run_dir) to find the newest complete one."
        )

    def load(file: str) -> Any:
        return torch.load(path / file, map_location=map_location, weights_only=weights_only)

    for wanted, file in ((optimizer, "optimizer.pt"), (scheduler, "scheduler.pt")):
        if wanted is not None and not (path / file).is_file():
            raise FileNotFoundError(f"{path} holds no {file}; it was saved without that state, pass None.")

    _unwrap(model).load_state_dict(load("model.pt"))
    if optimizer is not None:
        optimizer.load_state_dict(load("optimizer.pt"))
    if scheduler is not None:
        scheduler.load_state_dict(load("scheduler.pt"))
    state = load("state.pt")
    if restore_rng:
        # the generator states must stay on the CPU whatever map_location says
        restore_rng_state(torch.load(path / "rng.pt", map_location="cpu", weights_only=weights_only))
    return {"step": int(state["step"]), "extra": state["extra"]}


EXPORT_MANIFEST = ".steadyrl-export"
"""The file names an export wrote, so that the next export may replace exactly those and nothing else."""


def _export_manifest(out_dir: Path) -> list[str]:
    try:
        return list(json.loads((out_dir / EXPORT_MANIFEST).read_text())["files"])
    except (OSError, ValueError, KeyError):
        return []


def save_pretrained_atomic(model: Any, tokenizer: Any | None, out_dir: str | Path) -> Path:
    """Export a Hugging Face model (+ tokenizer) with ``save_pretrained`` into ``out_dir`` atomically.

    Written into a temporary sibling, fsync'ed, then renamed; an existing ``out_dir`` is replaced only after
    the new export is complete, and only when it holds nothing but what an export writes: a directory with
    other files (a user's notes, code) is refused and left as it was. Call on rank 0 only, with the unwrapped
    model. Returns ``out_dir``.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".tmp-{out_dir.name}")
    old = out_dir.with_name(f".tmp-old-{out_dir.name}")
    for leftover in (tmp, old):
        if leftover.exists():
            shutil.rmtree(leftover)
    tmp.mkdir()
    _unwrap(model).save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    _fsync_tree(tmp)
    written = sorted(p.name for p in tmp.iterdir())
    _write_text_synced(json.dumps({"written_by": "steadyrl", "files": written}) + "\n", tmp / EXPORT_MANIFEST)
    if out_dir.exists():
        ours = set(written) | {EXPORT_MANIFEST} | set(_export_manifest(out_dir))
        foreign = sorted({p.name for p in out_dir.iterdir()} - ours)
        if foreign:
            shutil.rmtree(tmp)
            raise ConfigError(
                f"{out_dir} holds files a model export does not write ({', '.join(foreign[:3])}); choose another "
                "directory (nothing was changed)."
            )
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out_dir)
    fsync_dir(out_dir.parent)
    return out_dir
