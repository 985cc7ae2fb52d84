"""Reading a config: YAML files, ``--set key=value`` overrides, and the strict conversion into the dataclasses
of ``steadyrl.config`` (unknown keys and wrong types are errors that name the fix); and writing one back."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from steadyrl.config import ConfigError, MethodSpec, TrainConfig


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, cls: type = TrainConfig,
    notes: list[str] | None = None,
) -> Any:
    """Read YAML (or start from defaults when ``path`` is None), apply ``key=value`` overrides, validate.

    ``notes`` collects one line per override that changed more than it says (a method switched by name drops
    the hyper-parameters the file set for the previous method); the CLI prints them.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; pass the path of a YAML file (see configs/).")
        raw = _read_yaml(path)
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(raw).__name__}.")
    for item in overrides or []:
        apply_override(raw, item, notes)
    return from_dict(cls, raw)


def _read_yaml(path: Path) -> Any:
    """The parsed file, or a ConfigError naming the file, line and column of a syntax error."""
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ConfigError(
            f"{where}: invalid YAML ({problem}); fix the syntax there (indentation, a missing ':', an unclosed "
            "bracket or quote)."
        ) from exc


def apply_override(raw: dict[str, Any], item: str, notes: list[str] | None = None) -> None:
    """Set ``a.b.c=value`` in a nested dict; the value is parsed as YAML (numbers, bools, lists, null).

    ``section.name=new`` on a method that had another name starts the section afresh: the old method's
    hyper-parameters are not the new method's (a PPO ε is not GSPO's), so they are dropped, with a note.
    """
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value, e.g. optim.lr=1e-4.")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if child is None or not isinstance(child, dict):
            child = {} if not isinstance(child, str) else {"name": child}
            node[part] = child
        node = child
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({problem}); quote or fix it.") from exc
    if parts[-1] == "name" and "name" in node and node["name"] != parsed:
        dropped = sorted(k for k in node if k != "name")
        if dropped and notes is not None:
            section = ".".join(parts[:-1])
            notes.append(
                f"{section}: {node['name']} → {parsed} starts from {parsed}'s defaults; dropped "
                f"{', '.join(dropped)} (set them again with --set {section}.<key>=... if {parsed} takes them)"
            )
        node.clear()
    node[parts[-1]] = parsed


def from_dict(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, recursively; unknown keys raise ConfigError listing valid keys."""
    if cls is MethodSpec:
        return _method_spec(data, where)
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {data!r}.")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        section = f"section '{where}'" if where else "the top level"
        raise ConfigError(
            f"unknown key(s) {', '.join(repr(k) for k in unknown)} in {section}; valid keys: {', '.join(fields)}."
        )
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in data.items():
        if isinstance(value, dict) and "name" not in value:
            default = _field_default(fields[name])
            if isinstance(default, MethodSpec):  # `--set loss.clip_high=0.28` keeps the default loss
                value = {"name": default.name, **default.kwargs, **value}
        values[name] = _coerce(hints[name], value, f"{where}.{name}" if where else name)
    return cls(**values)


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def to_dict(cfg: Any) -> Any:
    """Plain nested dict of a config (MethodSpec flattened to {name, **kwargs}), for config.yaml."""
    if isinstance(cfg, MethodSpec):
        return {"name": cfg.name, **cfg.kwargs}
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, tuple):
        return [to_dict(v) for v in cfg]
    return cfg


def dump_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def _method_spec(data: Any, where: str) -> MethodSpec:
    if isinstance(data, str):
        return MethodSpec(data)
    if not isinstance(data, dict) or "name" not in data:
        raise ConfigError(f"section '{where}' must be a registry name or a mapping with a 'name' key, got {data!r}.")
    kwargs = {k: _number_if_numeric(v) for k, v in data.items() if k != "name"}
    return MethodSpec(str(data["name"]), kwargs)


def _number_if_numeric(value: Any) -> Any:
    """YAML 1.1 reads ``1e-4`` (no dot) as a string; method hyper-parameters want the number."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"{where}={value!r}; valid: {', '.join(map(str, choices))}.")
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, where)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)
    if hint is MethodSpec:
        return _method_spec(value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}.")
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where} must be a list of {len(args)} values, got {value!r}.")
        return tuple(_coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}.")
        return dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}.")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}.")
        return value
    if hint is float:
        if isinstance(value, str):
            try:
                return float(value)  # YAML reads 1e-4 without a dot as a string
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}.")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}.")
        return value
    return value
