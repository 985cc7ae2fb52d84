"""Prompt rows from Hugging Face ``datasets``: a local file or directory, or a hub name (``pip install
'steadyrl[data]'``).

``data`` is one of:
  * a file: ``.jsonl`` / ``.json``, ``.parquet``, ``.arrow``, ``.csv`` (its one split is ``train``; a ``.jsonl``
    file is read line by line without ``datasets``);
  * a directory: written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``, or holding data files
    (``train.jsonl``, ``test.parquet``, ...: ``datasets`` names the splits from the file names);
  * a mapping ``{split: file or [files]}``, e.g. ``{train: a.jsonl, test: b.jsonl}``;
  * a hub name (``openai/gsm8k``) with ``data_config`` (``main``) when the dataset has several.
A string that starts with ``/ . ~``, ends in a data-file suffix, or exists on disk is a local path and must
exist; anything else goes to the hub. Before a hub load the endpoint is probed for a few seconds, so that a
machine without network fails at once with the fix instead of after the client's retries.

The held-out split is a split name (``test``) or a fraction of the train rows (a seeded shuffle, the same for
the same seed). ``streaming`` reads rows lazily (nothing is converted or cached to disk) and keeps only the
first ``max_rows`` of each split: how to take a slice of a dataset too large to download.
"""

from __future__ import annotations

import os
import random
import socket
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from steadyrl.tasks.base import TaskError, jsonl_objects

DATA_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow", ".csv": "csv"}
_PROBE_S = 3.0
_OFFLINE_VALUES = ("1", "true", "yes", "on")


def import_datasets() -> Any:
    try:
        import datasets
    except ImportError as error:
        raise TaskError(
            "loading data with Hugging Face datasets needs the data extra; install it with "
            "pip install 'steadyrl[data]'"
        ) from error
    return datasets


def looks_local(data: str) -> bool:
    return (
        data.startswith(("/", ".", "~"))
        or "\\" in data
        or Path(data).suffix.lower() in DATA_FORMATS
        or os.path.exists(data)
    )


def hub_unreachable_reason(timeout_s: float = _PROBE_S) -> str | None:
    """None when the hub endpoint (``HF_ENDPOINT``) accepts a TCP connection within ``timeout_s``; else why not."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in _OFFLINE_VALUES:
        return None  # offline mode: datasets reads its cache and fails by itself, without network retries
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urlparse(endpoint)
    host = parsed.hostname or endpoint
    port = parsed.port or (80 if parsed.scheme == "http" else 443)
    failure: list[str] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout_s):
                pass
        except OSError as error:
            failure.append(f"{type(error).__name__}: {error}")

    # name resolution ignores socket timeouts, so the probe runs in a thread we stop waiting for
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        return f"no answer from {host}:{port} within {timeout_s:g} s"
    return f"cannot connect to {host}:{port} ({failure[0]})" if failure else None


def _format_of(files: list[str]) -> str:
    suffixes = {Path(f).suffix.lower() for f in files}
    formats = {DATA_FORMATS.get(s) for s in suffixes}
    if None in formats or len(formats) != 1:
        raise TaskError(
            f"cannot tell the format of {files}; use files ending in one of {sorted(DATA_FORMATS)} (one format)"
        )
    return formats.pop()


def _check_files(files: list[str]) -> None:
    for file in files:
        if not Path(file).expanduser().is_file():
            raise TaskError(f"data file {file} does not exist; pass an existing file, directory or a hub name")


def _open_split(
    data: str | dict[str, Any], split: str, *, data_config: str | None, streaming: bool, cache_dir: str | None
) -> Any:
    """The split as a ``datasets.Dataset`` (or ``IterableDataset`` when streaming).  Paths and formats are
    checked before ``datasets`` is imported, so a wrong path says so even without the data extra."""
    common: dict[str, Any] = {"split": split, "streaming": streaming}
    if cache_dir is not None:
        common["cache_dir"] = cache_dir
    if isinstance(data, dict):
        files = {name: [str(Path(f).expanduser()) for f in ([v] if isinstance(v, str) else list(v))] for name, v in data.items()}
        _check_files([f for fs in files.values() for f in fs])
        _require_split(split, sorted(files), str(data))
        file_format = _format_of([f for fs in files.values() for f in fs])
        return import_datasets().load_dataset(file_format, data_files=files, **common)
    if not isinstance(data, str) or not data:
        raise TaskError(f"data must be a path, a hub name or a {{split: file}} mapping, got {data!r}")
    if looks_local(data):
        path = Path(data).expanduser()
        if not path.exists():
            raise TaskError(
                f"data path {data} does not exist (relative paths start at {Path.cwd()}); pass an existing file "
                "or directory, or a hub name such as openai/gsm8k"
            )
        if path.is_file():
            _require_split(split, ["train"], data)
            file_format = _format_of([str(path)])
            return import_datasets().load_dataset(file_format, data_files={"train": str(path)}, **common)
        datasets = import_datasets()
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                _require_split(split, sorted(loaded), data)
                loaded = loaded[split]
            else:
                _require_split(split, ["train"], data)
            return loaded.to_iterable_dataset() if streaming else loaded
        return _load_with_split_check(datasets, str(path), data_config, common, data)
    reason = hub_unreachable_reason()
    if reason is not None:
        raise TaskError(
            f"data {data!r} is not a local path, so it would come from the Hugging Face hub, which is unreachable "
            f"({reason}); pass a local file or directory, check the network (or HF_ENDPOINT), or set HF_HUB_OFFLINE=1 "
            "to use a copy already in the datasets cache"
        )
    return _load_with_split_check(import_datasets(), data, data_config, common, data)


def _load_with_split_check(datasets: Any, name: str, data_config: str | None, common: dict, shown: str) -> Any:
    try:
        return datasets.load_dataset(name, data_config, **common)
    except ValueError as error:
        if "split" in str(error).lower():
            raise TaskError(f"data {shown}: {error}; set `split` / `eval_split` to one of its splits") from error
        raise TaskError(f"data {shown} could not be loaded ({type(error).__name__}: {error})") from error
    except (OSError, ConnectionError) as error:  # not found, no network, gated
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise TaskError(
            f"data {shown!r} could not be loaded ({type(error).__name__}: {first}); check the name (and "
            "data_config), the network or HF_TOKEN for gated sets, or pass a local path"
        ) from error


def _require_split(split: str, available: list[str], shown: str) -> None:
    if split not in available:
        raise TaskError(f"data {shown} has no split {split!r}; its splits are {available}")


def load_rows(
    data: str | dict[str, Any],
    split: str = "train",
    *,
    data_config: str | None = None,
    streaming: bool = False,
    max_rows: int | None = None,
    cache_dir: str | None = None,
) -> list[dict[str, Any]]:
    """The rows of one split as plain dicts, at most ``max_rows`` (the first ones, in file order)."""
    if max_rows is not None and max_rows < 1:
        raise TaskError(f"max_rows must be >= 1 (or None for every row), got {max_rows}")
    if isinstance(data, str) and Path(data).suffix.lower() == ".jsonl" and Path(data).expanduser().is_file():
        _require_split(split, ["train"], data)
        return read_jsonl_rows(Path(data).expanduser(), max_rows)
    dataset = _open_split(data, split, data_config=data_config, streaming=streaming, cache_dir=cache_dir)
    if max_rows is not None:
        dataset = dataset.take(max_rows) if streaming else dataset.select(range(min(max_rows, len(dataset))))
    rows = list(dataset) if streaming else dataset.to_list()
    if not rows:
        raise TaskError(f"data {data} split {split!r} has no rows")
    return rows


def read_jsonl_rows(path: Path, max_rows: int | None = None) -> list[dict[str, Any]]:
    """JSON objects of a JSONL file, read line by line (no datasets needed); errors name the line."""
    rows: list[dict[str, Any]] = []
    for _, row in jsonl_objects(path):
        if max_rows is not None and len(rows) >= max_rows:
            break
        rows.append(row)
    if not rows:
        raise TaskError(f"{path} has no rows")
    return rows


def hold_out(rows: list[Any], fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """(train, eval): a seeded ``fraction`` of ``rows`` held out (at least one row each side), order kept."""
    if not 0.0 < fraction < 1.0:
        raise TaskError(f"eval_split as a fraction must be in (0, 1), got {fraction}")
    if len(rows) < 2:
        raise TaskError(f"the data has {len(rows)} row; need at least 2 to hold out an eval split")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    num_eval = min(max(1, round(fraction * len(rows))), len(rows) - 1)
    held = set(order[:num_eval])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]
