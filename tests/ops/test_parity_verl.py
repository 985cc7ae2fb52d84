"""Parity with verl 0.9.1: verl's own policy-loss and advantage functions (``verl.trainer.ppo.core_algos``)
and steadyrl's ops on the same tensors, value and gradient ≤ 1e-6 relative (float64).

Run: ``make test-verl`` (verl is the unlocked ``verl`` extra, so its tests get a venv of their own,
.venv-verl, with this file and tests/integrations/test_verl_plugin.py). verl 0.9.1 pins transformers<5.11
(that venv resolves 5.10), and its omegaconf needs antlr4 4.9: with the 4.13.2 that the tasks extra's
math-verify pins, ``import verl.trainer.ppo.core_algos`` fails ("Could not deserialize ATN with version 3"),
so the venv has no tasks extra.

Pairings: ``sapo`` and ``geo_mean`` ↔ ``seq_mean_token_mean`` (verl forces / uses a per-sequence mean),
``dro`` and ``gpg`` ↔ ``token_mean`` (verl's ``token-mean``).  Advantages take verl's token-level reward
layout (the outcome reward on the last valid token) and its ``index`` of prompt ids.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from extras import requires_extra
from framework_parity import verl_actor_config
from steadyrl.ops.advantages_multi import gdpo_advantages, gpg_advantages, optimal_token_baseline_advantages
from steadyrl.ops.aggregation import global_counts, seq_mean_token_mean, token_mean
from steadyrl.ops.losses import reinforce_loss
from steadyrl.ops.losses_adopted import dro_loss, gmpo_loss, sapo_loss
from steadyrl.types import LossInputs

VERL_INSTALL = "make test-verl (a venv of its own, without the tasks extra)"
pytestmark = [requires_extra("verl", "verl", install=VERL_INSTALL), pytest.mark.integration]
F64 = torch.float64
RTOL, ATOL = 1e-6, 1e-10


def _core():
    import verl.trainer.ppo.core_algos as core

    return core


def _tensors(seed: int, B: int = 6, T: int = 7, spread: float = 0.3, per_token_adv: bool = False):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None] < lengths[:, None]
    logp = -(3 * torch.rand(B, T, generator=g, dtype=F64) + 0.05)
    old = (logp + spread * torch.randn(B, T, generator=g, dtype=F64)).clamp(max=-1e-3)
    adv = 1.5 * torch.randn(B, T if per_token_adv else 1, generator=g, dtype=F64).expand(B, T).clone()
    return logp, old, torch.where(mask, adv, 0.0), mask


def _grad(fn, logp):
    leaf = logp.clone().requires_grad_()
    value = fn(leaf)
    (grad,) = torch.autograd.grad(value, leaf)
    return value.detach(), grad


def _same(ours, theirs):
    torch.testing.assert_close(ours[0], theirs[0], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(ours[1], theirs[1], rtol=RTOL, atol=ATOL)
    assert ours[1].abs().sum() > 0


def _inputs(leaf, old, adv, mask) -> LossInputs:
    return LossInputs(logprobs=leaf, old_logprobs=old, advantages=adv, response_mask=mask)


def _counts(mask):
    return global_counts(mask, 1.0)


# -------------------------------------------------------------------------------------------------- losses


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("taus", [(1.0, 1.05), (2.0, 0.7)])
def test_sapo_matches_verl(seed, taus):
    logp, old, adv, mask = _tensors(seed, per_token_adv=True)
    cfg = verl_actor_config(tau_pos=taus[0], tau_neg=taus[1])
    theirs = _grad(lambda lp: _core().compute_policy_loss_sapo(old, lp, adv, mask, config=cfg)[0], logp)
    ours = _grad(lambda lp: seq_mean_token_mean(
        sapo_loss(_inputs(lp, old, adv, mask), tau_pos=taus[0], tau_neg=taus[1]).loss, mask, _counts(mask)), logp)
    _same(ours, theirs)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("per_token_adv", [False, True])
def test_gmpo_matches_verl_geo_mean(seed, per_token_adv):
    logp, old, adv, mask = _tensors(seed, per_token_adv=per_token_adv)
    cfg = verl_actor_config(clip_ratio=0.4, clip_ratio_low=0.3, clip_ratio_high=0.4)
    theirs = _grad(lambda lp: _core().compute_policy_loss_geo_mean(old, lp, adv, mask, config=cfg)[0], logp)
    ours = _grad(lambda lp: seq_mean_token_mean(
        gmpo_loss(_inputs(lp, old, adv, mask), clip_low=0.3, clip_high=0.4).loss, mask, _counts(mask)), logp)
    _same(ours, theirs)


@pytest.mark.parametrize("seed", range(4))
def test_dro_matches_verl(seed):
    from verl.workers.config.actor import PolicyLossConfig

    logp, old, adv, mask = _tensors(seed, per_token_adv=True)
    cfg = verl_actor_config(policy_loss=PolicyLossConfig(loss_mode="dro", dro_beta=0.07))
    theirs = _grad(lambda lp: _core().compute_policy_loss_dro(old, lp, adv, mask, config=cfg)[0], logp)
    ours = _grad(lambda lp: token_mean(dro_loss(_inputs(lp, old, adv, mask), beta=0.07).loss, mask, _counts(mask)), logp)
    _same(ours, theirs)


@pytest.mark.parametrize("seed", range(3))
def test_gpg_loss_is_reinforce_as_verl(seed):
    logp, old, adv, mask = _tensors(seed, per_token_adv=True)
    cfg = verl_actor_config()
    theirs = _grad(lambda lp: _core().compute_policy_loss_gpg(old, lp, adv, mask, config=cfg)[0], logp)
    ours = _grad(lambda lp: token_mean(reinforce_loss(_inputs(lp, old, adv, mask)).loss, mask, _counts(mask)), logp)
    _same(ours, theirs)


# ---------------------------------------------------------------------------------------------- advantages


def _outcome_layout(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """verl's token_level_rewards: the outcome reward on each response's last valid token."""
    last = mask.sum(dim=1) - 1
    out = torch.zeros(mask.shape, dtype=rewards.dtype)
    out[torch.arange(mask.shape[0]), last] = rewards
    return out


def _index(batch: int, group_size: int) -> np.ndarray:
    return np.array([f"prompt-{i // group_size}" for i in range(batch)], dtype=object)


@pytest.mark.parametrize("seed", range(5))
def test_gpg_advantage_matches_verl(seed):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randint(0, 3, (12,), generator=g).to(F64)
    mask = torch.ones(12, 3, dtype=torch.bool)
    theirs, _ = _core().compute_gpg_outcome_advantage(_outcome_layout(rewards, mask), mask, _index(12, 4))
    ours = gpg_advantages(rewards, 4).advantages
    torch.testing.assert_close(ours[:, None].expand(12, 3), theirs, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("seed", range(5))
def test_gdpo_matches_verl(seed):
    g = torch.Generator().manual_seed(seed)
    group_size, batch = 4, 16
    components = torch.randint(0, 3, (batch, 3), generator=g).to(F64)
    components[:group_size, 0] = 1.0  # a group without signal in one component
    weights = (1.0, 0.5, 2.0)
    keys = ["accuracy", "format", "length"]
    # one response token each: verl whitens over tokens, which then is over completions, as here
    mask = torch.ones(batch, 1, dtype=torch.bool)
    batch_td = {"prompts": torch.zeros(batch, 2, dtype=torch.long), "attention_mask": torch.ones(batch, 3, dtype=torch.long)}
    non_tensor = {k: components[:, j].numpy().astype(np.float32) for j, k in enumerate(keys)}
    cfg = {"gdpo_reward_keys": keys, "gdpo_reward_weights": list(weights)}
    theirs, _ = _core().compute_gdpo_outcome_advantage(
        torch.zeros(batch, 1), mask, _index(batch, group_size), config=cfg, non_tensor_batch=non_tensor, batch=batch_td
    )
    ours = gdpo_advantages(components, group_size, weights=weights, eps=1e-6, batch_norm="whiten", batch_eps=1e-8)
    torch.testing.assert_close(ours.advantages.float()[:, None], theirs, rtol=RTOL, atol=1e-6)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("zero_tail", [True, False])
@pytest.mark.parametrize("with_is", [False, True])
def test_optimal_token_baseline_matches_verl(seed, zero_tail, with_is):
    g = torch.Generator().manual_seed(seed)
    batch, length, group_size = 9, 6, 3
    lengths = torch.randint(1, length + 1, (batch,), generator=g)
    mask = torch.arange(length)[None] < lengths[:, None]
    old = -3 * torch.rand(batch, length, generator=g, dtype=F64) - 0.01
    sum_sq = torch.rand(batch, length, generator=g, dtype=F64) * 0.9 + 0.05
    rewards = torch.randint(0, 2, (batch,), generator=g).to(F64)
    is_w = torch.rand(batch, length, generator=g, dtype=F64) + 0.5 if with_is else None
    theirs, _ = _core().compute_optimal_token_baseline_advantage(
        _outcome_layout(rewards, mask), mask.to(F64), _index(batch, group_size), old, sum_sq,
        rollout_is_weights=is_w, handle_zero_tail=zero_tail,
    )
    ours = optimal_token_baseline_advantages(
        rewards, group_size, old_logprobs=old, sum_pi_squared=sum_sq, response_mask=mask,
        rollout_is_weights=is_w, handle_zero_tail=zero_tail,
    )
    torch.testing.assert_close(ours.advantages, theirs, rtol=RTOL, atol=ATOL)
