"""ProgressBar: postfix keys, missing / NaN metrics, disabled bar.

Run: .venv/bin/python -m pytest -q tests/report/test_progress.py
"""

from __future__ import annotations

import io

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from steadyrl.report.progress import ProgressBar, format_value, postfix_from_metrics


def test_format_value():
    assert format_value(0.123456) == "0.123"  # 3 significant digits
    assert format_value(1234.5) == "1.23e+03"
    assert format_value(float("nan")) == "nan"
    assert format_value(float("-inf")) == "-inf"
    assert format_value(torch.tensor(2.0)) == "2"
    assert format_value(None) == "?"
    assert format_value("x") == "?"


def test_postfix_picks_available_metrics_in_preference_order():
    metrics = {"reward/mean": 0.5, "policy/entropy": 1.25, "mismatch/kl_k3": 1e-13, "perf/step_s": 2.0}
    # the sampler/trainer mismatch is shown as `mismatch`, never as `kl` (issue 16: ~1e-13 read as KL to the ref)
    assert postfix_from_metrics(metrics) == {"rew": "0.5", "ent": "1.25", "mismatch": "1e-13", "s/it": "2"}
    # the KL penalty's estimate and the mismatch are two keys when both are logged
    assert postfix_from_metrics({"kl/ref_k3": 0.02, "mismatch/kl_k3": 0.001}) == {"kl": "0.02", "mismatch": "0.001"}
    assert postfix_from_metrics({"eval/pass@1": 0.4}) == {"acc": "0.4"}
    assert postfix_from_metrics({}) == {}


def test_update_moves_the_bar_and_keeps_last_values(capsys):
    bar = ProgressBar(10, initial=2, bar=True)  # pytest's captured stderr is no terminal: ask for the bar
    bar.update(3, {"reward/mean": 0.5, "policy/entropy": float("nan")})
    bar.update(4, {"eval/accuracy": 0.75})  # an eval row does not erase the training numbers
    assert bar.postfix == {"rew": "0.5", "ent": "nan", "acc": "0.75"}
    assert bar._bar.n == 4
    bar.write("hello")
    bar.close()
    err = capsys.readouterr().err
    assert "hello" in err
    assert "rew=0.5" in err and "acc=0.75" in err and "4/10" in err


def test_disabled_bar_is_silent(capsys):
    with ProgressBar(5, enabled=False) as bar:
        bar.update(1, {"reward/mean": 1.0})
        bar.write("should not appear")
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


@settings(max_examples=30, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["reward/mean", "policy/entropy", "kl/ref_k3", "perf/step_s", "other/x"]),
        st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.none(), st.text(max_size=3)),
    )
)
def test_update_never_raises(metrics):
    bar = ProgressBar(3, enabled=True, bar=True)
    try:
        bar.update(1, metrics)
        bar.update(2, None)
    finally:
        bar.close()


# ----------------------------------------------------------------------------- logs a batch job can use (issue 16)


class _Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_plain_lines_without_a_terminal():
    # Before: the tqdm bar wrote `\r` frames into a log file. Now: one plain line per step.
    stream = _Stream(tty=False)
    bar = ProgressBar(3, stream=stream)
    bar.update(1, {"reward/mean": 0.25, "mismatch/kl_k3": 6.5e-14, "perf/step_s": 0.5})
    bar.write("[eval step 1] accuracy=0.500")
    bar.update(2, {"reward/mean": 0.5})
    bar.close()
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert lines[0].startswith("step 1/3  rew=0.25 mismatch=6.5e-14 s/it=0.5  [0:00 elapsed")
    assert lines[1] == "[eval step 1] accuracy=0.500"
    assert lines[2].startswith("step 2/3  rew=0.5 mismatch=6.5e-14 s/it=0.5  [")  # last values kept
    assert len(lines) == 3


def test_bar_on_a_terminal():
    stream = _Stream(tty=True)
    with ProgressBar(3, stream=stream) as bar:
        bar.update(1, {"reward/mean": 0.25})
    assert "\r" in stream.getvalue() and "1/3" in stream.getvalue() and "rew=0.25" in stream.getvalue()


def test_steps_off_keeps_eval_lines():
    # logging.progress: false silenced eval results too; now only the per-step output goes.
    stream = _Stream(tty=False)
    with ProgressBar(3, steps=False, stream=stream) as bar:
        bar.update(1, {"reward/mean": 0.25})
        bar.write("[eval step 1] accuracy=0.500")
    assert stream.getvalue() == "[eval step 1] accuracy=0.500\n"


def test_line_estimates_time_left_from_this_process_steps(monkeypatch):
    clock = iter([100.0, 110.0])  # built at t=100, step 12 printed at t=110 after 2 steps of a resumed run
    monkeypatch.setattr("steadyrl.report.progress.time.monotonic", lambda: next(clock))
    bar = ProgressBar(20, initial=10, bar=False, stream=_Stream(tty=False))
    # 10 s for 2 steps -> 8 steps left take 40 s
    assert bar.line(12) == "step 12/20  [0:10 elapsed, ~0:40 left]"
