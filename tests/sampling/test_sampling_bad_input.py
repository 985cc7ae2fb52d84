"""Bad sampling settings stop the run with one sentence naming the fix, before the first rollout.

    .venv/bin/python -m pytest -q tests/sampling/test_sampling_bad_input.py
"""

from __future__ import annotations

import pytest

from sampling_fakes import fake_collector
from steadyrl.config import ConfigError
from steadyrl.config_load import load_config
from steadyrl.train.setup import resolve_methods


@pytest.mark.parametrize(
    "override,message",
    [
        ("sampling.selector=random", "unknown prompt_selector 'random'; valid names: uniform, vade"),
        ("sampling.filters=[{name: dynamic_sampling, rounds: 3}]", "unknown setting(s) 'rounds' for group_filter"),
        ("sampling.advantage={name: dcpo, scale: 2}", "unknown setting(s) 'scale' for layer_advantage 'dcpo'"),
        ("sampling.reward_shapers=[overlong]", "unknown reward_shaper 'overlong'"),
        ("sampling.store_capacity=0", "sampling.store_capacity=0; it must be at least 1"),
    ],
)
def test_names_and_settings_are_checked_before_anything_loads(override, message):
    with pytest.raises(ConfigError) as err:
        resolve_methods(load_config(None, [override]))
    assert message in str(err.value)


def test_recorded_routing_cannot_follow_rows_the_layer_moves():
    cfg = load_config(None, ["routing_replay=R3", "sampling.augmenters=[{name: r3_replay}]"])
    with pytest.raises(ConfigError, match="routing_replay=R3 cannot be combined .* use R2"):
        resolve_methods(cfg)


@pytest.mark.parametrize(
    "override,message",
    [
        ("sampling.filters=[{name: dynamic_sampling, max_rounds: 0}]", "dynamic_sampling needs max_rounds >= 1"),
        ("sampling.selector={name: vade, pool_size: 2}", "pool holds 2 prompts, fewer than rollout.prompts_per_step=4"),
        ("sampling.advantage={name: riskpo, credit: mean}", "credit must be one of"),
        ("sampling.reward_shapers=[{name: overlong_penalty, buffer_len: 9}]", "buffer_len <= max_len"),
    ],
)
def test_settings_out_of_range_are_config_errors(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        fake_collector([override])
