"""`steadyrl config`: a resolved config as YAML with every key's meaning above it, the config reference.

The meaning of a key is the docstring under its field in ``steadyrl/config.py`` (read from the source with
``ast``, so the reference cannot drift from the code). The output loads back with ``load_config`` to the
same config, so it is also a starting point for a new recipe.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import typing
from typing import Any

import yaml

from steadyrl import config as config_module
from steadyrl.config import MethodSpec, TrainConfig
from steadyrl.config_load import to_dict

_WIDTH = 110


def field_docs(cls: type) -> dict[str, str]:
    """``{field name: docstring}`` of a config dataclass (fields without a docstring are left out)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):  # no source (a frozen install): the reference has no comments
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs: dict[str, str] = {}
    for node, after in zip(body, [*body[1:], None]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


_FAMILY_OF_FIELD = {
    "advantage": "advantage", "loss": "loss", "aggregation": "aggregation", "correction": "correction",
    "combiner": "combiner", "backend": "rollout_backend", "token_filters": "token_filter",
}
"""Config fields that name a registry entry, and the registry family they name it in."""


def _comment(text: str, indent: str) -> list[str]:
    text = " ".join(text.replace("``", "`").split())
    return textwrap.wrap(
        text, width=_WIDTH - len(indent) - 2, initial_indent=f"{indent}# ", subsequent_indent=f"{indent}# ",
        break_on_hyphens=False, break_long_words=False,
    )


def _optional_section(cls: type, name: str) -> type | None:
    """The dataclass of an ``X | None`` field (retention, guard), else None."""
    hint = typing.get_type_hints(cls).get(name)
    for arg in typing.get_args(hint):
        if dataclasses.is_dataclass(arg) and arg is not MethodSpec:
            return arg
    return None


def method_defaults(family: str, spec: MethodSpec) -> str | None:
    """"<name> settings (default): a=1, b=None" for a registry entry; None for an unknown name."""
    from steadyrl import registry
    from steadyrl.config import ConfigError

    try:
        params = registry.hyperparameters(family, spec.name)
    except (ConfigError, ValueError):  # an unknown name: `steadyrl train` reports it with the valid ones
        return None
    if not params:
        return f"{spec.name} takes no settings"
    shown = ", ".join(f"{k}={'<required>' if v is inspect.Parameter.empty else v!r}" for k, v in params.items())
    return f"{spec.name} settings (default): {shown}"


def _leaf(name: str, value: Any, indent: str) -> list[str]:
    plain = to_dict(value)
    if isinstance(plain, list) and any(isinstance(item, dict) for item in plain):  # e.g. token_filters: block
        text = yaml.safe_dump({name: plain}, default_flow_style=None, sort_keys=False, width=_WIDTH)
        return [indent + line for line in text.rstrip("\n").splitlines()]
    flow = yaml.safe_dump(plain, default_flow_style=True, sort_keys=False, width=10_000)
    return [f"{indent}{name}: {flow.removesuffix('...' + chr(10)).strip()}"]


def commented_yaml(cfg: Any, *, comments: bool = True, indent: str = "") -> str:
    """``cfg`` (a config dataclass) as YAML, each key preceded by its docstring as ``# `` comments."""
    docs = field_docs(type(cfg)) if comments else {}
    lines: list[str] = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name in docs:
            lines += _comment(docs[f.name], indent)
        if comments and f.name in _FAMILY_OF_FIELD:
            specs = value if isinstance(value, tuple) else (value,) if isinstance(value, MethodSpec) else ()
            for spec in specs:
                defaults = method_defaults(_FAMILY_OF_FIELD[f.name], spec)
                lines += _comment(defaults, indent) if defaults else []
        if dataclasses.is_dataclass(value) and not isinstance(value, MethodSpec):
            lines.append(f"{indent}{f.name}:")
            lines.append(commented_yaml(value, comments=comments, indent=indent + "  ").rstrip("\n"))
        else:
            lines += _leaf(f.name, value, indent)
        section = _optional_section(type(cfg), f.name) if value is None and comments else None
        if section is not None:  # an optional section that is off: show what turning it on gives
            lines.append(f"{indent}# off; setting any of its keys turns it on, the others at these defaults:")
            body = commented_yaml(section(), comments=False, indent="  ").rstrip("\n").splitlines()
            lines += [f"{indent}# {line}" for line in body]
    return "\n".join(lines) + "\n"


def describe(cfg: TrainConfig, sources: list[str], *, comments: bool = True) -> str:
    """The whole reference page: a header naming where the values came from, then the commented YAML."""
    header = [
        "# steadyrl config: " + " <- ".join(["the defaults", *sources]),
        "# Method sections name a registry entry and its hyper-parameters (`steadyrl methods` lists them);",
        f"# every other key is defined in {config_module.__name__.replace('.', '/')}.py.",
        "",
    ]
    return "\n".join(header) + commented_yaml(cfg, comments=comments)
