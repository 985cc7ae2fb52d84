"""Skip marks for tests that need an optional extra, each naming the install command."""

from __future__ import annotations

import importlib.util

import pytest


def requires_extra(extra: str, *modules: str, install: str | None = None) -> pytest.MarkDecorator:
    """Skip unless every module of the extra imports; `make test` installs them, so it runs these.

    ``install`` replaces the suggested command for a package that is not a project extra (verl)."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if install is not None:
        return pytest.mark.skipif(bool(missing), reason=f"needs {', '.join(missing)} ({extra}): {install}")
    return pytest.mark.skipif(
        bool(missing), reason=f"needs the {extra} extra ({', '.join(missing)}): pip install -e '.[{extra}]'"
    )


needs_tasks_extra_math = requires_extra("tasks", "math_verify")
needs_tasks_extra_gym = requires_extra("tasks", "reasoning_gym")
needs_tasks_extra = requires_extra("tasks", "reasoning_gym", "math_verify")
