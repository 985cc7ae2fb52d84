"""RewardPool: results in prompt order, a timeout per call that kills only that call, errors captured.

Run: .venv/bin/python -m pytest -q tests/rewards/test_reward_pool.py
"""

from __future__ import annotations

import random
import time

import pytest

from steadyrl.rewards import CallFailed, CallTimedOut, RewardFunctionError, RewardPool, load_reward_function
from steadyrl.rewards.pool import call_reward

SLOW_REWARDS = '''
import os, time

def reward(record, completion, scale=1.0):
    kind, _, arg = completion.partition(":")
    if kind == "sleep":
        time.sleep(float(arg))
        return scale * float(arg)
    if kind == "raise":
        raise KeyError(arg)
    if kind == "die":
        os._exit(3)
    if kind == "named":
        return {"a": 1, "b": None}
    if kind == "bad":
        return "not a number"
    return scale * len(completion) + record.get("bonus", 0)
'''


@pytest.fixture
def spec(tmp_path):
    path = tmp_path / "slow_rewards.py"
    path.write_text(SLOW_REWARDS)
    return f"{path}:reward"


def test_results_are_in_prompt_order_and_equal_in_process_calls(spec):
    rng = random.Random(0)
    completions = [f"sleep:{rng.choice([0.0, 0.02, 0.08])}" if i % 2 else "x" * i for i in range(12)]
    records = [{"bonus": i} for i in range(12)]
    function = load_reward_function(spec)
    expected = [call_reward(function, r, c, {"scale": 2.0}) for r, c in zip(records, completions)]
    with RewardPool(spec, {"scale": 2.0}, workers=3) as pool:
        assert pool.map(records, completions) == expected
        assert pool.map(records[::-1], completions[::-1]) == expected[::-1]  # workers are reused


def test_timeout_kills_only_the_slow_call(spec):
    with RewardPool(spec, workers=2, timeout_s=0.5) as pool:
        start = time.monotonic()
        outcomes = pool.map([{}] * 4, ["a", "sleep:30", "bb", "ccc"])
        assert time.monotonic() - start < 10.0  # the 30 s call was stopped, not waited for
        assert outcomes == [1.0, CallTimedOut(0.5), 2.0, 3.0]
        assert pool.map([{}], ["dddd"]) == [4.0]  # the killed worker was replaced


def test_the_timeout_runs_from_the_start_of_each_call(spec):
    # one worker, three 0.3 s calls: 0.9 s in all, yet none ran longer than its 0.6 s limit
    with RewardPool(spec, workers=1, timeout_s=0.6) as pool:
        assert pool.map([{}] * 3, ["sleep:0.3"] * 3) == [0.3, 0.3, 0.3]


def test_failures_are_captured_per_call(spec):
    with RewardPool(spec, workers=2) as pool:
        raised, died, invalid, named, fine = pool.map([{}] * 5, ["raise:boom", "die", "bad", "named", "ok"])
    assert isinstance(raised, CallFailed) and raised.kind == "raised" and raised.error_type == "KeyError"
    assert "slow_rewards.py" in raised.traceback and raised.message == "'boom'"
    assert isinstance(died, CallFailed) and died.kind == "died" and "exit" in died.message and "3" in died.message
    assert invalid == CallFailed("invalid", "InvalidRewardValue", "returned 'not a number' (str)")
    assert named.keys() == {"a", "b"} and named["a"] == 1.0
    assert fine == 2.0


def test_close_is_idempotent_and_map_restarts(spec):
    pool = RewardPool(spec, workers=1)
    assert pool.map([{}], ["abc"]) == [3.0]
    pool.close()
    pool.close()
    assert pool.map([{}], ["ab"]) == [2.0]
    pool.close()


def test_a_spec_the_workers_cannot_load_is_an_error(tmp_path):
    with pytest.raises(RewardFunctionError, match="could not load"):
        RewardPool(f"{tmp_path}/absent.py:reward", workers=1).map([{}], ["x"])


@pytest.mark.parametrize(("kwargs", "message"), [({"workers": 0}, "workers must be >= 1"), ({"workers": 1, "timeout_s": 0}, "timeout_s")])
def test_bad_pool_settings(spec, kwargs, message):
    with pytest.raises(ValueError, match=message):
        RewardPool(spec, **kwargs)
