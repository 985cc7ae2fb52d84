"""Strict YAML config: unknown keys, overrides, method specs, type errors, round trip, shipped recipes.

    .venv/bin/python -m pytest -q tests/test_config.py
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from steadyrl.config import ConfigError, MethodSpec, OptimConfig, TrainConfig
from steadyrl.config_load import apply_override, dump_config, load_config, to_dict
from steadyrl.runtime.distributed import DistInfo
from steadyrl.train.setup import resolve_methods, validate_batch_arithmetic

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "configs").glob("*.yaml")) + sorted((REPO / "src/steadyrl/configs").glob("*.yaml"))


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


# ----------------------------------------------------------------------------- strict loading


def test_defaults_without_a_file():
    assert load_config(None) == TrainConfig()


def test_unknown_top_level_key_lists_every_valid_key(tmp_path):
    path = _write(tmp_path, "optimizer:\n  lr: 1.0e-4\n")  # the section is `optim`
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "'optimizer'" in message and "top level" in message
    for key in _field_names(TrainConfig):
        assert key in message, key


def test_unknown_nested_key_names_the_section_and_lists_its_keys(tmp_path):
    path = _write(tmp_path, "optim:\n  learning_rate: 1.0e-4\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "'learning_rate'" in message and "'optim'" in message
    for key in _field_names(OptimConfig):
        assert key in message, key


def test_unknown_key_from_an_override_is_an_error_too():
    with pytest.raises(ConfigError, match="'clip_hihg'.*valid keys: .*group_size"):
        load_config(None, ["rollout.clip_hihg=0.28"])


def test_missing_file_and_non_mapping_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(_write(tmp_path, "- a\n- b\n"))


def test_empty_file_is_the_defaults(tmp_path):
    assert load_config(_write(tmp_path, "# nothing yet\n")) == TrainConfig()


# ----------------------------------------------------------------------------- --set overrides


@pytest.mark.parametrize(
    "override,getter,expected",
    [
        ("optim.lr=1e-4", lambda c: c.optim.lr, 1e-4),  # YAML 1.1 reads 1e-4 (no dot) as a string
        ("optim.lr=3.0e-4", lambda c: c.optim.lr, 3e-4),
        ("optim.lr=2", lambda c: c.optim.lr, 2.0),  # an int where a float is expected is widened
        ("optim.steps=7", lambda c: c.optim.steps, 7),
        ("logging.progress=false", lambda c: c.logging.progress, False),
        ("rollout.mask_truncated=true", lambda c: c.rollout.mask_truncated, True),
        ("optim.betas=[0.8, 0.95]", lambda c: c.optim.betas, (0.8, 0.95)),  # list -> the declared tuple
        ("model.attn_implementation=null", lambda c: c.model.attn_implementation, None),
        ("model.pad_token=<eos>", lambda c: c.model.pad_token, "<eos>"),
        ("rollout.sampler_dtype=bfloat16", lambda c: c.rollout.sampler_dtype, "bfloat16"),
        ("task.kwargs={min_digits: 2, max_digits: 4}", lambda c: c.task.kwargs, {"min_digits": 2, "max_digits": 4}),
        ("run.output_dir=a=b", lambda c: c.run.output_dir, "a=b"),  # only the first '=' separates key and value
    ],
)
def test_override_values_are_parsed_as_yaml(override, getter, expected):
    cfg = load_config(None, [override])
    value = getter(cfg)
    assert value == expected and type(value) is type(expected), (override, value)


def test_overrides_apply_on_top_of_the_file_in_order(tmp_path):
    path = _write(tmp_path, "optim:\n  lr: 1.0e-3\n  steps: 3\n")
    cfg = load_config(path, ["optim.lr=5e-5", "optim.steps=4", "optim.steps=9"])
    assert (cfg.optim.lr, cfg.optim.steps) == (5e-5, 9)  # the last override wins
    assert cfg.optim.grad_clip == OptimConfig().grad_clip  # untouched keys keep their defaults


def test_override_without_equals_names_the_form():
    with pytest.raises(ConfigError, match=r"section\.key=value"):
        load_config(None, ["optim.lr"])


def test_apply_override_builds_nested_dicts():
    raw: dict = {"loss": "gspo"}
    apply_override(raw, "loss.clip_low=1e-4")  # a string method becomes {name: ..., key: value}
    apply_override(raw, "a.b.c=[1, 2]")
    assert raw == {"loss": {"name": "gspo", "clip_low": "1e-4"}, "a": {"b": {"c": [1, 2]}}}


def test_token_filters_take_a_list_of_specs():
    cfg = load_config(None, ["token_filters=[capo, {name: other, threshold: 1e-3}]"])
    assert cfg.token_filters == (MethodSpec("capo"), MethodSpec("other", {"threshold": 1e-3}))


# ----------------------------------------------------------------------------- method specs


def test_method_spec_from_a_string_or_a_mapping(tmp_path):
    path = _write(tmp_path, "loss: gspo\nadvantage: {name: bnpo, reward_max: 1e0}\ncorrection: {name: token_tis, cap: 3}\n")
    cfg = load_config(path)
    assert cfg.loss == MethodSpec("gspo")
    assert cfg.advantage == MethodSpec("bnpo", {"reward_max": 1.0})  # "1e0" is a string in YAML 1.1
    assert cfg.correction == MethodSpec("token_tis", {"cap": 3})


def test_partial_method_override_keeps_the_default_name():
    cfg = load_config(None, ["loss.clip_high=0.28"])
    assert cfg.loss == MethodSpec("ppo_clip", {"clip_high": 0.28})
    cfg = load_config(None, ["combiner.unused=1"])  # names are checked later, by the registry
    assert cfg.combiner.name == "sum"


def test_partial_method_override_keeps_the_name_from_the_file(tmp_path):
    path = _write(tmp_path, "loss: {name: gspo, clip_low: 0.001}\n")
    cfg = load_config(path, ["loss.clip_high=0.002"])
    assert cfg.loss == MethodSpec("gspo", {"clip_low": 0.001, "clip_high": 0.002})
    path = _write(tmp_path, "loss: cispo\n")
    assert load_config(path, ["loss.clip_high=4"]).loss == MethodSpec("cispo", {"clip_high": 4})


def test_switching_the_method_by_name_drops_nothing_it_was_given():
    cfg = load_config(None, ["loss.name=gspo", "loss.clip_low=2e-4"])
    assert cfg.loss == MethodSpec("gspo", {"clip_low": 2e-4})


def test_optional_method_without_a_name_says_how_to_fix():
    # correction defaults to None, so there is no name to keep
    with pytest.raises(ConfigError, match="correction.*'name'"):
        load_config(None, ["correction.cap=3"])
    assert load_config(None, ["correction=token_tis"]).correction == MethodSpec("token_tis")
    assert load_config(None, ["correction=null"]).correction is None


# ----------------------------------------------------------------------------- type errors


@pytest.mark.parametrize(
    "override,key,what",
    [
        ("optim.steps=abc", "optim.steps", "integer"),
        ("optim.steps=2.5", "optim.steps", "integer"),
        ("optim.steps=true", "optim.steps", "integer"),  # bool is an int in Python, not in a config
        ("optim.lr=fast", "optim.lr", "number"),
        ("rollout.temperature=true", "rollout.temperature", "number"),
        ("logging.progress=maybe", "logging.progress", "true or false"),
        ("model.name_or_path=5", "model.name_or_path", "string"),
        ("optim.betas=0.9", "optim.betas", "list"),
        ("optim.betas=[0.9]", "optim.betas", "2 values"),
        ("optim.betas=[0.9, 0.99, 0.999]", "optim.betas", "2 values"),
        ("optim.betas=[0.9, x]", "optim.betas[1]", "number"),
        ("task.kwargs=[1, 2]", "task.kwargs", "mapping"),
        ("optim=3", "optim", "mapping"),
        ("token_filters=capo", "token_filters", "list"),
        ("token_filters=[3]", "token_filters[0]", "registry name"),
        ("loss=[ppo_clip]", "loss", "registry name"),
    ],
)
def test_type_errors_name_the_key(override, key, what):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    message = str(info.value)
    assert key in message and what in message, message


# ----------------------------------------------------------------------------- round trip


def _rich_config() -> TrainConfig:
    return load_config(
        None,
        [
            "model.pad_token=<eos>",
            "task.kwargs={min_digits: 2, max_digits: 5}",
            "rollout.group_size=4",
            "rollout.sampler_dtype=bfloat16",
            "advantage=mc_grpo",
            "advantage.mad_eps=1e-2",
            "loss.name=steer",
            "loss.dual_clip=3",
            "loss.mapping=linear",
            "correction={name: token_mis, ratio_min: 0.25}",
            "kl.coef=0.05",
            "token_filters=[{name: capo, ratio: 1e-3}, other]",
            "optim.lr=1e-4",
            "optim.betas=[0.8, 0.95]",
            "optim.eps=1e-10",
            "logging.wandb_project=null",
        ],
    )


@pytest.mark.parametrize("make", [TrainConfig, _rich_config])
def test_dump_then_load_is_the_same_config(tmp_path, make):
    cfg = make()
    dump_config(cfg, tmp_path / "dumped.yaml")
    assert load_config(tmp_path / "dumped.yaml") == cfg


def test_to_dict_is_plain_yaml():
    data = to_dict(_rich_config())
    assert data["loss"] == {"name": "steer", "dual_clip": 3, "mapping": "linear"}
    assert data["optim"]["betas"] == [0.8, 0.95]
    assert data["token_filters"] == [{"name": "capo", "ratio": 1e-3}, {"name": "other"}]
    assert yaml.safe_load(yaml.safe_dump(data)) == data  # nothing that safe_dump cannot write


# ----------------------------------------------------------------------------- shipped recipes


def test_there_are_recipes_to_check():
    assert RECIPES, "no YAML recipes found under configs/"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_recipe_loads_and_resolves(path):
    cfg = load_config(path)
    methods = resolve_methods(cfg)  # every registry name and hyper-parameter is valid
    assert callable(methods["loss"]) and callable(methods["advantage"]) and callable(methods["aggregation"])
    validate_batch_arithmetic(cfg, DistInfo())  # and the batch splits on one process
    assert load_config(path, ["optim.steps=1"]).optim.steps == 1  # recipes stay overridable


@pytest.mark.parametrize(
    "override,valid",
    [
        ("optim.schedule=cosin", "constant, cosine, linear"),
        ("kl.reference=frozen", "initial, old"),
        ("routing_replay=r3", "none, R2, R3"),
        ("model.dtype=fp16", "float32, bfloat16, float16"),
    ],
)
def test_choice_settings_are_checked_when_the_config_loads(override, valid):
    # one place for every enum-like string: the config, before any module sees it
    with pytest.raises(ConfigError, match=rf"{re.escape(override.split('=')[0])}=.*; valid: {valid}\."):
        load_config(None, [override])


def test_the_rollout_backend_is_a_registry_spec_with_options():
    cfg = load_config(None, ["rollout.backend=native", "rollout.backend.compile=true"])
    assert cfg.rollout.backend == MethodSpec("native", {"compile": True})
    assert load_config(None, ["rollout.backend.cache_bucket=64"]).rollout.backend == MethodSpec("hf", {"cache_bucket": 64})


def test_switching_a_recipes_method_by_name_does_not_inherit_its_hyperparameters(tmp_path):
    # a recipe's PPO ε (0.2 / 0.28) is not GSPO's (3e-4 / 4e-4): the switch starts from GSPO's defaults, noted
    path = _write(tmp_path, "loss: {name: ppo_clip, clip_low: 0.2, clip_high: 0.28}\n")
    notes: list[str] = []
    cfg = load_config(path, ["loss.name=gspo"], notes=notes)
    assert cfg.loss == MethodSpec("gspo")
    assert notes == [
        "loss: ppo_clip → gspo starts from gspo's defaults; dropped clip_high, clip_low "
        "(set them again with --set loss.<key>=... if gspo takes them)"
    ]
    assert load_config(path, ["loss.name=gspo", "loss.clip_low=2e-4"]).loss == MethodSpec("gspo", {"clip_low": 2e-4})
    assert load_config(path, ["loss.name=ppo_clip"]).loss.kwargs == {"clip_low": 0.2, "clip_high": 0.28}  # same name
