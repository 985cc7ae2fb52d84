"""What each host framework carries of steadyrl's registry, and the reason wherever it does not.

The adapters iterate over the registry, so a method added to it is carried by default; the tables below are
the only place that names exceptions, each with its reason. ``status_table()`` renders the whole picture
(``python -m steadyrl.integrations.status`` prints it; ``--write`` refreshes it in docs/integrations/README.md,
which tests/integrations/test_status.py keeps in step with the registry).
"""

from __future__ import annotations

CARRIED = "carried"
LIMITED = "carried with a limit"
NOT_CARRIED = "not carried"

BEGIN, END = "<!-- status table: begin -->", "<!-- status table: end -->"

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
    "reinforce_is": _MU,
    "dppo_binary_tv": _MU,
    "dppo_binary_kl": _MU,
    "minpro": _MU,
    "vespo": _MU,
}
VERL_ADVANTAGE_LIMITS: dict[str, str] = {
    "mc_grpo": (
        "the pivot completion gets advantage 0 but stays in verl's normalisers (verl has no per-sample loss mask "
        "an estimator can set); needs rollout.n = G + 1"
    ),
}

# SteadyGRPOTrainer reads log-probs, entropy and the final hidden state from TRL's own forward, so every loss
# is carried; these two need π_old's raw token logits, which TRL's π_old forward does not keep.
TRL_LOSS_LIMITS: dict[str, str] = {
    "lco_mse": "on-policy only (steps_per_generation == gradient_accumulation_steps, num_iterations = 1): "
    "off-policy needs π_old's raw token logits, which TRL's π_old forward does not keep",
    "lco_lch": "on-policy only, as lco_mse",
}
TRL_STABILISER_LIMITS: dict[str, str] = {
    "capo": "its optimizer-model state is not saved in TRL checkpoints, and TRL does not skip a step with a "
    "non-finite gradient, so CAPO records that step too",
    "guard": "a TrainerCallback (trl_guard.py) that needs logging_steps=1; its snapshots are not saved in TRL "
    "checkpoints, and a rollback keeps completions TRL already buffered for the generation batch",
}
TRL_CORRECTION_LIMIT = (
    "needs the sampler's log-probs, which TRL has only with use_vllm=True (sampling_per_token_logps)"
)

# Families and stabilisers that cannot cross either loss API, with the reason.
TRAINER_ONLY: dict[str, tuple[str, str]] = {
    # name: (verl, TRL)
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
    "routing_replay": (
        "use verl's own router replay (actor.<engine>.router_replay.mode R2 or R3, Megatron / VeOmni engines)",
        "TRL has no routing replay",
    ),
}


def status_rows() -> list[tuple[str, str, str, str, str]]:
    """(family, name, verl status, TRL status, why) for every registry entry and trainer-level stabiliser."""
    from steadyrl import registry

    rows = []
    for name in registry.LOSSES:
        if name in VERL_LOSS_EXCLUDED:
            verl, why = NOT_CARRIED, VERL_LOSS_EXCLUDED[name]
        elif name in VERL_LOSS_LIMITS:
            verl, why = LIMITED, VERL_LOSS_LIMITS[name]
        else:
            verl, why = CARRIED, ""
        trl = LIMITED if name in TRL_LOSS_LIMITS else CARRIED
        why = "; ".join(w for w in (f"verl: {why}" if why else "", f"TRL: {TRL_LOSS_LIMITS.get(name, '')}"
                                    if name in TRL_LOSS_LIMITS else "") if w)
        rows.append(("loss", name, verl, trl, why))
    for name in registry.ADVANTAGES:
        limit = VERL_ADVANTAGE_LIMITS.get(name)
        rows.append(("advantage", name, LIMITED if limit else CARRIED, CARRIED, f"verl: {limit}" if limit else ""))
    for name in registry.CORRECTIONS:
        rows.append((
            "correction", name, LIMITED, LIMITED,
            "verl: decoupled mode uses verl's own rollout_correction (docs/integrations/verl.md maps the presets); "
            f"a steadyrl correction runs inside the loss only in bypass mode; TRL: {TRL_CORRECTION_LIMIT}",
        ))
    for name in registry.AGGREGATIONS:
        rows.append(("aggregation", name, CARRIED, CARRIED, "verl: through verl's loss_agg_mode (same formula)"))
    for name in registry.KL_ESTIMATORS:
        rows.append(("kl", name, NOT_CARRIED, CARRIED, "verl: use verl's actor.use_kl_loss / kl_loss_type"))
    stabilisers = {**{n: "token_filter" for n in registry.TOKEN_FILTERS}, **{n: "combiner" for n in registry.COMBINERS}}
    stabilisers.pop("sum", None)
    for name in [*stabilisers, "guard", "retention", "routing_replay"]:
        verl_why, trl_why = TRAINER_ONLY.get(name, ("not assessed", "not assessed"))
        trl = NOT_CARRIED if trl_why else (LIMITED if name in TRL_STABILISER_LIMITS else CARRIED)
        trl_why = trl_why or TRL_STABILISER_LIMITS.get(name, "")
        why = f"verl: {verl_why}" + (f"; TRL: {trl_why}" if trl_why else "")
        rows.append((stabilisers.get(name, "stabiliser"), name, NOT_CARRIED, trl, why))
    return rows


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
