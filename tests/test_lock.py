"""requirements/lock.txt agrees with pyproject.toml: a bound edited without `make lock` fails here.

Run: .venv/bin/python -m pytest -q tests/test_lock.py
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def _pins() -> dict[str, list[Requirement]]:
    """Locked requirements by name; a name may have one pin per environment marker."""
    pins: dict[str, list[Requirement]] = {}
    for line in (ROOT / "requirements/lock.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            pins.setdefault(canonicalize_name(req.name), []).append(req)
    return pins


def _declared() -> list[Requirement]:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project, unlocked = pyproject["project"], pyproject["tool"]["steadyrl"]["unlocked-extras"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    reqs += [Requirement(r) for name, extra in project["optional-dependencies"].items() if name not in unlocked for r in extra]
    return reqs


def test_every_declared_dependency_has_a_pin_inside_its_range():
    pins = _pins()
    env = default_environment()
    for req in _declared():
        name = canonicalize_name(req.name)
        if name == "torch":  # the one package left to the user's machine (Makefile TORCH_SPEC)
            assert name not in pins
            continue
        assert name in pins, f"{req.name} is declared in pyproject.toml but not locked; run `make lock`"
        here = [p for p in pins[name] if p.marker is None or p.marker.evaluate(env)]
        assert here, f"no pin of {req.name} for this Python/platform; run `make lock`"
        for pin in here:
            (version,) = [s.version for s in pin.specifier]
            assert req.specifier.contains(version, prereleases=True), (
                f"lock pins {req.name}=={version} outside pyproject's {req.specifier}; run `make lock`"
            )


def test_the_lock_pins_exact_versions():
    for reqs in _pins().values():
        for req in reqs:
            (spec,) = req.specifier
            assert spec.operator == "==", f"{req} is not an exact pin"
