"""Prompt rows from files, directories and split mappings through Hugging Face datasets; the held-out split;
streaming; the hub path's error when offline (no downloads).

Run: .venv/bin/python -m pytest -q tests/tasks/test_hf_data.py
"""

from __future__ import annotations

import json
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from extras import requires_extra
from steadyrl.tasks import TaskError
from steadyrl.tasks.hf_data import hold_out, hub_unreachable_reason, load_rows

needs_data_extra = requires_extra("data", "datasets")
ROWS = [{"id": f"r{i}", "question": f"What is {i}+1?", "answer": str(i + 1)} for i in range(10)]


def write_jsonl(path, rows=ROWS):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def cache(tmp_path):
    return str(tmp_path / "hf-cache")


def test_jsonl_needs_no_extra(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl")
    assert load_rows(str(path)) == ROWS
    assert load_rows(str(path), max_rows=3) == ROWS[:3]
    with pytest.raises(TaskError, match=r"has no split 'test'; its splits are \['train'\]"):
        load_rows(str(path), "test")
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\n[1]\n')
    with pytest.raises(TaskError, match="line 2 is a JSON list, not an object"):
        load_rows(str(tmp_path / "bad.jsonl"))


@needs_data_extra
def test_parquet_and_arrow_files(tmp_path, cache):
    import datasets
    import pyarrow.ipc as ipc

    dataset = datasets.Dataset.from_list(ROWS)
    dataset.to_parquet(tmp_path / "d.parquet")
    with ipc.new_stream(tmp_path / "d.arrow", dataset.data.table.schema) as writer:
        writer.write_table(dataset.data.table)
    for name in ("d.parquet", "d.arrow"):
        assert load_rows(str(tmp_path / name), cache_dir=cache) == ROWS
        assert load_rows(str(tmp_path / name), max_rows=4, cache_dir=cache) == ROWS[:4]


@needs_data_extra
def test_save_to_disk_directory_with_splits(tmp_path):
    import datasets

    datasets.DatasetDict(
        train=datasets.Dataset.from_list(ROWS[:7]), test=datasets.Dataset.from_list(ROWS[7:])
    ).save_to_disk(tmp_path / "dd")
    assert load_rows(str(tmp_path / "dd"), "test") == ROWS[7:]
    assert load_rows(str(tmp_path / "dd"), "train", streaming=True, max_rows=2) == ROWS[:2]
    with pytest.raises(TaskError, match=r"no split 'validation'; its splits are \['test', 'train'\]"):
        load_rows(str(tmp_path / "dd"), "validation")
    datasets.Dataset.from_list(ROWS).save_to_disk(tmp_path / "single")
    assert load_rows(str(tmp_path / "single")) == ROWS


@needs_data_extra
def test_split_mapping_and_data_file_directory(tmp_path, cache):
    train, test = write_jsonl(tmp_path / "train.jsonl", ROWS[:6]), write_jsonl(tmp_path / "test.jsonl", ROWS[6:])
    mapping = {"train": str(train), "test": [str(test)]}
    assert load_rows(mapping, "test", cache_dir=cache) == ROWS[6:]
    with pytest.raises(TaskError, match=r"no split 'dev'"):
        load_rows(mapping, "dev", cache_dir=cache)
    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", ROWS[:6])
    write_jsonl(folder / "test.jsonl", ROWS[6:])
    assert load_rows(str(folder), "test", cache_dir=cache) == ROWS[6:]


@needs_data_extra
def test_streaming_reads_the_same_first_rows(tmp_path, cache):
    import datasets

    datasets.Dataset.from_list(ROWS).to_parquet(tmp_path / "d.parquet")
    path = str(tmp_path / "d.parquet")
    streamed = load_rows(path, streaming=True, max_rows=5, cache_dir=cache)
    assert not any((tmp_path / "hf-cache").rglob("*.arrow"))  # nothing was converted into the cache
    assert streamed == load_rows(path, max_rows=5, cache_dir=cache) == ROWS[:5]


def test_local_path_errors(tmp_path):
    with pytest.raises(TaskError, match="data path ./nowhere.jsonl does not exist"):
        load_rows("./nowhere.jsonl")
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(TaskError, match="cannot tell the format"):
        load_rows({"train": str(tmp_path / "d.txt")})
    with pytest.raises(TaskError, match="max_rows must be >= 1"):
        load_rows(str(tmp_path / "d.txt"), max_rows=0)


@needs_data_extra
def test_hub_name_offline_mode_fails_with_the_fix(monkeypatch, tmp_path):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # the libraries read the variable when imported, which may have happened earlier in this session
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    start = time.monotonic()
    with pytest.raises(TaskError, match="steadyrl-test/absent-set' could not be loaded .*pass a local path"):
        load_rows("steadyrl-test/absent-set", cache_dir=str(tmp_path / "c"))
    assert time.monotonic() - start < 10.0


def test_hub_name_without_network_fails_fast(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens there
    start = time.monotonic()
    assert "cannot connect to 127.0.0.1:9" in hub_unreachable_reason()
    with pytest.raises(TaskError, match="from the Hugging Face hub, which is unreachable .*HF_HUB_OFFLINE=1"):
        load_rows("steadyrl-test/absent-set")
    assert time.monotonic() - start < 10.0


def test_offline_mode_skips_the_probe(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    assert hub_unreachable_reason() is None


def test_hold_out_is_seeded():
    train, held = hold_out(list(range(10)), 0.3, seed=0)
    assert len(held) == 3 and sorted(train + held) == list(range(10))
    assert hold_out(list(range(10)), 0.3, seed=0) == (train, held)
    assert hold_out(list(range(10)), 0.3, seed=1) != (train, held)
    with pytest.raises(TaskError, match=r"in \(0, 1\)"):
        hold_out([1, 2], 1.0, 0)
    with pytest.raises(TaskError, match="at least 2"):
        hold_out([1], 0.5, 0)


@given(st.integers(2, 200), st.floats(0.01, 0.99), st.integers(0, 10**6))
def test_hold_out_partitions(n, fraction, seed):
    rows = list(range(n))
    train, held = hold_out(rows, fraction, seed)
    assert train and held and sorted(train + held) == rows  # disjoint, complete, order kept within each side
    assert train == sorted(train) and held == sorted(held)
    assert len(held) == min(max(1, round(fraction * n)), n - 1)
