"""What each host framework carries of steadyrl's registry, and the reason wherever it does not.

The adapters iterate over the registry (``registry.FAMILIES[family].table`` for every family of
``registry.METHOD_FAMILIES``), so a method added to it is carried by default; the tables below are the only
place that names exceptions, each with its reason. ``status_table()`` renders the whole picture
(``python -m steadyrl.integrations.status`` prints it; ``--write`` refreshes it in docs/integrations/README.md,
which tests/integrations/test_status.py keeps in step with the registry).
"""

from __future__ import annotations

from typing import Any

CARRIED = "carried"
LIMITED = "carried with a limit"
NOT_CARRIED = "not carried"

BEGIN, END = "<!-- status table: begin -->", "<!-- status table: end -->"

# ---------------------------------------------------------------------------------------------------- verl

_ENTROPY = (
    "needs the per-token entropy H_t; verl passes entropy only to a whole-loss function installed from the "
    "driver with set_loss_fn, and verl.trainer.main_ppo (0.9.1) has no setting that installs one"
)
_LOGIT = "needs the raw logit of the sampled token (π_θ and π_old); verl's policy losses see log-probs only"
_DP_STATS = (
    "its batch statistics are summed over the data-parallel group when verl's default process group is that "
    "group (FSDP without sequence parallelism); otherwise they are per rank, and the first call logs a warning"
)
_MU = (
    "μ is the sampler: exact in bypass mode (algorithm.rollout_correction.bypass_mode=true, old_log_prob = μ); "
    "in decoupled mode verl hands the loss π_old only, so μ = π_old and verl's rollout_is_weights carry π_old/μ"
)

# Losses not registered with verl (steadyrl/<name> is absent), with the reason.
VERL_LOSS_EXCLUDED: dict[str, str] = {
    "steer": _ENTROPY,
    "lco_mse": _LOGIT,
    "lco_lch": _LOGIT,
}
# Losses registered with verl whose meaning differs from steadyrl's trainer in a stated way.
VERL_LOSS_LIMITS: dict[str, str] = {
    "bapo": _DP_STATS,
    "clip_cov": _DP_STATS,
    "kl_cov": _DP_STATS,
    "lco_kld": "with sign_balanced=true the sign counts are " + _DP_STATS.removeprefix("its batch statistics are "),
    "reinforce_is": _MU,
    "dppo_binary_tv": _MU,
    "dppo_binary_kl": _MU,
    "minpro": _MU,
    "vespo": _MU,
    "kimi_dppo": _MU,
}
VERL_ADVANTAGE_LIMITS: dict[str, str] = {
    "mc_grpo": (
        "the pivot completion gets advantage 0 but stays in verl's normalisers (verl has no per-sample loss mask "
        "an estimator can set); needs rollout.n = G + 1"
    ),
    "gdpo": (
        "a registered estimator sees the summed token_level_rewards, one column (K = 1); for GDPO over named "
        "reward components use verl's own adv_estimator=gdpo (parity: tests/ops/test_parity_verl.py)"
    ),
}
# Estimators with the registry fact ``reads_old_statistics`` (π_old's per-token log-probs and Σ_v π_old(v)²).
VERL_OLD_STATISTICS = (
    "needs π_old's per-token statistics (old log-probs, Σ_v π_old(v)²), which verl's compute_advantage passes only "
    "to its own estimator names: use verl's adv_estimator=optimal_token_baseline with "
    "actor.calculate_sum_pi_squared=true (the same formula; parity: tests/ops/test_parity_verl.py)"
)
_VERL_CORRECTION = (
    "decoupled mode: use verl's own algorithm.rollout_correction (docs/integrations/verl.md maps the presets; "
    "its rejection sampling removes tokens from the normaliser, as steadyrl). Bypass mode: policy_loss."
    "bypass_correction runs steadyrl's correction inside the loss against μ = old_log_prob with anchor π_θ; "
    "its rejections are zeroed but stay in verl's normaliser, which verl counts before the loss runs"
)
# Corrections that cannot run inside a verl loss at all.
VERL_CORRECTION_EXCLUDED: dict[str, str] = {
    "high_entropy": _ENTROPY.replace("needs the per-token entropy H_t", "needs π_θ's per-token entropy"),
}
_VERL_KL = {  # steadyrl estimator -> verl's actor.kl_loss_type for the same estimator
    "kl_k1": "k1", "kl_k2": "mse", "kl_k3": "low_var_kl", "kl_k1_st": "k1+", "kl_k3_st": "low_var_kl+",
}

# ----------------------------------------------------------------------------------------------------- TRL

# SteadyGRPOTrainer reads log-probs, entropy and the final hidden state from TRL's own forward, so every loss
# is carried; these two need π_old's raw token logits, which TRL's π_old forward does not keep.
TRL_LOSS_LIMITS: dict[str, str] = {
    "lco_mse": "on-policy only (steps_per_generation == gradient_accumulation_steps, num_iterations = 1): "
    "off-policy needs π_old's raw token logits, which TRL's π_old forward does not keep",
    "lco_lch": "on-policy only, as lco_mse",
}
TRL_ADVANTAGE_LIMITS: dict[str, str] = {
    "gdpo": "sees TRL's weighted sum of its reward functions (K = 1), as steadyrl's own trainer sees one reward; "
    "TRL's own multi_objective_aggregation='normalize_then_sum' is GDPO over its reward functions",
}
_TRL_REJECTS = (
    "its rejected tokens leave the normaliser through a gradient rescale after the step's last backward, "
    "which DeepSpeed (optimizer step inside that backward) does not allow: refused there; an MoE router "
    "aux loss is rescaled with the policy gradient"
)
TRL_OLD_STATISTICS = (
    "needs Σ_v π_old(v)² over the vocabulary from a π_old forward before the advantages; TRL's forward keeps the "
    "sampled tokens' log-probs only: refused"
)
TRL_SAMPLER = "needs the sampler's log-probs μ, which TRL has only with use_vllm=True (sampling_per_token_logps)"
TRL_STABILISER_LIMITS: dict[str, str] = {
    "capo": f"{_TRL_REJECTS}; its optimizer-model state is not saved in TRL checkpoints; TRL does not skip a step "
    "with a non-finite gradient, so CAPO records that step too; refused with LoRA (frozen LM head), as in steadyrl",
    "guard": "a TrainerCallback (trl_guard.py) that needs logging_steps=1; its snapshots are not saved in TRL "
    "checkpoints, and a rollback keeps completions TRL already buffered for the generation batch",
}

# ------------------------------------------------------------------------------------------------ both

# The sampling layer (steadyrl.sampling: prompt selection, group filters and augmenters, reward shapers, layer
# advantages) runs around generation and scoring, on global groups with a per-prompt store, inside steadyrl's
# collect stage; neither host exposes that stage to a plug-in. family -> (verl, TRL) reason.
_SAMPLING_LAYER = "a sampling-layer component, inside steadyrl's collect stage (it chooses prompts or acts on whole groups)"
SAMPLING_FAMILIES: dict[str, tuple[str, str]] = {
    "prompt_selector": ("verl's driver draws prompts from its own dataloader (data.sampler is verl's)",
                        "TRL's dataloader draws the prompts"),
    "group_filter": ("verl's driver forms the batch; a registered loss or estimator cannot drop or regenerate groups",
                     "TRL generates once per generation batch and cannot drop or regenerate groups"),
    "group_augmenter": ("needs the step's generation and scoring (replay or regeneration), which verl's driver owns",
                        "needs the step's generation and scoring (replay or regeneration), which TRL owns"),
    "reward_shaper": ("runs after scoring on whole groups, before the advantage; verl's reward manager owns that step",
                      "runs after scoring on whole groups; TRL's reward functions see one completion at a time"),
    "layer_advantage": ("reads the layer's context (per-prompt history, lengths or answers), which a registered verl "
                        "estimator does not get",
                        "reads the layer's context (per-prompt history, lengths or answers), which SteadyGRPOTrainer's "
                        "estimator call does not get"),
}
# The host's own equivalent, where it has one: (family, name) -> (verl, TRL); "" = none.
SAMPLING_EQUIVALENTS: dict[tuple[str, str], tuple[str, str]] = {
    ("prompt_selector", "uniform"): ("verl's own shuffled dataloader (data.shuffle=true), a uniform draw without "
                                     "a fixed pool", "TRL's own shuffled dataloader, a uniform draw without a fixed pool"),
    ("group_filter", "dynamic_sampling"): ("verl's own algorithm.filter_groups (DAPO dynamic sampling)", ""),
    ("reward_shaper", "overlong_penalty"): (
        "verl's DAPO reward manager with overlong_buffer_cfg", "TRL's trl.rewards.get_soft_overlong_punishment"),
}

# Stabilisers that cannot cross either loss API, with the reason: name -> (verl, TRL); "" = see the TRL limits.
TRAINER_ONLY: dict[str, tuple[str, str]] = {
    "capo": (
        "needs the final hidden states, the LM head and an optimizer model updated after every step; a verl "
        "loss sees log-probs only",
        "",
    ),
    "pcr": ("needs one gradient per loss term before they are combined", "needs one gradient per loss term "
            "before they are combined; TRL's Trainer makes one backward of one scalar"),
    "pcgrad": ("as pcr", "as pcr"),
    "fixed_alpha": ("as pcr", "as pcr"),
    "guard": (
        "needs the driver: snapshots of model and optimizer, rollback, LR back-off; verl's workers hold them "
        "behind Ray and expose no hook",
        "",
    ),
    "retention": ("an auxiliary SFT term on a second data set; not a policy loss", "as verl"),
    "adaptive_entropy": (
        "needs π_θ's entropy with its gradient, which a verl policy loss does not get; verl's own actor.entropy_coeff "
        "is a constant coefficient",
        "SteadyGRPOTrainer computes its own loss without TRL's entropy term and refuses entropy_coef / "
        "use_adaptive_entropy; TRL's own GRPOTrainer has the same bonus (parity: tests/train/test_entropy_bonus.py)",
    ),
    "vcpo": ("needs per-trajectory gradient norms and a per-step learning rate inside the update loop", "as verl"),
    "routing_replay": (
        "use verl's own router replay (actor.<engine>.router_replay.mode R2 or R3, Megatron / VeOmni engines)",
        "TRL has no routing replay",
    ),
}
CARRIED_BY_BOTH: dict[str, str] = {"sum": "ordinary training: one backward of the summed loss terms"}
TRAINER_LEVEL = ("guard", "retention", "routing_replay", "adaptive_entropy", "vcpo")
"""Stabilisers of steadyrl's trainer that are not registry entries."""


def reads_sampler(correction: Any) -> bool:
    """Whether a resolved correction needs μ (``rollout_logprobs``): it refuses a one-token batch without it."""
    import torch

    from steadyrl.types import LossInputs

    one = torch.zeros(1, 1)
    probe = LossInputs(logprobs=one, old_logprobs=one, advantages=one, response_mask=torch.ones(1, 1, dtype=torch.bool),
                       entropy=one)
    try:
        correction(probe)
    except ValueError as error:
        return "rollout_logprobs" in str(error)
    return False


def _join(verl_why: str, trl_why: str) -> str:
    return "; ".join(w for w in (f"verl: {verl_why}" if verl_why else "", f"TRL: {trl_why}" if trl_why else "") if w)


def _row(family: str, name: str) -> tuple[str, str, str]:
    """(verl status, TRL status, why) of one registry entry."""
    from steadyrl import registry

    if family == "loss":
        if name in VERL_LOSS_EXCLUDED:
            verl, verl_why = NOT_CARRIED, VERL_LOSS_EXCLUDED[name]
        else:
            verl, verl_why = (LIMITED, VERL_LOSS_LIMITS[name]) if name in VERL_LOSS_LIMITS else (CARRIED, "")
        trl_why = TRL_LOSS_LIMITS.get(name, "")
        return verl, LIMITED if trl_why else CARRIED, _join(verl_why, trl_why)
    if family == "advantage":
        if registry.ADVANTAGES[name].reads_old_statistics:
            return NOT_CARRIED, NOT_CARRIED, _join(VERL_OLD_STATISTICS, TRL_OLD_STATISTICS)
        verl_why, trl_why = VERL_ADVANTAGE_LIMITS.get(name, ""), TRL_ADVANTAGE_LIMITS.get(name, "")
        return LIMITED if verl_why else CARRIED, LIMITED if trl_why else CARRIED, _join(verl_why, trl_why)
    if family == "correction":
        verl_why = VERL_CORRECTION_EXCLUDED.get(name, _VERL_CORRECTION)
        verl = NOT_CARRIED if name in VERL_CORRECTION_EXCLUDED else LIMITED
        trl_why = "; ".join(w for w in (TRL_SAMPLER if reads_sampler(registry.resolve("correction", name)) else "",
                                        _TRL_REJECTS) if w)
        return verl, LIMITED, _join(verl_why, trl_why)
    if family == "aggregation":
        return CARRIED, CARRIED, "verl: through verl's loss_agg_mode (same formula)"
    if family == "kl":
        verl_name = _VERL_KL.get(name)
        verl_why = (f"use verl's actor.use_kl_loss=true, kl_loss_type={verl_name}" if verl_name
                    else "verl 0.9.1's kl_loss_type has no importance-weighted estimator")
        return NOT_CARRIED, CARRIED, f"verl: {verl_why}; TRL: β is GRPOConfig.beta"
    if family in SAMPLING_FAMILIES:
        why = SAMPLING_FAMILIES[family]
        use = SAMPLING_EQUIVALENTS.get((family, name), ("", ""))
        verl_why, trl_why = (f"{w}; use {u}" if u else w for w, u in zip(why, use))
        return NOT_CARRIED, NOT_CARRIED, f"{_SAMPLING_LAYER}; {_join(verl_why, trl_why)}"
    if name in CARRIED_BY_BOTH:
        return CARRIED, CARRIED, CARRIED_BY_BOTH[name]
    verl_why, trl_why = TRAINER_ONLY.get(name, ("not assessed", "not assessed"))
    trl = NOT_CARRIED if trl_why else (LIMITED if name in TRL_STABILISER_LIMITS else CARRIED)
    return NOT_CARRIED, trl, _join(verl_why, trl_why or TRL_STABILISER_LIMITS.get(name, ""))


def status_rows() -> list[tuple[str, str, str, str, str]]:
    """(family, name, verl status, TRL status, why) for every method of the registry's method families and every
    trainer-level stabiliser."""
    from steadyrl import registry

    rows = [(family, name, *_row(family, name))
            for family in registry.METHOD_FAMILIES for name in registry.FAMILIES[family].table]
    return rows + [("stabiliser", name, *_row("stabiliser", name)) for name in TRAINER_LEVEL]


def status_table() -> str:
    """The rows as a Markdown table."""
    lines = ["| family | method | verl | TRL | why |", "|---|---|---|---|---|"]
    lines += [f"| {f} | `{n}` | {v} | {t} | {w} |" for f, n, v, t, w in status_rows()]
    return "\n".join(lines)


def write_table(path: str) -> None:
    """Replace the table between BEGIN and END in the Markdown file ``path``."""
    from pathlib import Path

    text = Path(path).read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    Path(path).write_text(f"{head}{BEGIN}\n{status_table()}\n{END}{tail}")


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--write"]:
        write_table(sys.argv[2] if len(sys.argv) > 2 else "docs/integrations/README.md")
    else:
        print(status_table())
