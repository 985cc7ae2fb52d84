"""Loading a reward by name, checking its signature, reading its return value (steadyrl.rewards.functions).

Run: .venv/bin/python -m pytest -q tests/rewards/test_reward_functions.py
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from steadyrl.rewards import (
    RewardFunctionError,
    check_reward_signature,
    load_reward_function,
    reward_spec_of,
    to_reward_value,
)
from steadyrl.rewards.builtin import exact_match
from steadyrl.rewards.functions import InvalidRewardValue

REWARD_FILE = '''
def length(record, completion, scale=1.0):
    return scale * len(completion)

class Scorer:
    @staticmethod
    def exact(record, completion):
        return float(completion == record["answer"])

NOT_CALLABLE = 3
'''


@pytest.fixture
def reward_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(REWARD_FILE)
    return path


def test_loads_a_function_from_a_file(reward_file):
    length = load_reward_function(f"{reward_file}:length")
    assert length({}, "abc", scale=2.0) == 6.0
    exact = load_reward_function(f"{reward_file}:Scorer.exact")
    assert exact({"answer": "4"}, "4") == 1.0
    # the same file twice: the same module, not a second copy
    assert load_reward_function(f"{reward_file}:length") is length


def test_loads_a_function_from_a_module():
    assert load_reward_function("steadyrl.rewards.builtin:exact_match") is exact_match


def test_relative_file_paths_start_at_the_working_directory(reward_file, monkeypatch):
    monkeypatch.chdir(reward_file.parent)
    assert load_reward_function("my_rewards.py:length")({}, "ab") == 2.0


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_colon", "must look like 'path/to/file.py:function'"),
        ("file.py:", "must look like"),
        ("missing_dir/none.py:f", "does not exist"),
        ("steadyrl_no_such_module:f", "no module 'steadyrl_no_such_module'"),
    ],
)
def test_bad_specs_name_the_fix(spec, message):
    with pytest.raises(RewardFunctionError, match=message):
        load_reward_function(spec)


def test_missing_function_lists_the_callables(reward_file):
    with pytest.raises(RewardFunctionError, match=r"has no 'lenght'; its public callables are \['Scorer', 'length'\]"):
        load_reward_function(f"{reward_file}:lenght")
    with pytest.raises(RewardFunctionError, match="is a int, not a function"):
        load_reward_function(f"{reward_file}:NOT_CALLABLE")


def test_a_file_that_fails_to_import_is_named(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("import steadyrl_no_such_dependency\n")
    with pytest.raises(RewardFunctionError, match=r"importing reward file .*broken.py raised ModuleNotFoundError"):
        load_reward_function(f"{path}:f")


def test_reward_spec_of(reward_file):
    assert reward_spec_of(exact_match) == "steadyrl.rewards.builtin:exact_match"
    length = load_reward_function(f"{reward_file}:length")
    assert reward_spec_of(length) == f"{reward_file.resolve()}:length"
    assert reward_spec_of(lambda r, c: 0.0) is None

    def nested(record, completion):
        return 0.0

    assert reward_spec_of(nested) is None
    main_function = type(nested)(nested.__code__, {"__name__": "__main__"})
    main_function.__module__ = "__main__"
    assert reward_spec_of(main_function) is None


def test_signature_check():
    check_reward_signature(exact_match, {}, "exact_match")
    check_reward_signature(exact_match, {"strip": False}, "exact_match")
    with pytest.raises(RewardFunctionError, match="cannot be called as reward\\(record, completion, tolerance=...\\)"):
        check_reward_signature(exact_match, {"tolerance": 1e-6}, "exact_match")
    with pytest.raises(RewardFunctionError, match="takes the prompt's record"):
        check_reward_signature(lambda completion: 0.0, {}, "one_argument")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1.0, 1.0),
        (0, 0.0),
        (True, 1.0),
        (None, math.nan),
        (math.nan, math.nan),
        (np.float32(0.25), 0.25),
        (np.bool_(True), 1.0),
        (np.array(0.5), 0.5),
        (torch.tensor(0.75), 0.75),
        ({"a": 1, "b": None}, {"a": 1.0, "b": math.nan}),
        ({"format": np.float64(0.5)}, {"format": 0.5}),
    ],
)
def test_reward_values(value, expected):
    got = to_reward_value(value)
    if isinstance(expected, dict):
        assert got.keys() == expected.keys()
        for key in expected:
            assert got[key] == expected[key] or (math.isnan(got[key]) and math.isnan(expected[key]))
    else:
        assert isinstance(got, float)
        assert got == expected or (math.isnan(got) and math.isnan(expected))


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("1.0", r"returned '1.0' \(str\)"),
        ([1.0], r"returned \[1.0\] \(list\)"),
        (torch.tensor([1.0, 2.0]), r"\(Tensor\)"),
        (math.inf, r"returned inf \(float\)"),
        ({}, "empty dict"),
        ({1: 1.0}, "with the key 1"),
        ({"a": "x"}, "for the reward 'a'"),
        ({"a": -math.inf}, "for the reward 'a'"),
    ],
)
def test_non_rewards_are_refused(value, message):
    with pytest.raises(InvalidRewardValue, match=message):
        to_reward_value(value)


@given(st.floats(allow_infinity=False, allow_nan=False))
def test_finite_floats_pass_unchanged(x):
    assert to_reward_value(x) == x
    assert to_reward_value({"r": x}) == {"r": x}


def test_exact_match():
    assert exact_match({"answer": " 42\n"}, "42 ") == 1.0
    assert exact_match({"answer": "42"}, "42 ", strip=False) == 0.0
    assert exact_match({"answer": 42}, "41") == 0.0
