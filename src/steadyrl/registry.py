"""Name -> function for every method family, resolved once when a config is loaded.

Each family has one Protocol, so the trainer calls any member the same way and never branches on a name.
Hyper-parameters are bound with ``functools.partial`` after checking them against the function's signature;
an unknown name or hyper-parameter raises a ConfigError listing the valid choices.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from torch import Tensor

from steadyrl.config import ConfigError, MethodSpec
from steadyrl.ops import (
    advantages,
    advantages_multi,
    aggregation,
    correction,
    kl,
    kl_is,
    losses,
    losses_adopted,
    losses_offpolicy,
    targets,
    token_masks,
)
from steadyrl.train.capo import CapoFilter
from steadyrl.train.combiners import SumCombiner
from steadyrl.train.pcr import PCGradCombiner, PCRCombiner, SoftProjectionCombiner
from steadyrl.types import AdvantageResult, CorrectionResult, GlobalCounts, LossInputs, LossResult


class AdvantageFn(Protocol):
    def __call__(self, rewards: Tensor, group_size: int) -> AdvantageResult: ...  # rewards (B,)


class LossFn(Protocol):
    def __call__(self, inputs: LossInputs) -> LossResult: ...


class CorrectionFn(Protocol):
    def __call__(self, inputs: LossInputs) -> CorrectionResult: ...


class AggregationFn(Protocol):
    def __call__(self, loss: Tensor, mask: Tensor, counts: GlobalCounts) -> Tensor: ...  # (B,T),(B,T) -> ()


class KLFn(Protocol):
    def __call__(self, logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor) -> Tensor: ...  # (B,T) -> (B,T)


@dataclass(frozen=True)
class Entry:
    name: str
    fn: Callable[..., Any]
    description: str
    reference: str
    """The paper (arXiv id) or other public source a user can read."""
    doc: str = ""
    """The project's own page for the method (under docs/methods/), where there is one."""


def _e(name: str, fn: Callable[..., Any], description: str, reference: str, doc: str = "") -> tuple[str, Entry]:
    return name, Entry(name, fn, description, reference, doc)


# The sampler/trainer mismatch corrections come from two technical reports, not papers.
_MISMATCH = "Yao et al. 2025 (fengyao.notion.site/off-policy-rl); Liu et al. 2025 'When Speed Kills Stability'"

ADVANTAGES: dict[str, Entry] = dict(
    [
        _e("grpo", advantages.grpo_advantages, "group mean/std normalised reward", "arXiv 2402.03300"),
        _e("dr_grpo", advantages.dr_grpo_advantages, "group-mean baseline, no std division", "arXiv 2503.20783"),
        _e("raw_reward", advantages.raw_reward_advantages, "the reward itself, no baseline (REINFORCE)", "arXiv 2510.00819", "docs/methods/capo.md"),
        _e("rloo", advantages.rloo_advantages, "leave-one-out group baseline", "arXiv 2402.14740"),
        _e("batch_std", advantages.batch_std_advantages, "group mean baseline, batch std scale", "REINFORCE++ style"),
        _e("mc_grpo", advantages.mc_grpo_advantages, "median baseline, MAD scale, pivot excluded", "arXiv 2601.22582"),
        _e("bnpo", advantages.bnpo_advantages, "Beta-density normalisation of pass rates", "arXiv 2506.02864"),
        _e("gdpo", advantages_multi.gdpo_advantages, "per-component group z-scores, weighted sum, batch norm (rewards (B, K))", "arXiv 2601.05242", "docs/methods/adopted.md"),
        _e("maxrl", advantages_multi.maxrl_advantages, "MaxRL: (R − mean)/mean, 0 when the mean is 0", "arXiv 2602.02710", "docs/methods/adopted.md"),
        _e("gpg", advantages_multi.gpg_advantages, "GPG: α·(R − mean), α = N / non-zero count (loss: reinforce)", "arXiv 2504.02546", "docs/methods/adopted.md"),
    ]
)

LOSSES: dict[str, Entry] = dict(
    [
        _e("reinforce", losses.reinforce_loss, "on-policy REINFORCE −Â·log π", "Williams 1992 (REINFORCE); arXiv 2402.03300"),
        _e("ppo_clip", losses.ppo_clip_loss, "PPO/GRPO clipped surrogate, asymmetric ε, dual clip", "arXiv 2402.03300 / 2503.14476"),
        _e("gspo", losses.gspo_loss, "sequence-level clipped ratio", "arXiv 2507.18071"),
        _e("gspo_token", losses.gspo_token_loss, "GSPO-token (per-token advantages)", "arXiv 2507.18071"),
        _e("cispo", losses.cispo_loss, "clipped detached IS weight, all tokens kept", "arXiv 2506.13585"),
        _e("steer", losses.steer_loss, "entropy-change token reweighting of dual-clip PPO", "arXiv 2510.10150"),
        _e("clip_cov", losses.clip_cov_loss, "covariance-selected gradient masking", "arXiv 2505.22617"),
        _e("kl_cov", losses.kl_cov_loss, "covariance-selected KL penalty", "arXiv 2505.22617"),
        _e("reinforce_is", losses_offpolicy.reinforce_is_loss, "MiniRL: truncated-IS REINFORCE + staleness mask", "arXiv 2512.01374", "docs/methods/minirl.md"),
        _e("dppo_binary_tv", losses_offpolicy.dppo_binary_tv_loss, "DPPO binary-TV trust-region mask", "arXiv 2602.04879"),
        _e("dppo_binary_kl", losses_offpolicy.dppo_binary_kl_loss, "DPPO binary-KL trust-region mask", "arXiv 2602.04879"),
        _e("cpgd", losses_offpolicy.cpgd_loss, "clipped log-ratio PG + policy-drift KL", "arXiv 2505.12504"),
        _e("bapo", losses_offpolicy.bapo_loss, "adaptive asymmetric clip bounds", "arXiv 2510.18927"),
        _e("vespo", losses_offpolicy.vespo_loss, "soft sequence-weight kernel W^c1·exp(c2(1−W))", "arXiv 2602.10693"),
        _e("lco_kld", targets.lco_kld_loss, "LCO: KL to a one-logit-shifted target of π_old (logit-convex)", "arXiv 2603.00963", "docs/methods/lco.md"),
        _e("lco_mse", targets.lco_mse_loss, "LCO: squared error of the sampled-token logit shift", "arXiv 2603.00963", "docs/methods/lco.md"),
        _e("lco_lch", targets.lco_lch_loss, "LCO: log-cosh of the sampled-token logit shift", "arXiv 2603.00963", "docs/methods/lco.md"),
        _e("minpro", losses_offpolicy.minpro_loss, "prefix-min ratio weight (inferred reading)", "arXiv 2601.22718"),
        _e("sapo", losses_adopted.sapo_loss, "SAPO soft gate σ(τ(r − 1))·4/τ instead of the clip", "arXiv 2511.20347", "docs/methods/adopted.md"),
        _e("gmpo", losses_adopted.gmpo_loss, "GMPO geometric-mean ratio with log-space token clip", "arXiv 2507.20673", "docs/methods/adopted.md"),
        _e("luspo", losses_adopted.luspo_loss, "LUSPO: GSPO term, length-weighted (pair with seq_mean_token_sum)", "arXiv 2602.05261", "docs/methods/adopted.md"),
        _e("dro", losses_adopted.dro_loss, "DRO: −Â log π + ½β (log π − log π_old)²", "arXiv 2405.19107", "docs/methods/adopted.md"),
        _e("kimi_dppo", losses_adopted.kimi_dppo_loss, "prime-rl default: DPPO-TV mask + τ_KL (log π/μ)²", "arXiv 2602.02276 / 2602.04879", "docs/methods/adopted.md"),
        _e("dcpo", losses_adopted.dcpo_loss, "DCPO probability-dependent clip bounds", "arXiv 2509.02333", "docs/methods/adopted.md"),
    ]
)

CORRECTIONS: dict[str, Entry] = dict(
    [
        _e("token_tis", correction.token_tis, "token truncated IS min(ρ, C)", _MISMATCH),
        _e("seq_tis", correction.seq_tis, "sequence truncated IS min(Πρ, C)", _MISMATCH),
        _e("token_mis", correction.token_mis, "token masked IS (reject outside [C_min, C_max])", _MISMATCH),
        _e("seq_mis", correction.seq_mis, "sequence masked IS", _MISMATCH),
        _e("icepop", correction.icepop, "token two-sided mask", "arXiv 2510.18855"),
        _e("geo_rs", correction.geo_rs, "geometric-mean ratio rejection of sequences", _MISMATCH),
        _e("geo_rs_k3", correction.geo_rs_k3, "reject sequences whose mean k3 mismatch exceeds a bound", _MISMATCH),
        _e("opsm", correction.opsm, "off-policy sequence masking (DeepSeek-V3.2)", "DeepSeek-V3.2 technical report (2025)"),
        _e("high_entropy", token_masks.high_entropy_mask, "80/20: keep only the top-ρ entropy tokens (needs entropy)", "arXiv 2506.01939", "docs/methods/adopted.md"),
        _e("m2po", token_masks.m2po_mask, "M2PO: drop the largest (log π_old/μ)² until their mean < τ", "arXiv 2510.01161", "docs/methods/adopted.md"),
    ]
)

AGGREGATIONS: dict[str, Entry] = dict(
    [
        _e("token_mean", aggregation.token_mean, "Σℓ / global tokens (DAPO)", "arXiv 2503.14476"),
        _e("seq_mean_token_mean", aggregation.seq_mean_token_mean, "mean over sequences of per-sequence token means (GRPO)", "arXiv 2402.03300"),
        _e("seq_mean_token_sum", aggregation.seq_mean_token_sum, "Σℓ / global sequences (no length normalisation; MiniRL)", "arXiv 2512.01374", "docs/methods/minirl.md"),
        _e("constant_norm", aggregation.constant_norm, "Σℓ / (sequences × L) (Dr.GRPO)", "arXiv 2503.20783"),
    ]
)

KL_ESTIMATORS: dict[str, Entry] = dict(
    [
        _e("kl_k1", kl.kl_k1, "log π − log π_ref", "Schulman 2020, joschu.net/blog/kl-approx.html"),
        _e("kl_k2", kl.kl_k2, "½ (log π − log π_ref)²", "Schulman 2020, joschu.net/blog/kl-approx.html"),
        _e("kl_k3", kl.kl_k3, "π_ref/π − log(π_ref/π) − 1, clamped", "Schulman 2020, joschu.net/blog/kl-approx.html"),
        _e("kl_k1_st", kl.kl_k1_st, "k1 value, k2 gradient (straight-through)", "verl 'k1+'"),
        _e("kl_k3_st", kl.kl_k3_st, "k3 value, k2 gradient (straight-through)", "verl 'low_var_kl+'"),
        _e("kl_k3_is", kl_is.kl_k3_is, "(π_θ/π_old)·k3, unbiased on π_old's samples (TRL default)", "arXiv 2512.02556", "docs/methods/adopted.md"),
    ]
)

# Stateful stabilisers are classes built once per run as ``cls(model=..., distributed=..., **hyper_parameters)``.
TOKEN_FILTERS: dict[str, Entry] = dict(
    [
        _e("capo", CapoFilter, "curvature-aware token mask (predicted Fisher / objective shift)", "arXiv 2510.00819", "docs/methods/capo.md"),
    ]
)

COMBINERS: dict[str, Entry] = dict(
    [
        _e("sum", SumCombiner, "one backward of the summed loss terms (ordinary training)", "—"),
        _e("pcr", PCRCombiner, "PCR: variance-weighted soft projection of plasticity vs stability, per MLP module", "arXiv 2602.06453", "docs/methods/pcr.md"),
        _e("pcgrad", PCGradCombiner, "PCGrad: symmetric projection of conflicting plasticity / stability gradients", "arXiv 2001.06782", "docs/methods/pcr.md"),
        _e("fixed_alpha", SoftProjectionCombiner, "soft projection with a constant α (PCR ablation)", "arXiv 2602.06453", "docs/methods/pcr.md"),
    ]
)

FAMILIES: dict[str, dict[str, Entry]] = {
    "advantage": ADVANTAGES,
    "loss": LOSSES,
    "correction": CORRECTIONS,
    "aggregation": AGGREGATIONS,
    "kl": KL_ESTIMATORS,
    "token_filter": TOKEN_FILTERS,
    "combiner": COMBINERS,
}

# Positional (data) parameters of each family: everything else in a signature is a hyper-parameter.
_DATA_PARAMS = {
    "advantage": {"rewards", "group_size"},
    "loss": {"inputs"},
    "correction": {"inputs"},
    "aggregation": {"loss", "mask", "counts"},
    "kl": {"logprobs", "ref_logprobs", "mask"},
    "token_filter": {"self", "model", "distributed"},
    "combiner": {"self", "model", "distributed"},
}


def hyperparameters(family: str, name: str) -> dict[str, Any]:
    """The keyword hyper-parameters of a registered function with their defaults."""
    fn = lookup(family, name).fn
    return {
        p.name: p.default
        for p in inspect.signature(fn).parameters.values()
        if p.name not in _DATA_PARAMS[family] and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    }


def lookup(family: str, name: str) -> Entry:
    if family not in FAMILIES:
        raise ConfigError(f"unknown method family {family!r}; valid families: {', '.join(FAMILIES)}.")
    table = FAMILIES[family]
    if name not in table:
        raise ConfigError(f"unknown {family} {name!r}; valid names: {', '.join(sorted(table))}.")
    return table[name]


def build(family: str, spec: MethodSpec | str, **context: Any) -> Any:
    """Instantiate a class-based stabiliser (token_filter, combiner) with its context and hyper-parameters."""
    return resolve(family, spec)(**context)


def resolve(family: str, spec: MethodSpec | str) -> Callable[..., Any]:
    """The registered function with its hyper-parameters bound, after checking their names."""
    if isinstance(spec, str):
        spec = MethodSpec(spec)
    entry = lookup(family, spec.name)
    valid = hyperparameters(family, spec.name)
    unknown = sorted(set(spec.kwargs) - set(valid))
    if unknown:
        raise ConfigError(
            f"unknown hyper-parameter(s) {', '.join(map(repr, unknown))} for {family} {spec.name!r}; "
            f"valid: {', '.join(valid) or '(none)'}."
        )
    return functools.partial(entry.fn, **spec.kwargs) if spec.kwargs else entry.fn
