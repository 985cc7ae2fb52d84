"""MetricLogger / read_metrics: jsonl round trip, non-finite values, crash tolerance, resume, TensorBoard, W&B.

Run: .venv/bin/python -m pytest -q tests/report/test_sinks.py
"""

from __future__ import annotations

import builtins
import json
import math
import sys
import types

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from steadyrl.config import ConfigError
from steadyrl.report import sinks
from steadyrl.report.sinks import METRICS_FILE, MetricLogger, read_metrics


def _lines(run_dir):
    return (run_dir / METRICS_FILE).read_text().splitlines()


def test_round_trip_with_non_finite_values(tmp_path):
    with MetricLogger(tmp_path, tensorboard=False) as logger:
        logger.log(0, {"reward/mean": 0.25, "policy/entropy": float("nan"), "grad/norm": float("inf")})
        logger.log(1, {"reward/mean": -1.5, "grad/norm": float("-inf"), "wall_s": 3.0})
    lines = _lines(tmp_path)
    # Every line is strict JSON: non-finite values are null, never the non-standard NaN / Infinity tokens.
    first = json.loads(lines[0], parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert first["policy/entropy"] is None and first["grad/norm"] is None
    assert "NaN" not in lines[0] and "Infinity" not in lines[1]

    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [0, 1]
    assert isinstance(rows[0]["step"], int)
    assert rows[0]["reward/mean"] == 0.25
    assert math.isnan(rows[0]["policy/entropy"]) and math.isnan(rows[0]["grad/norm"])
    assert rows[1]["reward/mean"] == -1.5 and math.isnan(rows[1]["grad/norm"])
    assert rows[1]["wall_s"] == 3.0  # a caller-given wall_s wins over the logger's clock
    assert rows[0]["wall_s"] >= 0.0


def test_tensor_and_numpy_values_are_converted(tmp_path):
    with MetricLogger(tmp_path, tensorboard=False) as logger:
        logger.log(3, {"a/t": torch.tensor(0.5), "a/np": np.float32(2.0), "a/int": 7, "a/bool": True})
    (row,) = read_metrics(tmp_path)
    assert (row["a/t"], row["a/np"], row["a/int"], row["a/bool"]) == (0.5, 2.0, 7.0, 1.0)


def test_bad_values_and_reserved_key_raise(tmp_path):
    with MetricLogger(tmp_path, tensorboard=False) as logger:
        with pytest.raises(TypeError, match="reward/mean"):
            logger.log(0, {"reward/mean": "high"})
        with pytest.raises(ValueError, match="reserved"):
            logger.log(0, {"step": 1.0})


def test_file_is_flushed_after_each_log(tmp_path):
    logger = MetricLogger(tmp_path, tensorboard=False)
    logger.log(0, {"x": 1.0})
    # Read while the logger is still open: the row must already be on disk (a crash loses nothing).
    assert read_metrics(tmp_path)[0]["x"] == 1.0
    logger.close()
    logger.close()  # idempotent
    with pytest.raises(RuntimeError):
        logger.log(1, {"x": 2.0})


def test_truncated_last_line_is_ignored(tmp_path):
    path = tmp_path / METRICS_FILE
    path.write_text('{"step": 0, "x": 1.0}\n{"step": 1, "x": 2.0}\n{"step": 2, "x"')
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [0, 1]
    # A complete last line without its newline is still read.
    path.write_text('{"step": 0, "x": 1.0}\n{"step": 1, "x": null}')
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [0, 1] and math.isnan(rows[1]["x"])


def test_corrupt_middle_line_is_an_error(tmp_path):
    (tmp_path / METRICS_FILE).write_text('{"step": 0}\n{"step": 1, \n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2"):
        read_metrics(tmp_path)


def test_missing_file_reads_as_empty(tmp_path):
    assert read_metrics(tmp_path) == []


def test_append_after_crash_repairs_the_cut_line(tmp_path):
    path = tmp_path / METRICS_FILE
    path.write_text('{"step": 0, "x": 1.0}\n{"step": 1, "x": 2')
    with MetricLogger(tmp_path, tensorboard=False) as logger:
        logger.log(1, {"x": 3.0})
    # Without the repair the new row would be glued onto the half line and corrupt the file.
    assert [(r["step"], r["x"]) for r in read_metrics(tmp_path)] == [(0, 1.0), (1, 3.0)]
    assert len(_lines(tmp_path)) == 2


def test_resume_drops_rows_after_resume_step(tmp_path):
    with MetricLogger(tmp_path, tensorboard=False) as logger:
        for step in range(6):
            logger.log(step, {"x": float(step), "wall_s": 10.0 * step})
        logger.log(5, {"eval/accuracy": 0.5, "wall_s": 51.0})
    # Crash after step 5; the last checkpoint was step 3; the file also ends in a half-written line.
    with open(tmp_path / METRICS_FILE, "a") as f:
        f.write('{"step": 6, "x": ')
    with MetricLogger(tmp_path, tensorboard=False, resume_step=3) as logger:
        assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2, 3]
        logger.log(4, {"x": 40.0})
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert rows[-1]["x"] == 40.0
    # wall_s continues from the last kept row (30 s), not from 0
    assert rows[-1]["wall_s"] >= 30.0
    assert not list(tmp_path.glob(".tmp-*"))  # the atomic rewrite left nothing behind


def test_resume_keeps_null_values_as_null(tmp_path):
    with MetricLogger(tmp_path, tensorboard=False) as logger:
        logger.log(0, {"x": float("nan")})
        logger.log(1, {"x": 1.0})
    MetricLogger(tmp_path, tensorboard=False, resume_step=0).close()
    (line,) = _lines(tmp_path)
    assert json.loads(line)["step"] == 0 and json.loads(line)["x"] is None


@settings(max_examples=25, deadline=None)
@given(
    steps=st.lists(st.integers(0, 20), min_size=0, max_size=15),
    resume_step=st.integers(-1, 21),
)
def test_resume_property_keeps_exactly_rows_at_or_before(tmp_path_factory, steps, resume_step):
    run_dir = tmp_path_factory.mktemp("run")
    with MetricLogger(run_dir, tensorboard=False) as logger:
        for i, step in enumerate(steps):
            logger.log(step, {"i": float(i)})
    MetricLogger(run_dir, tensorboard=False, resume_step=resume_step).close()
    kept = [(r["step"], r["i"]) for r in read_metrics(run_dir)]
    expected = [(s, float(i)) for i, s in enumerate(steps) if s <= resume_step]  # order preserved
    assert kept == expected


def test_disabled_logger_writes_nothing(tmp_path):
    run_dir = tmp_path / "rank1"
    with MetricLogger(run_dir, wandb={"project": "p"}, enabled=False) as logger:
        logger.log(0, {"x": 1.0})
    assert not run_dir.exists()


def test_tensorboard_event_file_is_written(tmp_path):
    with MetricLogger(tmp_path) as logger:
        logger.log(0, {"reward/mean": 0.5})
        logger.log(1, {"reward/mean": float("nan")})
    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    scalars = acc.Scalars("reward/mean")
    assert [s.step for s in scalars] == [0, 1]
    assert scalars[0].value == 0.5 and math.isnan(scalars[1].value)


def test_tensorboard_events_after_resume_step_are_purged(tmp_path):
    with MetricLogger(tmp_path) as logger:
        for step in range(5):
            logger.log(step, {"x": float(step)})
    with MetricLogger(tmp_path, resume_step=2) as logger:
        logger.log(3, {"x": 30.0})

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    # steps 3 and 4 of the first run are gone; step 3 holds the resumed value
    assert [(s.step, s.value) for s in acc.Scalars("x")] == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 30.0)]


def test_missing_tensorboard_warns_once_and_continues(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    monkeypatch.setattr(sinks, "_warned_no_tensorboard", False)
    with pytest.warns(UserWarning, match="pip install tensorboard"):
        MetricLogger(tmp_path / "a").close()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second warning would raise here
        with MetricLogger(tmp_path / "b") as logger:
            logger.log(0, {"x": 1.0})
    assert read_metrics(tmp_path / "b")[0]["x"] == 1.0
    assert not (tmp_path / "b" / "tb").exists()


def test_wandb_missing_gives_install_hint(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    with pytest.raises(ConfigError, match="pip install wandb"):
        MetricLogger(tmp_path, tensorboard=False, wandb={"project": "p"})


def test_wandb_is_not_imported_unless_asked(tmp_path, monkeypatch):
    monkeypatch.delitem(sys.modules, "wandb", raising=False)
    with MetricLogger(tmp_path, tensorboard=False) as logger:
        logger.log(0, {"x": 1.0})
    assert "wandb" not in sys.modules


def test_wandb_receives_init_kwargs_and_rows(tmp_path, monkeypatch):
    calls = {"log": [], "finished": False}

    class FakeRun:
        def log(self, values, step):
            calls["log"].append((step, values))

        def finish(self):
            calls["finished"] = True

    def init(**kwargs):
        calls["init"] = kwargs
        return FakeRun()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    with MetricLogger(
        tmp_path, tensorboard=False, wandb={"project": "p", "name": "n"}, resume_step=0
    ) as logger:
        logger.log(1, {"reward/mean": 0.5})
    assert calls["init"] == {"project": "p", "name": "n", "dir": str(tmp_path), "resume": "allow"}
    assert calls["log"] == [(1, {"reward/mean": 0.5})]
    assert calls["finished"]
