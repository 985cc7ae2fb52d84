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
        "adaptive_entropy",
        "loss_term",
        "entropy bonus −c·H̄ with Skywork-OR1's adaptive coefficient toward a target entropy (TRL use_adaptive_entropy)",
        "arXiv 2505.22312",
        "docs/methods/adopted.md",
    ),
    (
        "vcpo",
        "update_hook",
        "VCPO: ESS-scaled learning rate per optimizer step + off-policy optimal baseline from per-trajectory grad norms",
        "arXiv 2602.17616",
        "docs/methods/adopted.md",
    ),
    (
        "lm_head_fp32",
        "precision",
        "FP32 LM head: fp32 head weights and logits in trainer and sampler (ScaleRL; TRL cast_lm_head_to_fp32)",
        "arXiv 2510.13786",
        "docs/methods/adopted.md",
    ),
    (
        "fp16",
        "precision",
        "fp16 training (float16 autocast, fp32 master weights, dynamic loss scaling) and an fp16 sampler (Precision-RL)",
        "arXiv 2510.26788",
        "docs/methods/adopted.md",
    ),
    (
        "overlong_filter",
        "sampling",
        "DAPO overlong filtering (config rollout.mask_truncated): truncated completions leave the loss",
        "arXiv 2503.14476",
        "docs/methods/sampling.md",
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
    "prompt_selector": "sampling.selector.name",
    "group_filter": "sampling.filters: [{name: ...}]",
    "group_augmenter": "sampling.augmenters: [{name: ...}]",
    "reward_shaper": "sampling.reward_shapers: [{name: ...}]",
    "layer_advantage": "sampling.advantage.name",
    "sampling": "rollout.mask_truncated: true",
    "model_hook": "routing_replay: R2 | R3",
    "trainer_hook": "guard: {...}",
    "loss_term": "entropy: {coef, adaptive, target, ...}",
    "update_hook": "vcpo: {...}",
    "precision": "model.lm_head_fp32 | model.autocast: float16 + rollout.sampler_dtype: float16",
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
