"""Where a run writes: checks that fail in one sentence before a model is loaded, and the disk-full reading.

``check_writable_dir(path, what)`` refuses an output path that is a file, lies under a file, or sits in a
directory this process cannot write, by creating (and removing) a probe file in the nearest existing
directory, so permission bits, read-only mounts and ACLs are all covered. Nothing else is created.

``disk_full_message(exc, fallback)`` recognises a write that failed for lack of space: ``OSError`` with
``errno.ENOSPC`` (or ``EDQUOT``) anywhere in the exception chain, and the ``RuntimeError`` torch raises when
its zip writer loses bytes (``unexpected pos`` / ``file write failed``), which names no path.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

from steadyrl.config import ConfigError

_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_TORCH_WRITE_FAILED = ("unexpected pos", "file write failed", "No space left on device")


def check_writable_dir(path: str | Path, what: str = "run.output_dir") -> None:
    """Raise ConfigError unless ``path`` is, or can be created as, a directory this process can write in."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what} {path} is a file, not a directory; choose a directory path for {what}.")
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise ConfigError(
            f"{what} {path} cannot be created because {existing} is a file; choose a path under a directory."
        )
    try:
        fd, probe = tempfile.mkstemp(prefix=".steadyrl-write-probe-", dir=existing)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(
            f"{what} {path} is not writable ({existing}: {reason}); choose a directory you can write to."
        ) from exc
    os.close(fd)
    os.unlink(probe)


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from) is a write that ran out of space."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _NO_SPACE:
            return True
        if isinstance(current, RuntimeError) and any(s in str(current) for s in _TORCH_WRITE_FAILED):
            return True
        current = current.__cause__ or current.__context__
    return False


def disk_full_message(exc: BaseException, fallback: str | Path) -> str | None:
    """"disk full while writing PATH (N MB free)" for a disk-full ``exc``, else None. PATH is the file the
    OSError names, else ``fallback`` (torch's own error names no file)."""
    if not is_disk_full(exc):
        return None
    where = None
    current: BaseException | None = exc
    while current is not None and where is None:
        if isinstance(current, OSError) and current.filename:
            where = str(current.filename)
        current = current.__cause__ or current.__context__
    where = where or str(fallback)
    free = _free_bytes(where)
    room = f" ({free / 2**20:.0f} MB free there)" if free is not None else ""
    return f"disk full while writing {where}{room}"


def _free_bytes(path: str) -> int | None:
    candidate = Path(path)
    while not candidate.exists() and candidate.parent != candidate:
        candidate = candidate.parent
    try:
        return shutil.disk_usage(candidate).free
    except OSError:
        return None
