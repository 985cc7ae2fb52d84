"""The table behind `steadyrl methods`: every registered method with a one-line description and its source."""

from __future__ import annotations

from steadyrl.registry import FAMILIES, METHOD_FAMILIES

# Stabilisers that act outside the per-token loss (token filters, gradient combiners, model hooks).
STABILISERS: list[tuple[str, str, str, str, str]] = [
    (
        "routing_replay",
        "model_hook",
        "MoE Routing Replay (config routing_replay): R2 replays π_old's experts, R3 the sampler's, in training",
        "arXiv 2512.01374 + 2510.11370",
        "docs/methods/routing-replay.md",
    ),
    (
        "stability_guard",
        "trainer_hook",
        "stability guard (config guard): on a collapse signal, roll back to an in-memory snapshot, cut the LR, tighten ε",
        "steadyrl",
        "docs/stability-lab.md",
    ),
]
"""(name, layer, description, paper, project page) rows."""


# Where each family is chosen in a config.
CONFIG_KEYS = {
    "advantage": "advantage.name",
    "loss": "loss.name",
    "correction": "correction.name",
    "aggregation": "aggregation.name",
    "kl": "kl.estimator",
    "token_filter": "token_filters: [{name: ...}]",
    "combiner": "combiner.name",
    "model_hook": "routing_replay: R2 | R3",
    "trainer_hook": "guard: {...}",
}


def _source(reference: str, doc: str) -> str:
    return f"{reference}; {doc}" if doc else reference


def methods_table(markdown: bool = False) -> str:
    rows = [
        (family, e.name, e.description, _source(e.reference, e.doc))
        for family in METHOD_FAMILIES
        for e in FAMILIES[family].table.values()
    ]
    rows += [(layer, name, desc, _source(ref, doc)) for name, layer, desc, ref, doc in STABILISERS]
    if markdown:
        lines = ["| family (config key) | name | what it does | reference |", "|---|---|---|---|"]
        lines += [f"| {f} (`{CONFIG_KEYS.get(f, f)}`) | `{n}` | {d} | {r} |" for f, n, d, r in rows]
        return "\n".join(lines)
    width = max(len(n) for _, n, _, _ in rows)
    out, last = [f"{len(rows)} implemented methods; choose them by name in a YAML config (key in brackets)."], None
    for family, name, desc, ref in rows:
        if family != last:
            out.append(f"\n{family}  [{CONFIG_KEYS.get(family, family)}]:")
            last = family
        out.append(f"  {name:<{width}}  {desc}  [{ref}]")
    return "\n".join(out)
