"""Accumulate metric tensors over micro-batches and ranks, then read them with one host sync per step."""

from __future__ import annotations

import torch
from torch import Tensor

from steadyrl.runtime.distributed import all_reduce_
from steadyrl.types import Metrics


def _kind(name: str) -> str:
    if name.endswith("_max"):
        return "max"
    if name.endswith("_min"):
        return "min"
    return "mean"


class MetricAccumulator:
    """Token-weighted means, and max / min for names ending in ``_max`` / ``_min`` (see types.Metrics).

    Everything stays on the device until ``compute``, which all-reduces across ranks and does the step's
    single ``.tolist()``.
    """

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.weights: dict[str, Tensor] = {}
        self.extremes: dict[str, Tensor] = {}

    def add(self, metrics: Metrics, weight: Tensor | float = 1.0) -> None:
        for name, value in metrics.items():
            value = value.detach().float().reshape(())
            kind = _kind(name)
            if kind == "mean":
                w = torch.as_tensor(weight, dtype=torch.float32, device=value.device)
                self.sums[name] = self.sums.get(name, 0.0) + value * w
                self.weights[name] = self.weights.get(name, 0.0) + w
            else:
                op = torch.maximum if kind == "max" else torch.minimum
                self.extremes[name] = value if name not in self.extremes else op(self.extremes[name], value)

    def compute(self, distributed: bool = False) -> dict[str, float]:
        names_mean = sorted(self.sums)
        names_ext = sorted(self.extremes)
        out: dict[str, float] = {}
        if names_mean:
            sums = torch.stack([self.sums[n] for n in names_mean])
            weights = torch.stack([self.weights[n] for n in names_mean])
            if distributed:
                both = all_reduce_(torch.stack([sums, weights]), "sum")
                sums, weights = both[0], both[1]
            means = (sums / weights.clamp(min=1e-12)).tolist()
            out.update(zip(names_mean, means))
        for kind in ("max", "min"):
            names = [n for n in names_ext if _kind(n) == kind]
            if names:
                vals = torch.stack([self.extremes[n] for n in names])
                if distributed:
                    vals = all_reduce_(vals, kind)
                out.update(zip(names, vals.tolist()))
        return out
