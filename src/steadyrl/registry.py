"""Name -> implementation for everything a config chooses by name: methods, tasks and rollout backends.

One style for every family. A config names an entry and its keyword arguments (``MethodSpec``); the
arguments are checked against the implementation's signature before anything is loaded, and an unknown name
or argument raises a ConfigError listing the valid ones. Function families (advantage, loss, correction,
aggregation, kl) resolve to a ``Method``: the function with its hyper-parameters bound, called the same way
for every member (the family's Protocol below), so the trainer never branches on a name. Class families
(token_filter, combiner, task, rollout_backend, and the sampling layer's prompt_selector, group_filter,
group_augmenter, reward_shaper, layer_advantage whose protocols are in ``steadyrl.sampling.base``) are built
once per run with ``build(family, spec, **context)``;
the context (the model, the tokenizer's ids ...) is not a user setting.

What differs between members of a family is a fact on its ``Entry`` (``trust_region``, ``min_group_size``),
never an ``if name == ...`` elsewhere.
"""

from __future__ import annotations

import importlib
import inspect
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
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
from steadyrl.sampling import advantages as layer_advantages
from steadyrl.sampling import augmenters, filters, selectors, shapers
from steadyrl.stabilisers.capo import CapoFilter
from steadyrl.stabilisers.combiners import SumCombiner
from steadyrl.stabilisers.pcr import PCGradCombiner, PCRCombiner, SoftProjectionCombiner
from steadyrl.tasks import ArithmeticTask, JsonlMathTask, PythonRewardTask, ReasoningGymTask, TaskError
from steadyrl.types import AdvantageResult, CorrectionResult, GlobalCounts, LossInputs, LossResult


class AdvantageFn(Protocol):
    # rewards (B,), or (B, K) for an entry with ``reads_components``; an entry with ``reads_old_statistics``
    # also takes old_logprobs=, sum_pi_squared=, response_mask= (B, T) and returns (B, T) advantages
    def __call__(self, rewards: Tensor, group_size: int) -> AdvantageResult: ...


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
    target: Callable[..., Any] | str
    """The function (function families) or the class (class families); a ``"module:attribute"`` string is
    imported when first used (the rollout backends import transformers, which `steadyrl methods` need not)."""
    description: str
    reference: str
    """The paper (arXiv id) or other public source a user can read."""
    doc: str = ""
    """The project's own page for the method (under docs/), where there is one."""
    trust_region: tuple[str, ...] = ()
    """loss: the hyper-parameters that are trust-region widths (PPO ε, DPPO δ), which the stability guard
    tightens through ``Method.with_trust_region_scale``."""
    min_group_size: int = 2
    """advantage: the smallest group an estimator can use (group-relative baselines need two completions)."""
    reads_old: bool = False
    """kl: the estimator also takes ``old_logprobs`` (π_old, the policy that sampled; DeepSeek-V3.2's IS weight)."""
    reads_old_statistics: bool = False
    """advantage: the estimator also takes π_old's per-token statistics (``old_logprobs``, ``sum_pi_squared`` =
    Σ_v π_old(v)², ``response_mask``) and returns (B, T) advantages; the score stage computes them after its
    π_old forward instead of the collect stage (the optimal token baseline)."""
    reads_components: bool = False
    """advantage: ``rewards`` may be (B, K), column k the task's k-th named reward component (GDPO); the
    collect stage passes the components instead of their sum (tasks/base.py ``RewardScores``)."""

    @property
    def fn(self) -> Callable[..., Any]:
        if isinstance(self.target, str):
            module, attribute = self.target.split(":")
            return getattr(importlib.import_module(module), attribute)
        return self.target


def _e(name: str, fn: Callable[..., Any] | str, description: str, reference: str, doc: str = "", **facts: Any) -> tuple[str, Entry]:
    return name, Entry(name, fn, description, reference, doc, **facts)


_PPO = ("clip_low", "clip_high")
_DPPO = ("delta_low", "delta_high")
# The sampler/trainer mismatch corrections come from two technical reports, not papers.
_MISMATCH = "Yao et al. 2025 (fengyao.notion.site/off-policy-rl); Liu et al. 2025 'When Speed Kills Stability'"

ADVANTAGES: dict[str, Entry] = dict(
    [
        _e("grpo", advantages.grpo_advantages, "group mean/std normalised reward", "arXiv 2402.03300"),
        _e("dr_grpo", advantages.dr_grpo_advantages, "group-mean baseline, no std division", "arXiv 2503.20783"),
        _e("raw_reward", advantages.raw_reward_advantages, "the reward itself, no baseline (REINFORCE)", "arXiv 2510.00819", "docs/methods/capo.md", min_group_size=1),
        _e("rloo", advantages.rloo_advantages, "leave-one-out group baseline", "arXiv 2402.14740"),
        _e("batch_std", advantages.batch_std_advantages, "group mean baseline, batch std scale", "REINFORCE++ style"),
        _e("mc_grpo", advantages.mc_grpo_advantages, "median baseline, MAD scale, pivot excluded", "arXiv 2601.22582", min_group_size=1),
        _e("bnpo", advantages.bnpo_advantages, "Beta-density normalisation of pass rates", "arXiv 2506.02864"),
        _e("gdpo", advantages_multi.gdpo_advantages, "per-component group z-scores, weighted sum, batch norm (rewards (B, K))", "arXiv 2601.05242", "docs/methods/adopted.md", reads_components=True),
        _e("maxrl", advantages_multi.maxrl_advantages, "MaxRL: (R − mean)/mean, 0 when the mean is 0", "arXiv 2602.02710", "docs/methods/adopted.md"),
        _e("gpg", advantages_multi.gpg_advantages, "GPG: α·(R − mean), α = N / non-zero count (loss: reinforce)", "arXiv 2504.02546", "docs/methods/adopted.md"),
        _e("optimal_token_baseline", advantages_multi.optimal_token_baseline_advantages, "per-token baseline weighted by cumulative logit-gradient energy (Σπ² from the π_old forward)", "arXiv 2602.07078", "docs/methods/adopted.md", reads_old_statistics=True),
    ]
)

LOSSES: dict[str, Entry] = dict(
    [
        _e("reinforce", losses.reinforce_loss, "on-policy REINFORCE −Â·log π", "Williams 1992 (REINFORCE); arXiv 2402.03300"),
        _e("ppo_clip", losses.ppo_clip_loss, "PPO/GRPO clipped surrogate, asymmetric ε, dual clip", "arXiv 2402.03300 / 2503.14476", trust_region=_PPO),
        _e("gspo", losses.gspo_loss, "sequence-level clipped ratio", "arXiv 2507.18071", trust_region=_PPO),
        _e("gspo_token", losses.gspo_token_loss, "GSPO-token (per-token advantages)", "arXiv 2507.18071", trust_region=_PPO),
        _e("cispo", losses.cispo_loss, "clipped detached IS weight, all tokens kept", "arXiv 2506.13585", trust_region=_PPO),
        _e("steer", losses.steer_loss, "entropy-change token reweighting of dual-clip PPO", "arXiv 2510.10150", trust_region=_PPO),
        _e("clip_cov", losses.clip_cov_loss, "covariance-selected gradient masking", "arXiv 2505.22617", trust_region=_PPO),
        _e("kl_cov", losses.kl_cov_loss, "covariance-selected KL penalty", "arXiv 2505.22617", trust_region=_PPO),
        _e("reinforce_is", losses_offpolicy.reinforce_is_loss, "MiniRL: truncated-IS REINFORCE + staleness mask", "arXiv 2512.01374", "docs/methods/minirl.md", trust_region=_PPO),
        _e("dppo_binary_tv", losses_offpolicy.dppo_binary_tv_loss, "DPPO binary-TV trust-region mask", "arXiv 2602.04879", trust_region=_DPPO),
        _e("dppo_binary_kl", losses_offpolicy.dppo_binary_kl_loss, "DPPO binary-KL trust-region mask", "arXiv 2602.04879", trust_region=_DPPO),
        _e("cpgd", losses_offpolicy.cpgd_loss, "clipped log-ratio PG + policy-drift KL", "arXiv 2505.12504", trust_region=_PPO),
        _e("bapo", losses_offpolicy.bapo_loss, "adaptive asymmetric clip bounds", "arXiv 2510.18927"),
        _e("vespo", losses_offpolicy.vespo_loss, "soft sequence-weight kernel W^c1·exp(c2(1−W))", "arXiv 2602.10693"),
        _e("lco_kld", targets.lco_kld_loss, "LCO: KL to a one-logit-shifted target of π_old (logit-convex)", "arXiv 2603.00963", "docs/methods/lco.md"),
        _e("lco_mse", targets.lco_mse_loss, "LCO: squared error of the sampled-token logit shift", "arXiv 2603.00963", "docs/methods/lco.md"),
        _e("lco_lch", targets.lco_lch_loss, "LCO: log-cosh of the sampled-token logit shift", "arXiv 2603.00963", "docs/methods/lco.md"),
        _e("minpro", losses_offpolicy.minpro_loss, "prefix-min ratio weight (inferred reading)", "arXiv 2601.22718"),
        _e("sapo", losses_adopted.sapo_loss, "SAPO soft gate σ(τ(r − 1))·4/τ instead of the clip", "arXiv 2511.20347", "docs/methods/adopted.md"),
        _e("gmpo", losses_adopted.gmpo_loss, "GMPO geometric-mean ratio with log-space token clip", "arXiv 2507.20673", "docs/methods/adopted.md", trust_region=_PPO),
        _e("luspo", losses_adopted.luspo_loss, "LUSPO: GSPO term, length-weighted (pair with seq_mean_token_sum)", "arXiv 2602.05261", "docs/methods/adopted.md", trust_region=_PPO),
        _e("dro", losses_adopted.dro_loss, "DRO: −Â log π + ½β (log π − log π_old)²", "arXiv 2405.19107", "docs/methods/adopted.md"),
        _e("kimi_dppo", losses_adopted.kimi_dppo_loss, "prime-rl default: DPPO-TV mask + τ_KL (log π/μ)²", "arXiv 2602.02276 / 2602.04879", "docs/methods/adopted.md", trust_region=("dppo_mask_low", "dppo_mask_high")),
        _e("dcpo", losses_adopted.dcpo_loss, "DCPO probability-dependent clip bounds", "arXiv 2509.02333", "docs/methods/adopted.md", trust_region=_PPO),
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
        _e("opsm", correction.opsm, "off-policy sequence masking (DeepSeek-V3.2)", "arXiv 2512.02556"),
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

_KL_NOTE = "Schulman 2020, joschu.net/blog/kl-approx.html"
KL_ESTIMATORS: dict[str, Entry] = dict(
    [
        _e("kl_k1", kl.kl_k1, "log π − log π_ref", _KL_NOTE),
        _e("kl_k2", kl.kl_k2, "½ (log π − log π_ref)²", _KL_NOTE),
        _e("kl_k3", kl.kl_k3, "π_ref/π − log(π_ref/π) − 1, clamped", _KL_NOTE),
        _e("kl_k1_st", kl.kl_k1_st, "k1 value, k2 gradient (straight-through)", "verl 'k1+'"),
        _e("kl_k3_st", kl.kl_k3_st, "k3 value, k2 gradient (straight-through)", "verl 'low_var_kl+'"),
        _e("kl_k3_is", kl_is.kl_k3_is, "(π_θ/π_old)·k3, unbiased on π_old's samples (TRL default)", "arXiv 2512.02556", "docs/methods/adopted.md", reads_old=True),
    ]
)

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

TASKS: dict[str, Entry] = dict(
    [
        _e("arithmetic", ArithmeticTask, "procedural integer arithmetic with exact-match reward", "steadyrl", "docs/quickstart.md"),
        _e("reasoning_gym", ReasoningGymTask, "any reasoning-gym dataset with its own verifier (extra: tasks)", "arXiv 2505.24760"),
        _e("jsonl_math", JsonlMathTask, "math word problems from a JSONL file, math-verify reward (extra: tasks)", "huggingface/Math-Verify"),
        _e("python", PythonRewardTask, "your reward function (file.py:function) on your data (JSONL, or any datasets source with extra: data)", "steadyrl", "docs/your-own-model.md"),
    ]
)

ROLLOUT_BACKENDS: dict[str, Entry] = dict(
    [
        _e("hf", "steadyrl.rollout.hf:HFRolloutBackend", "transformers generate with steadyrl's sampling warpers", "transformers"),
        _e("native", "steadyrl.rollout.native:NativeRolloutBackend", "steadyrl's static-cache decode loop (fused Llama/Qwen2 step, CUDA graphs)", "steadyrl", "docs/results/performance.md"),
    ]
)


# The sampling layer (steadyrl.sampling, docs/methods/sampling.md): classes built once per run.
PROMPT_SELECTORS: dict[str, Entry] = dict(
    [
        _e("uniform", selectors.UniformSelector, "uniform prompts: a fresh seeded draw per step, or from a fixed pool (pool_size)", "—", "docs/methods/sampling.md"),
        _e("vade", selectors.VadeSelector, "VADE: Beta posterior per prompt, Thompson draw, top p(1−p), two-scale decay", "arXiv 2511.18902", "docs/methods/sampling.md"),
    ]
)

GROUP_FILTERS: dict[str, Entry] = dict(
    [
        _e("dynamic_sampling", filters.DynamicSampling, "DAPO dynamic sampling: drop all-equal groups, over-sample to refill (capped rounds)", "arXiv 2503.14476", "docs/methods/sampling.md"),
        _e("iqr_entropy", filters.IqrEntropyFilter, "M-GRPO IQR filter: drop trajectories below the group's lower entropy fence", "arXiv 2512.13070", "docs/methods/sampling.md"),
    ]
)

GROUP_AUGMENTERS: dict[str, Entry] = dict(
    [
        _e("r3_replay", augmenters.R3Replay, "R³ cross-context replay of stored trajectories into all-equal groups (inferred rule)", "arXiv 2601.19620", "docs/methods/sampling.md"),
        _e("sage_hints", augmenters.SageHints, "SAGE: regenerate unrewarded groups with a hint from the reference answer", "arXiv 2602.03143", "docs/methods/sampling.md"),
    ]
)

REWARD_SHAPERS: dict[str, Entry] = dict(
    [
        _e("overlong_penalty", shapers.OverlongPenalty, "DAPO soft overlong punishment (linear in the last buffer_len tokens)", "arXiv 2503.14476", "docs/methods/sampling.md"),
        _e("majority_vote", shapers.MajorityVote, "M-GRPO: label-free reward from a majority vote of the policy and an EMA momentum copy", "arXiv 2512.13070", "docs/methods/sampling.md"),
    ]
)

LAYER_ADVANTAGES: dict[str, Entry] = dict(
    [
        _e("dcpo", layer_advantages.DCPOAdvantage, "DCPO smooth advantage: step and cumulative per-prompt z-scores blended", "arXiv 2509.02333", "docs/methods/sampling.md"),
        _e("riskpo", layer_advantages.RiskPOAdvantage, "RiskPO Mixed-VaR advantage over question bundles, tracked quantiles", "arXiv 2510.00911", "docs/methods/sampling.md"),
        _e("adora", layer_advantages.ADORAAdvantage, "ADORA: GRPO advantages damped in groups without a length advantage", "arXiv 2602.10019", "docs/methods/sampling.md"),
        _e("copo", layer_advantages.COPOAdvantage, "COPO: local GRPO and global consistency advantages, entropy-blended", "arXiv 2508.04138", "docs/methods/sampling.md"),
    ]
)

_LAYER_CONTEXT = frozenset({"self", "task", "seed", "model", "tokenizer", "backend_spec", "max_new_tokens"})


@dataclass(frozen=True)
class Family:
    table: dict[str, Entry]
    data_params: frozenset[str]
    """Arguments every member receives from the caller; every other keyword is a user setting."""
    protocol: type | None = None
    error: type[Exception] = ConfigError


FAMILIES: dict[str, Family] = {
    "advantage": Family(
        ADVANTAGES,
        frozenset({"rewards", "group_size", "old_logprobs", "sum_pi_squared", "response_mask", "rollout_is_weights"}),
        AdvantageFn,
    ),
    "loss": Family(LOSSES, frozenset({"inputs"}), LossFn),
    "correction": Family(CORRECTIONS, frozenset({"inputs"}), CorrectionFn),
    "aggregation": Family(AGGREGATIONS, frozenset({"loss", "mask", "counts"}), AggregationFn),
    "kl": Family(KL_ESTIMATORS, frozenset({"logprobs", "ref_logprobs", "mask", "old_logprobs"}), KLFn),
    "token_filter": Family(TOKEN_FILTERS, frozenset({"self", "model", "distributed", "optimizer_defaults"})),
    "combiner": Family(COMBINERS, frozenset({"self", "model", "distributed"})),
    "task": Family(TASKS, frozenset({"self"}), error=TaskError),
    "rollout_backend": Family(
        ROLLOUT_BACKENDS, frozenset({"self", "model", "pad_token_id", "eos_token_id", "sampler_dtype", "record_routing"})
    ),
    "prompt_selector": Family(PROMPT_SELECTORS, _LAYER_CONTEXT),
    "group_filter": Family(GROUP_FILTERS, _LAYER_CONTEXT),
    "group_augmenter": Family(GROUP_AUGMENTERS, _LAYER_CONTEXT),
    "reward_shaper": Family(REWARD_SHAPERS, _LAYER_CONTEXT),
    "layer_advantage": Family(LAYER_ADVANTAGES, _LAYER_CONTEXT),
}

METHOD_FAMILIES = ("advantage", "loss", "correction", "aggregation", "kl", "token_filter", "combiner",
                   "prompt_selector", "group_filter", "group_augmenter", "reward_shaper", "layer_advantage")
"""The families `steadyrl methods` lists (tasks and backends are not stabilisation methods)."""


@dataclass(frozen=True)
class Method:
    """A registered function with its hyper-parameters bound: ``method(*data)`` calls ``entry.fn``."""

    entry: Entry
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __call__(self, *args: Any, **data: Any) -> Any:
        return self.entry.fn(*args, **data, **self.kwargs)

    @property
    def name(self) -> str:
        return self.entry.name

    def with_trust_region_scale(self, scale: float) -> Method:
        """The same loss with each trust-region width (``entry.trust_region``) multiplied by ``scale``, starting
        from this method's own values (its defaults where the config set none); None (e.g. CISPO's one-sided
        clip_low) stays None. This is how the stability guard tightens a loss after a rollback."""
        defaults = parameters(self.entry.fn, frozenset())
        kwargs = dict(self.kwargs)
        for key in self.entry.trust_region:
            value = kwargs.get(key, defaults[key].default)
            if isinstance(value, int | float) and not isinstance(value, bool):
                kwargs[key] = value * scale
        return Method(self.entry, kwargs)


def parameters(fn: Callable[..., Any], data_params: frozenset[str]) -> dict[str, inspect.Parameter]:
    """The keyword parameters of ``fn`` (a function or a class's ``__init__``) that a config may set."""
    target = fn.__init__ if inspect.isclass(fn) else fn
    return {
        p.name: p
        for p in inspect.signature(target).parameters.values()
        if p.name not in data_params and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    }


def hyperparameters(family: str, name: str) -> dict[str, Any]:
    """The settable keyword arguments of a registered entry with their defaults (``inspect.Parameter.empty``
    for a required one)."""
    fam = _family(family)
    return {k: p.default for k, p in parameters(lookup(family, name).fn, fam.data_params).items()}


def _family(family: str) -> Family:
    if family not in FAMILIES:
        raise ConfigError(f"unknown family {family!r}; valid families: {', '.join(FAMILIES)}.")
    return FAMILIES[family]


def lookup(family: str, name: str) -> Entry:
    fam = _family(family)
    if name not in fam.table:
        raise fam.error(f"unknown {family} {name!r}; valid names: {', '.join(sorted(fam.table))}.")
    return fam.table[name]


def check(family: str, spec: MethodSpec | str) -> None:
    """Raise the family's error if ``spec`` names no entry or sets an argument the entry does not take."""
    _checked(family, spec)


_NON_NEGATIVE = ("clip_low", "clip_high", "delta_low", "delta_high", "dual_clip", "ratio_min", "ratio_max", "eps", "cap",
                 "beta", "top_k")
_NON_NEGATIVE_SUFFIXES = ("_cap", "_tau", "_lambda", "_coef", "_ratio", "_threshold", "temperature")


def _check_values(family: str, entry: Entry, kwargs: dict[str, Any]) -> None:
    """Types from the implementation's annotations, and no negative width, cap or coefficient, before anything
    is loaded (a bad value would otherwise fail, or silently misbehave, after the first rollout)."""
    target = entry.fn.__init__ if inspect.isclass(entry.fn) else entry.fn
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # an annotation this Python cannot resolve: leave the check to the function itself
        hints = {}
    for key, value in kwargs.items():
        hint = hints.get(key)
        if hint is not None and not _matches(value, hint):
            raise ConfigError(f"{family} {entry.name!r}: {key}={value!r} is not valid; {key} must be a {_describe(hint)}.")
        numeric = isinstance(value, int | float) and not isinstance(value, bool)
        if numeric and value < 0 and (key in _NON_NEGATIVE or key in entry.trust_region or key.endswith(_NON_NEGATIVE_SUFFIXES)):
            raise ConfigError(f"{family} {entry.name!r}: {key}={value} is negative; it must be >= 0.")


def _matches(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (tuple, list) or hint in (tuple, list):
        return isinstance(value, list | tuple)
    return True  # tensors, callables, generators: not config values; the function checks them


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(map(repr, args))
    if hint is type(None):
        return "null"
    return {float: "number", int: "integer", bool: "true/false", str: "string"}.get(hint, getattr(hint, "__name__", str(hint)))


def _checked(family: str, spec: MethodSpec | str) -> tuple[Entry, dict[str, Any]]:
    spec = MethodSpec(spec) if isinstance(spec, str) else spec
    fam = _family(family)
    entry = lookup(family, spec.name)
    valid = parameters(entry.fn, fam.data_params)
    unknown = sorted(set(spec.kwargs) - set(valid))
    if unknown:
        raise fam.error(
            f"unknown setting(s) {', '.join(map(repr, unknown))} for {family} {spec.name!r}; "
            f"valid: {', '.join(valid) or '(none)'}."
        )
    missing = [k for k, p in valid.items() if p.default is inspect.Parameter.empty and k not in spec.kwargs]
    if missing:
        raise fam.error(f"{family} {spec.name!r} needs {', '.join(map(repr, missing))}; valid: {', '.join(valid)}.")
    _check_values(family, entry, spec.kwargs)
    return entry, dict(spec.kwargs)


def resolve(family: str, spec: MethodSpec | str) -> Method:
    """A function family's entry with its hyper-parameters bound, after checking their names."""
    entry, kwargs = _checked(family, spec)
    return Method(entry, kwargs)


def build(family: str, spec: MethodSpec | str, **context: Any) -> Any:
    """Construct a class family's entry (a token filter, combiner, task or rollout backend) from its settings
    and the run's ``context`` (the arguments in the family's data parameters that the class takes)."""
    entry, kwargs = _checked(family, spec)
    accepted = set(inspect.signature(entry.fn.__init__).parameters)
    return entry.fn(**{k: v for k, v in context.items() if k in accepted}, **kwargs)


def build_task(spec: MethodSpec | str, **kwargs: Any) -> Any:
    """A registered task: ``build_task("arithmetic", max_digits=2)`` or ``build_task(cfg.task.spec)``."""
    if isinstance(spec, str):
        spec = MethodSpec(spec, kwargs)
    return build("task", spec)


def build_backend(spec: MethodSpec | str, model: Any, tokenizer: Any, *, sampler_dtype: Any = None) -> Any:
    """A registered rollout backend on ``model``, with the tokenizer's pad / EOS ids and the spec's options."""
    return build(
        "rollout_backend",
        spec,
        model=model,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        sampler_dtype=sampler_dtype,
    )
