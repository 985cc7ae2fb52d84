"""steadyrl's per-token losses as verl policy losses: ``loss_mode=steadyrl/<name>``.

verl calls a registered loss from ``verl.workers.utils.losses.ppo_loss`` as

    fn(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights)
       -> (scalar loss, metrics)

with (B, T) padded tensors of one micro-batch. The wrapper builds steadyrl's ``LossInputs``, calls the
registry's op (``registry.resolve("loss", ...)``, a ``Method`` with the hyper-parameters bound), and then does
what steadyrl's own update does with a correction:

    ℓ'_t = ℓ_t · w_t        w = verl's ``rollout_is_weights`` (decoupled mode: π_old/μ, already truncated /
                             masked by verl's ``algorithm.rollout_correction``), times the weights of a steadyrl
                             ``bypass_correction`` computed here in bypass mode (old_log_prob = μ, anchor π_θ)
    L = agg_loss(ℓ', keep, loss_agg_mode, **config.global_batch_info)

verl has already removed the tokens its rejection sampling rejects from ``response_mask`` before it counted
``batch_num_tokens``, so they leave every normaliser, as in steadyrl (docs/normalisation.md). A bypass
correction's rejections depend on π_θ and are known only inside the loss, after verl fixed its counts: they are
zeroed (``keep``) but stay in verl's normaliser, a documented limit (status.py). ``agg_loss`` with verl's
global batch info keeps verl's normalisation over the whole mini-batch and all data-parallel ranks. Metrics
come back as ``steadyrl/<metric>`` (``actor/steadyrl/...`` in verl's logs).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from packaging.version import Version
from verl.trainer.ppo import core_algos
from verl.workers.config import PolicyLossConfig

from steadyrl import registry
from steadyrl.config import ConfigError, MethodSpec
from steadyrl.integrations import status
from steadyrl.integrations.verl import LOSS_PREFIX, TESTED_VERL, logger
from steadyrl.ops.masking import masked_fill_zero
from steadyrl.types import LossInputs

_VERL_LOSS_PARAMS = [
    "old_log_prob",
    "log_prob",
    "advantages",
    "response_mask",
    "loss_agg_mode",
    "config",
    "rollout_is_weights",
]
_AGG_PARAMS = {"loss_mat", "loss_mask", "loss_agg_mode", "dp_size", "batch_num_tokens", "global_batch_size"}


def check_verl_api() -> None:
    """Fail with the cause when verl's loss API is not the one this adapter was written against."""
    import verl

    version = Version(verl.__version__)
    if not Version(TESTED_VERL[0]) <= version < Version(TESTED_VERL[1]):
        logger.warning(
            "steadyrl's verl plugin is tested with verl >= %s, < %s; found %s.", *TESTED_VERL, verl.__version__
        )
    vanilla = core_algos.POLICY_LOSS_REGISTRY.get("vanilla")
    if vanilla is None or list(inspect.signature(vanilla).parameters) != _VERL_LOSS_PARAMS:
        raise RuntimeError(
            "verl's registered policy losses no longer take "
            f"({', '.join(_VERL_LOSS_PARAMS)}); steadyrl's wrappers would receive the wrong tensors."
        )
    missing = _AGG_PARAMS - set(inspect.signature(core_algos.agg_loss).parameters)
    if missing:
        raise RuntimeError(f"verl's agg_loss lacks {sorted(missing)}; global loss normalisation would be lost.")


@dataclass
class SteadyPolicyLossConfig(PolicyLossConfig):
    """verl's ``PolicyLossConfig`` plus steadyrl's hyper-parameters (select with ``policy_loss._target_``).

    kwargs                     the loss's hyper-parameters by steadyrl's names (``steadyrl hparams loss <name>``
                               lists them), e.g. ``{clip_low: 0.2, clip_high: 0.28}``; steadyrl's defaults
                               otherwise. verl's own ``clip_ratio*`` keys are not read by steadyrl losses.
    bypass_correction          a steadyrl correction (token_tis, seq_mis, icepop, ...) computed inside the loss
                               against μ = old_log_prob, i.e. only with ``algorithm.rollout_correction.bypass_mode
                               =true``; its anchor is π_θ (steadyrl's "current": the weight carries mismatch and
                               staleness together). In decoupled mode use verl's ``rollout_correction`` instead.
    bypass_correction_kwargs   its hyper-parameters by steadyrl's names.
    """

    kwargs: dict[str, Any] = field(default_factory=dict)
    bypass_correction: str | None = None
    bypass_correction_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.loss_mode.startswith(LOSS_PREFIX):
            resolve_loss(self.loss_mode, self.kwargs)
            if self.bypass_correction is not None:
                resolve_bypass_correction(self.bypass_correction, self.bypass_correction_kwargs)
        elif self.kwargs or self.bypass_correction:
            raise ConfigError(
                f"policy_loss.kwargs / bypass_correction apply to steadyrl losses only, but loss_mode is "
                f"{self.loss_mode!r}; set loss_mode=steadyrl/<name> or remove them."
            )


_CACHE: dict[tuple[str, str, str], Any] = {}


def resolve_loss(loss_mode: str, kwargs: dict[str, Any]):
    """The registry's loss ``loss_mode`` (without the prefix) with ``kwargs`` bound, validated by the registry."""
    key = ("loss", loss_mode, repr(sorted(dict(kwargs).items())))
    if key not in _CACHE:
        name = loss_mode.removeprefix(LOSS_PREFIX)
        if name in status.VERL_LOSS_EXCLUDED:
            raise ConfigError(f"steadyrl loss {name!r} is not carried by verl: {status.VERL_LOSS_EXCLUDED[name]}.")
        _CACHE[key] = registry.resolve("loss", MethodSpec(name, _plain(kwargs)))
    return _CACHE[key]


def resolve_bypass_correction(name: str, kwargs: dict[str, Any]):
    """A steadyrl correction for bypass mode: anchored at π_θ ("current") where the correction has an anchor."""
    key = ("correction", name, repr(sorted(dict(kwargs).items())))
    if key not in _CACHE:
        kwargs = _plain(kwargs)
        if name in status.VERL_CORRECTION_EXCLUDED:
            raise ConfigError(f"steadyrl correction {name!r} is not carried by verl: {status.VERL_CORRECTION_EXCLUDED[name]}.")
        if kwargs.get("anchor", "current") != "current":
            raise ConfigError(
                "bypass_correction_kwargs.anchor must be 'current': in bypass mode π_old = μ, so an 'old' anchor "
                "corrects nothing (use verl's decoupled rollout_correction for π_old/μ)."
            )
        if "anchor" in registry.hyperparameters("correction", name):
            kwargs = {**kwargs, "anchor": "current"}
        _CACHE[key] = registry.resolve("correction", MethodSpec(name, kwargs))
    return _CACHE[key]


def _plain(mapping: Any) -> dict[str, Any]:
    """OmegaConf containers (lists, dicts) as plain Python values, so the registry's checks and the ops see them."""
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(mapping):
            return OmegaConf.to_container(mapping, resolve=True)
    except ImportError:
        pass
    return dict(mapping or {})


_WARNED: set[str] = set()


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    out = x.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def dp_reduce_sum(dp_size: int):
    """Σ over the data-parallel group when the default process group is exactly that group, else per rank."""
    if dp_size <= 1:
        return _identity
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() == dp_size:
        return _all_reduce_sum
    if "dp" not in _WARNED:
        _WARNED.add("dp")
        logger.warning(
            "steadyrl losses with batch statistics (bapo, clip_cov, kl_cov) compute them per rank here: the "
            "default process group is not verl's data-parallel group of size %d.", dp_size
        )
    return _identity


def _policy_loss_config(config: Any) -> Any:
    if config is None:
        raise ValueError("steadyrl's verl losses need verl's actor config (config=...), as verl passes it.")
    return config.policy_loss


def make_policy_loss(loss_mode: str):
    """The verl policy-loss function for ``loss_mode`` = ``steadyrl/<name>``."""

    def steadyrl_policy_loss(
        old_log_prob: torch.Tensor,
        log_prob: torch.Tensor,
        advantages: torch.Tensor,
        response_mask: torch.Tensor,
        loss_agg_mode: str = "token-mean",
        config: Any = None,
        rollout_is_weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        policy_cfg = _policy_loss_config(config)
        loss_fn = resolve_loss(loss_mode, getattr(policy_cfg, "kwargs", None) or {})
        batch_info = dict(getattr(config, "global_batch_info", None) or {})
        mask = response_mask.bool()
        inputs = LossInputs(
            logprobs=log_prob,
            old_logprobs=old_log_prob.detach(),
            advantages=advantages.detach(),
            response_mask=mask,
            reduce_sum=dp_reduce_sum(int(batch_info.get("dp_size") or 1)),
        )
        keep = mask
        weights = torch.ones_like(log_prob.detach())
        metrics: dict[str, Any] = {}
        if rollout_is_weights is not None:
            weights = weights * rollout_is_weights.detach()
        correction = getattr(policy_cfg, "bypass_correction", None)
        if correction:
            correction_fn = resolve_bypass_correction(correction, getattr(policy_cfg, "bypass_correction_kwargs", {}))
            bypass_inputs = LossInputs(**{**inputs.__dict__, "rollout_logprobs": old_log_prob.detach()})
            corr = correction_fn(bypass_inputs)
            keep = keep & corr.mask
            weights = weights * corr.weights
            metrics.update(corr.metrics)
        loss_bt, loss_metrics = loss_fn(inputs)
        metrics.update(loss_metrics)
        policy_bt = masked_fill_zero(loss_bt * weights, keep)
        loss = core_algos.agg_loss(loss_mat=policy_bt, loss_mask=keep, loss_agg_mode=loss_agg_mode, **batch_info)
        return loss, {f"steadyrl/{k}": _scalar(v) for k, v in metrics.items()}

    steadyrl_policy_loss.__qualname__ = steadyrl_policy_loss.__name__ = f"steadyrl_{loss_mode.removeprefix(LOSS_PREFIX)}"
    return steadyrl_policy_loss


def _scalar(value: Any) -> Any:
    return value.detach().float().item() if isinstance(value, torch.Tensor) else value


def register_losses() -> list[str]:
    """Register every steadyrl loss not in ``status.VERL_LOSS_EXCLUDED``; returns the verl names."""
    names = []
    for name in registry.FAMILIES["loss"].table:
        if name in status.VERL_LOSS_EXCLUDED:
            continue
        verl_name = LOSS_PREFIX + name
        core_algos.register_policy_loss(verl_name)(make_policy_loss(verl_name))
        names.append(verl_name)
    return names
