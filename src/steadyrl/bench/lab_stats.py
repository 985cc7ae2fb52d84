"""Seed statistics for the lab's report: mean with a 95 % Student-t interval, and grouping of result rows."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

# two-sided 97.5 % quantiles of Student's t for n − 1 = 1..30 degrees of freedom
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def finite(values: Iterable[Any]) -> list[float]:
    return [float(v) for v in values if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)]


def mean_ci(values: Iterable[Any]) -> tuple[float, float, int]:
    """(mean, half-width of the 95 % t-interval, n) over the finite values; half-width NaN for n < 2.

    E.g. [1, 2, 3]: mean 2, s = 1, half-width = 4.303 · 1 / √3 = 2.484.
    """
    xs = finite(values)
    n = len(xs)
    if n == 0:
        return math.nan, math.nan, 0
    mean = sum(xs) / n
    if n < 2:
        return mean, math.nan, n
    s = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    t = _T975[n - 2] if n - 2 < len(_T975) else 1.96
    return mean, t * s / math.sqrt(n), n


def fmt_ci(values: Iterable[Any], digits: int = 3) -> str:
    """'m ± h' (n seeds implied by the table), 'm' for one value, '–' for none."""
    mean, half, n = mean_ci(values)
    if n == 0:
        return "–"
    if n < 2 or not math.isfinite(half):
        return f"{mean:.{digits}g}"
    return f"{mean:.{digits}g} ± {half:.{min(digits, 2)}g}"


def select(rows: Sequence[dict[str, Any]], **where: Any) -> list[dict[str, Any]]:
    return [r for r in rows if all(r.get(k) == v for k, v in where.items())]


def values(rows: Sequence[dict[str, Any]], key: str, **where: Any) -> list[float]:
    return finite(r.get(key) for r in select(rows, **where))


def ordered(rows: Sequence[dict[str, Any]], key: str, order: Sequence[Any] | None = None,
            sort: Callable | None = None) -> list[Any]:
    """Distinct values of ``key`` in ``order`` first (when given), then in first-seen order (or sorted)."""
    seen: list[Any] = []
    for r in rows:
        if key in r and r[key] not in seen:
            seen.append(r[key])
    if order is not None:
        return [v for v in order if v in seen] + [v for v in seen if v not in order]
    return sorted(seen, key=sort) if sort else seen
