"""Load a reward function named in the config, check that it can be called, and read what it returns.

A reward is named by ``"path/to/file.py:function"`` (a file, relative to the working directory) or
``"package.module:function"`` (an importable module); the part after the colon may be dotted
(``"my_rewards.py:Scorer.exact"``). Standard library only (pool workers import this module).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import math
import numbers
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

RewardValue = float | dict[str, float]
"""What a reward call yields after :func:`to_reward_value`: one float (NaN = unscorable) or named floats."""


class RewardFunctionError(ValueError):
    """The reward function cannot be loaded or called as a reward; the message says what to fix."""


class InvalidRewardValue(ValueError):
    """A reward function returned something that is not a finite number, None, NaN or a dict of those."""


def _is_file_spec(target: str) -> bool:
    return target.endswith(".py") or "/" in target or "\\" in target


def absolute_spec(spec: str) -> str:
    """``spec`` with a relative file path made absolute (against the working directory now), so that another
    process, or a later change of directory, finds the same file; module specs unchanged."""
    target, _, attribute = spec.rpartition(":")
    if target and _is_file_spec(target):
        return f"{Path(target).expanduser().resolve()}:{attribute}"
    return spec


def _load_file(target: str) -> Any:
    path = Path(target).expanduser()
    if not path.is_file():
        raise RewardFunctionError(
            f"reward file {target} does not exist (relative paths start at the working directory {Path.cwd()}); "
            "pass 'path/to/file.py:function'"
        )
    resolved = path.resolve()
    digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:10]
    stem = re.sub(r"\W", "_", resolved.stem)
    name = f"_steadyrl_reward_{stem}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, resolved)
    if spec is None or spec.loader is None:
        raise RewardFunctionError(f"reward file {target} cannot be imported as Python; name a .py file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look the module up by name
    try:
        spec.loader.exec_module(module)
    except Exception as error:
        del sys.modules[name]
        raise RewardFunctionError(
            f"importing reward file {target} raised {type(error).__name__}: {error}; fix the file"
        ) from error
    return module


def _load_module(target: str) -> Any:
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as error:
        raise RewardFunctionError(
            f"no module {target!r} ({error}); name a file as 'path/to/file.py:function', or make the module "
            "importable (pip install it, or add its directory to PYTHONPATH)"
        ) from error
    except Exception as error:
        raise RewardFunctionError(
            f"importing module {target!r} raised {type(error).__name__}: {error}; fix the module"
        ) from error


def load_reward_function(spec: str) -> Callable[..., Any]:
    """The callable that ``spec`` (``"file.py:function"`` or ``"package.module:function"``) names."""
    target, _, attribute = spec.rpartition(":") if isinstance(spec, str) else ("", "", "")
    if not target or not attribute:
        raise RewardFunctionError(
            f"reward {spec!r} must look like 'path/to/file.py:function' or 'package.module:function'"
        )
    module = _load_file(target) if _is_file_spec(target) else _load_module(target)
    value: Any = module
    for part in attribute.split("."):
        if not hasattr(value, part):
            available = sorted(
                name for name, obj in vars(module).items() if callable(obj) and not name.startswith("_")
            )
            raise RewardFunctionError(
                f"{target} has no {attribute!r}; its public callables are {available or '(none)'}"
            )
        value = getattr(value, part)
    if not callable(value):
        raise RewardFunctionError(f"{spec} is a {type(value).__name__}, not a function")
    return value


def reward_spec_of(function: Callable[..., Any]) -> str | None:
    """``"module:qualname"`` when a worker process can import ``function`` by name, else None."""
    module = getattr(function, "__module__", None)
    qualname = getattr(function, "__qualname__", None)
    if not module or not qualname or module == "__main__" or "<" in qualname:
        return None
    if module.startswith("_steadyrl_reward_"):  # loaded from a file: the file path is the name
        file = getattr(sys.modules.get(module), "__file__", None)
        return f"{file}:{qualname}" if file else None
    try:
        found = load_reward_function(f"{module}:{qualname}")
    except RewardFunctionError:
        return None
    return f"{module}:{qualname}" if found is function else None


def check_reward_signature(function: Callable[..., Any], reward_kwargs: dict[str, Any], name: str) -> None:
    """Raise unless ``function(record, completion, **reward_kwargs)`` binds to the function's signature."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return  # builtins without a signature: the first call will tell
    try:
        signature.bind({}, "", **reward_kwargs)
    except TypeError as error:
        raise RewardFunctionError(
            f"reward {name} has the signature {signature}, which cannot be called as "
            f"reward(record, completion{''.join(f', {k}=...' for k in reward_kwargs)}) ({error}); "
            "a reward takes the prompt's record (a dict), the completion text, and the reward_kwargs"
        ) from None


def _as_number(value: object) -> float | None:
    """The value as a float, NaN for None; None when it is not a number (tensors and numpy scalars duck-typed)."""
    if value is None:
        return math.nan
    if isinstance(value, numbers.Real):  # bool, int, float, most numpy scalars
        return float(value)
    if isinstance(value, (str, bytes)):
        return None
    numel = getattr(value, "numel", None)
    if callable(numel) and hasattr(value, "item"):  # a torch tensor
        is_complex = getattr(value, "is_complex", lambda: False)()
        return float(value.item()) if numel() == 1 and not is_complex else None
    if getattr(value, "ndim", None) == 0 and hasattr(value, "__float__"):
        return float(value)  # numpy.bool_ and other 0-d array-likes
    return None


def to_reward_value(value: object) -> RewardValue:
    """A reward function's return value as a float (NaN for None) or a dict of named floats.

    Raises InvalidRewardValue for anything else: strings, lists, vectors, ±inf, an empty dict, non-string
    keys, or a dict value that is not a number / None.
    """
    if isinstance(value, dict):
        if not value:
            raise InvalidRewardValue("returned an empty dict; return at least one named reward")
        named: dict[str, float] = {}
        for key, item in value.items():
            if not isinstance(key, str) or not key:
                raise InvalidRewardValue(f"returned a dict with the key {key!r}; name each reward with a string")
            number = _as_number(item)
            if number is None or math.isinf(number):
                raise InvalidRewardValue(f"returned {item!r} ({type(item).__name__}) for the reward {key!r}")
            named[key] = number
        return named
    number = _as_number(value)
    if number is None or math.isinf(number):
        raise InvalidRewardValue(f"returned {value!r} ({type(value).__name__})")
    return number
