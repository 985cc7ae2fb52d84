"""The table behind `steadyrl methods`: every registered method with a one-line description and its source."""

from __future__ import annotations

from steadyrl.registry import FAMILIES

# Stabilisers that act outside the per-token loss (token filters, gradient combiners, model hooks).
STABILISERS: list[tuple[str, str, str, str]] = [
    (
        "routing_replay",
        "model_hook",
        "MoE Routing Replay (config routing_replay): R2 replays π_old's experts, R3 the sampler's, in training",
        "arXiv 2512.01374 + 2510.11370, §5",
    ),
]
"""(name, layer, description, reference) rows, appended by the modules that implement them."""


def methods_table(markdown: bool = False) -> str:
    rows = [(family, e.name, e.description, e.reference) for family, table in FAMILIES.items() for e in table.values()]
    rows += [(layer, name, desc, ref) for name, layer, desc, ref in STABILISERS]
    if markdown:
        lines = ["| family | name | what it does | reference |", "|---|---|---|---|"]
        lines += [f"| {f} | `{n}` | {d} | {r} |" for f, n, d, r in rows]
        return "\n".join(lines)
    width = max(len(n) for _, n, _, _ in rows)
    out, last = [], None
    for family, name, desc, ref in rows:
        if family != last:
            out.append(f"\n{family}:")
            last = family
        out.append(f"  {name:<{width}}  {desc}  [{ref}]")
    return "\n".join(out).lstrip("\n")
