"""Per-step seeds: a resumed run draws exactly what the uninterrupted run drew."""

from __future__ import annotations


def step_seed(seed: int, step: int, salt: int = 0) -> int:
    """A deterministic seed for (run seed, step, purpose); ``salt`` separates purposes within a step."""
    return (seed * 1_000_003 + step * 7_919 + salt * 104_729) % (2**63 - 1)
