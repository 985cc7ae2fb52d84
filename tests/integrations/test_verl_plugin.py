"""steadyrl's verl plugin: loaded by verl itself, and numerically the same as steadyrl's ops through verl's real
call path (``verl.workers.utils.losses.ppo_loss`` on nested, unpadded model output, as verl's engines call it).

Run: ``make test-verl`` (a venv of its own with the ``verl`` extra and without the tasks extra; see
tests/ops/test_parity_verl.py), which runs this file and the ops-level parity tests.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import zlib

import pytest
import torch

from extras import requires_extra
from steadyrl import registry
from steadyrl.config import ConfigError, MethodSpec
from steadyrl.integrations import status
from steadyrl.ops import aggregation
from steadyrl.types import GlobalCounts, LossInputs

pytestmark = requires_extra("verl", "verl", "ray", "hydra", "tensordict",
                            install="make test-verl (a venv of its own, without the tasks extra)")

CARRIED = [n for n in registry.FAMILIES["loss"].table if n not in status.VERL_LOSS_EXCLUDED]
CARRIED_ADVANTAGES = [n for n, e in registry.FAMILIES["advantage"].table.items() if not e.reads_old_statistics]
AGG = {
    "token-mean": aggregation.token_mean,
    "seq-mean-token-mean": aggregation.seq_mean_token_mean,
    "seq-mean-token-sum": aggregation.seq_mean_token_sum,
    "seq-mean-token-sum-norm": aggregation.constant_norm,
}
SCALE = 7  # actor.loss_scale_factor: L of seq-mean-token-sum-norm (= Dr.GRPO's constant)


def _batch(seed: int = 0, B: int = 6, Tp: int = 4, T: int = 5, dtype=torch.float64):
    """Left-padded prompts, right-padded responses of varied lengths, and the per-token tensors of the loss."""
    g = torch.Generator().manual_seed(seed)
    prompt_len = torch.randint(1, Tp + 1, (B,), generator=g)
    resp_len = torch.randint(1, T + 1, (B,), generator=g)
    resp_len[0] = T
    prompt_mask = torch.arange(Tp)[None, :] >= (Tp - prompt_len)[:, None]
    response_mask = torch.arange(T)[None, :] < resp_len[:, None]
    logp = (-torch.rand(B, T, generator=g, dtype=dtype) * 2 - 0.05).requires_grad_(True)
    old = logp.detach() + 0.3 * torch.randn(B, T, generator=g, dtype=dtype)
    adv = torch.randn(B, 1, generator=g, dtype=dtype).expand(B, T).clone()
    weights = torch.rand(B, T, generator=g, dtype=dtype) * 1.5 + 0.25
    return dict(prompt_mask=prompt_mask, response_mask=response_mask, logp=logp, old=old.clamp(max=-1e-3),
                adv=adv, weights=weights, Tp=Tp, T=T)


def _actor_config(loss_mode: str, loss_agg_mode: str, **policy_loss):
    from verl.utils.config import omega_conf_to_dataclass

    # The same construction verl's workers use: hydra instantiate of the actor section with its _target_s.
    cfg = {
        "_target_": "verl.workers.config.FSDPActorConfig",
        "strategy": "fsdp",
        "rollout_n": 1,
        "ppo_micro_batch_size_per_gpu": 2,
        "loss_agg_mode": loss_agg_mode,
        "loss_scale_factor": SCALE,
        "policy_loss": {
            "_target_": "steadyrl.integrations.verl.SteadyPolicyLossConfig",
            "loss_mode": loss_mode,
            **policy_loss,
        },
    }
    return omega_conf_to_dataclass(cfg)


def verl_ppo_loss(b: dict, actor_config, with_weights: bool = False):
    """verl's ppo_loss on the batch as verl's engine hands it over: unpadded nested log-probs of full sequences."""
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.losses import ppo_loss
    from verl.workers.utils.padding import left_right_2_no_padding

    B, Tp, T = b["logp"].shape[0], b["Tp"], b["T"]
    attention = torch.cat([b["prompt_mask"], b["response_mask"]], dim=1)
    # its own generator: the global RNG must reach the loss as seeded (clip_cov breaks ties at random)
    input_ids = torch.randint(3, 20, (B, Tp + T), generator=torch.Generator().manual_seed(0)) * attention
    position_ids = (attention.long().cumsum(1) - 1).clamp(min=0)
    fields = {
        "prompts": input_ids[:, :Tp],
        "responses": input_ids[:, Tp:],
        "input_ids": input_ids,
        "attention_mask": attention.long(),
        "position_ids": position_ids,
        "response_mask": b["response_mask"].long(),
        "old_log_probs": b["old"],
        "advantages": b["adv"],
    }
    if with_weights:
        fields["rollout_is_weights"] = b["weights"]
    data = left_right_2_no_padding(TensorDict(fields, batch_size=[B]))
    tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=int(b["response_mask"].sum()), global_batch_size=B)
    # log-prob of token p+1 sits at position p: the response's log-probs start at the last prompt token
    full = torch.cat([b["logp"].new_zeros(B, Tp - 1), b["logp"], b["logp"].new_zeros(B, 1)], dim=1)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), attention.sum(1).cumsum(0)])
    log_probs = torch.nested.nested_tensor_from_jagged(full[attention], offsets=offsets)
    loss, metrics = ppo_loss(actor_config, {"log_probs": log_probs}, data)
    (grad,) = torch.autograd.grad(loss, b["logp"])
    return loss.detach(), grad, metrics


def steadyrl_reference(b: dict, name: str, kwargs: dict, loss_agg_mode: str, with_weights: bool = False):
    """steadyrl's registered op and aggregation on the same tensors, with verl's global counts."""
    mask = b["response_mask"]
    inputs = LossInputs(logprobs=b["logp"], old_logprobs=b["old"], advantages=b["adv"], response_mask=mask)
    loss_bt = registry.resolve("loss", MethodSpec(name, kwargs))(inputs).loss
    if with_weights:
        loss_bt = loss_bt * b["weights"]
    counts = GlobalCounts(num_tokens=float(mask.sum()), num_seqs=float(mask.shape[0]), max_len=float(SCALE))
    loss = AGG[loss_agg_mode](torch.where(mask, loss_bt, 0.0), mask, counts)
    (grad,) = torch.autograd.grad(loss, b["logp"])
    return loss.detach(), grad


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-6) -> None:
    scale = max(b.abs().max().item(), 1e-12)
    assert (a - b).abs().max().item() <= rel * scale, f"max |Δ| {(a - b).abs().max().item():.3e} vs scale {scale:.3e}"


@pytest.mark.parametrize("name", CARRIED)
def test_every_carried_loss_matches_steadyrl_through_verl_ppo_loss(name):
    b = _batch(seed=zlib.crc32(name.encode()) % 1000)
    torch.manual_seed(0)  # clip_cov breaks ties at random
    ref_loss, ref_grad = steadyrl_reference(b, name, {}, "token-mean", with_weights=True)
    torch.manual_seed(0)
    loss, grad, _ = verl_ppo_loss(b, _actor_config(f"steadyrl/{name}", "token-mean"), with_weights=True)
    _close(loss, ref_loss)
    _close(grad, ref_grad)


@pytest.mark.parametrize("mode", list(AGG))
def test_aggregation_modes_are_verls_global_normalisation(mode):
    b = _batch(seed=3)
    kwargs = {"clip_low": 0.1, "clip_high": 0.28, "dual_clip": 3.0}
    ref_loss, ref_grad = steadyrl_reference(b, "ppo_clip", kwargs, mode)
    loss, grad, _ = verl_ppo_loss(b, _actor_config("steadyrl/ppo_clip", mode, kwargs=kwargs))
    _close(loss, ref_loss)
    _close(grad, ref_grad)


def test_ppo_clip_equals_verls_own_vanilla_loss():
    """Same method, two implementations: steadyrl/ppo_clip and verl's vanilla (dual clip c = 3)."""
    b = _batch(seed=5)
    kwargs = {"clip_low": 0.2, "clip_high": 0.28, "dual_clip": 3.0}
    ours = verl_ppo_loss(b, _actor_config("steadyrl/ppo_clip", "token-mean", kwargs=kwargs), with_weights=True)
    from verl.utils.config import omega_conf_to_dataclass

    vanilla = omega_conf_to_dataclass({
        "_target_": "verl.workers.config.FSDPActorConfig", "strategy": "fsdp", "rollout_n": 1,
        "ppo_micro_batch_size_per_gpu": 2, "clip_ratio_low": 0.2, "clip_ratio_high": 0.28, "clip_ratio_c": 3.0,
        "policy_loss": {"_target_": "verl.workers.config.PolicyLossConfig", "loss_mode": "vanilla"},
    })
    theirs = verl_ppo_loss(b, vanilla, with_weights=True)
    _close(ours[0], theirs[0])
    _close(ours[1], theirs[1])


def test_cispo_equals_verls_own_cispo_loss():
    b = _batch(seed=6)
    # verl's CISPO clips two-sided: steadyrl's clip_low / clip_high are the same ε's
    ours = verl_ppo_loss(b, _actor_config("steadyrl/cispo", "token-mean", kwargs={"clip_low": 0.2, "clip_high": 0.28}))
    from verl.utils.config import omega_conf_to_dataclass

    theirs_cfg = omega_conf_to_dataclass({
        "_target_": "verl.workers.config.FSDPActorConfig", "strategy": "fsdp", "rollout_n": 1,
        "ppo_micro_batch_size_per_gpu": 2, "clip_ratio_low": 0.2, "clip_ratio_high": 0.28,
        "policy_loss": {"_target_": "verl.workers.config.PolicyLossConfig", "loss_mode": "cispo"},
    })
    theirs = verl_ppo_loss(b, theirs_cfg)
    _close(ours[0], theirs[0])
    _close(ours[1], theirs[1])


def _verl_own_config(loss_mode: str, loss_agg_mode: str, policy_loss: dict | None = None, **actor):
    from verl.utils.config import omega_conf_to_dataclass

    return omega_conf_to_dataclass({
        "_target_": "verl.workers.config.FSDPActorConfig", "strategy": "fsdp", "rollout_n": 1,
        "ppo_micro_batch_size_per_gpu": 2, "loss_agg_mode": loss_agg_mode, "loss_scale_factor": SCALE, **actor,
        "policy_loss": {"_target_": "verl.workers.config.PolicyLossConfig", "loss_mode": loss_mode, **(policy_loss or {})},
    })


# steadyrl loss (kwargs), verl's own loss_mode (its config), the aggregation verl uses, with rollout_is_weights.
# verl's geo_mean folds the IS weights into one geometric-mean weight per sequence (and takes a local mean);
# steadyrl/gmpo weights each token, as steadyrl's trainer does, so the pair is compared without weights.
ADOPTED = [
    ("sapo", {"tau_pos": 2.0, "tau_neg": 0.7}, "sapo", {}, {"tau_pos": 2.0, "tau_neg": 0.7}, "seq-mean-token-mean", True),
    ("gmpo", {"clip_low": 0.3, "clip_high": 0.4}, "geo_mean", {}, {"clip_ratio_low": 0.3, "clip_ratio_high": 0.4},
     "seq-mean-token-mean", False),
    ("dro", {"beta": 0.07}, "dro", {"dro_beta": 0.07}, {}, "token-mean", True),
    ("reinforce", {}, "gpg", {}, {}, "token-mean", True),
]


@pytest.mark.parametrize(("ours", "kwargs", "theirs", "policy_loss", "actor", "mode", "weights"), ADOPTED,
                         ids=[row[0] for row in ADOPTED])
def test_adopted_losses_equal_verls_own_through_ppo_loss(ours, kwargs, theirs, policy_loss, actor, mode, weights):
    """Methods verl also implements: steadyrl/<name> and verl's own loss_mode, both through ppo_loss, same
    tensors, same loss and gradient (ops-level parity: tests/ops/test_parity_verl.py)."""
    b = _batch(seed=7)
    b["adv"] = torch.randn(b["adv"].shape, generator=torch.Generator().manual_seed(8), dtype=b["adv"].dtype)  # per token
    ours_out = verl_ppo_loss(b, _actor_config(f"steadyrl/{ours}", mode, kwargs=kwargs), with_weights=weights)
    theirs_out = verl_ppo_loss(b, _verl_own_config(theirs, mode, policy_loss, **actor), with_weights=weights)
    _close(ours_out[0], theirs_out[0])
    _close(ours_out[1], theirs_out[1])
    assert ours_out[1].abs().sum() > 0


def test_metrics_are_namespaced():
    b = _batch(seed=1)
    _, _, metrics = verl_ppo_loss(b, _actor_config("steadyrl/ppo_clip", "token-mean"))
    ours = [k for k in metrics if "steadyrl" in k]
    assert ours and all(k.startswith("steadyrl/") for k in ours)


def test_bypass_correction_is_steadyrls_correction_against_old_as_mu():
    """In bypass mode old_log_prob = μ: token_tis with anchor π_θ weights each token by min(π_θ/μ, C)."""
    b = _batch(seed=2)
    loss, grad, metrics = verl_ppo_loss(
        b, _actor_config("steadyrl/reinforce", "token-mean", bypass_correction="token_tis",
                         bypass_correction_kwargs={"cap": 1.5})
    )
    rho = torch.exp(b["logp"].detach() - b["old"]).clamp(max=1.5)
    mask = b["response_mask"]
    by_hand = torch.where(mask, -b["adv"] * b["logp"] * rho, 0.0).sum() / mask.sum()
    _close(loss, by_hand.detach())
    (ref_grad,) = torch.autograd.grad(by_hand, b["logp"])
    _close(grad, ref_grad)
    assert "steadyrl/mismatch/is_weight_mean" in metrics


def test_a_bypass_correction_without_an_anchor_setting_is_not_given_one():
    """m2po takes an anchor (set to π_θ here); its rejections are zeroed in the loss (verl's counts stay)."""
    b = _batch(seed=4)
    loss, grad, metrics = verl_ppo_loss(
        b, _actor_config("steadyrl/reinforce", "token-mean", bypass_correction="m2po",
                         bypass_correction_kwargs={"m2_threshold": 0.01})
    )
    mask = b["response_mask"]
    inputs = LossInputs(logprobs=b["logp"].detach(), old_logprobs=b["old"], advantages=b["adv"], response_mask=mask,
                        rollout_logprobs=b["old"])
    keep = registry.resolve("correction", MethodSpec("m2po", {"m2_threshold": 0.01, "anchor": "current"}))(inputs).mask
    assert (mask & ~keep).any()  # the threshold rejects some tokens
    by_hand = torch.where(mask & keep, -b["adv"] * b["logp"], 0.0).sum() / mask.sum()
    _close(loss, by_hand.detach())


def test_bad_hyper_parameters_fail_when_verl_builds_the_config():
    from hydra.errors import (
        InstantiationException as Wrapped,  # hydra wraps our ConfigError, keeping its sentence
    )

    with pytest.raises(Wrapped, match="clip_hihg"):
        _actor_config("steadyrl/ppo_clip", "token-mean", kwargs={"clip_hihg": 0.3})
    with pytest.raises(Wrapped, match="not carried by verl"):
        _actor_config("steadyrl/steer", "token-mean")
    with pytest.raises(Wrapped, match="anchor"):
        _actor_config("steadyrl/reinforce", "token-mean", bypass_correction="token_tis",
                      bypass_correction_kwargs={"anchor": "old"})
    with pytest.raises(Wrapped, match="not carried by verl"):  # the entropy mask needs π_θ's entropy
        _actor_config("steadyrl/reinforce", "token-mean", bypass_correction="high_entropy")
    with pytest.raises(Wrapped, match="steadyrl losses only"):
        _actor_config("vanilla", "token-mean", kwargs={"clip_low": 0.1})


def test_verl_loads_the_plugin_through_its_entry_point():
    code = (
        "import verl\n"
        "from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY as L, ADV_ESTIMATOR_REGISTRY as A\n"
        "print(sorted(k for k in L if k.startswith('steadyrl/')), sorted(k for k in A if k.startswith('steadyrl/')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True).stdout
    for name in CARRIED:
        assert f"'steadyrl/{name}'" in out
    for name in status.VERL_LOSS_EXCLUDED:
        assert f"'steadyrl/{name}'" not in out
    for name in registry.FAMILIES["advantage"].table:
        assert f"'steadyrl/{name}'" in out


def test_a_failed_load_is_loud_and_names_its_cause(monkeypatch, caplog):
    from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY, get_policy_loss_fn

    import steadyrl.integrations.verl as plugin

    def broken():
        raise ImportError("verl moved agg_loss")

    saved = POLICY_LOSS_REGISTRY.pop("steadyrl/ppo_clip")
    monkeypatch.setattr(plugin, "install", broken)
    try:
        with caplog.at_level(logging.ERROR, logger="steadyrl.integrations.verl"):
            plugin._install_or_explain()
        assert "verl moved agg_loss" in caplog.text
        with pytest.raises(RuntimeError, match="verl moved agg_loss"):
            plugin.check()
        with pytest.raises(RuntimeError, match="steadyrl/ppo_clip is unavailable: .*verl moved agg_loss"):
            get_policy_loss_fn("steadyrl/ppo_clip")()
    finally:
        POLICY_LOSS_REGISTRY["steadyrl/ppo_clip"] = saved
        monkeypatch.undo()
        plugin._install_or_explain()
    plugin.check()


# ------------------------------------------------------------------------------------------- advantages


def _verl_advantage(name: str, rewards: torch.Tensor, index, **algorithm):
    from omegaconf import OmegaConf
    from verl.trainer.ppo.core_algos import get_adv_estimator_fn

    B, T = rewards.shape[0], 4
    mask = (torch.arange(T)[None, :] < torch.tensor([T, 2, 3, 1, 4, 2, 3, 4][:B])[:, None]).float()
    token_rewards = torch.zeros(B, T)
    token_rewards[torch.arange(B), mask.sum(1).long() - 1] = rewards  # outcome reward on the last token
    fn = get_adv_estimator_fn(name)
    config = OmegaConf.create({"adv_estimator": name, **algorithm})
    adv, _ = fn(token_level_rewards=token_rewards, response_mask=mask, index=index, config=config)
    return adv, mask


@pytest.mark.parametrize("name", CARRIED_ADVANTAGES)
def test_every_advantage_estimator_is_steadyrls_on_verls_shuffled_groups(name):
    import numpy as np

    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.5])
    index = np.array(["a", "b", "a", "b", "a", "b", "a", "b"], dtype=object)
    adv, mask = _verl_advantage(f"steadyrl/{name}", rewards, index)
    order = torch.tensor([0, 2, 4, 6, 1, 3, 5, 7])  # the groups, contiguous
    result = registry.resolve("advantage", name)(rewards[order], 4)
    expected = torch.zeros(8)
    expected[order] = torch.where(result.sample_mask, result.advantages, torch.zeros_like(result.advantages))
    torch.testing.assert_close(adv, expected[:, None] * mask, rtol=1e-6, atol=1e-7)


def test_grpo_rloo_dr_grpo_equal_verls_own_estimators():
    import numpy as np

    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.5])
    index = np.array(["a", "b", "a", "b", "a", "b", "a", "b"], dtype=object)
    pairs = [("grpo", "grpo", {}), ("dr_grpo", "grpo", {"norm_adv_by_std_in_grpo": False}), ("rloo", "rloo", {})]
    for ours, theirs, algorithm in pairs:
        from verl.trainer.ppo import core_algos

        a, mask = _verl_advantage(f"steadyrl/{ours}", rewards, index)
        b_fn = core_algos.compute_grpo_outcome_advantage if theirs == "grpo" else core_algos.get_adv_estimator_fn(theirs)
        token_rewards = torch.zeros_like(mask)
        token_rewards[torch.arange(8), mask.sum(1).long() - 1] = rewards
        kwargs = {"norm_adv_by_std_in_grpo": algorithm["norm_adv_by_std_in_grpo"]} if algorithm else {}
        b, _ = b_fn(token_level_rewards=token_rewards, response_mask=mask, index=index, **kwargs)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"steadyrl/{ours} vs verl {theirs}")


def test_an_estimator_that_reads_old_statistics_is_refused_with_verls_own_named():
    """verl passes sum_pi_squared / old_log_probs to its own estimator names only, so steadyrl/<name> of such an
    estimator raises a sentence naming verl's optimal_token_baseline instead of failing inside the call."""
    import numpy as np

    refused = [n for n, e in registry.FAMILIES["advantage"].table.items() if e.reads_old_statistics]
    assert refused, "no estimator reads π_old's statistics: this test checks nothing"
    for name in refused:
        with pytest.raises(ConfigError, match="adv_estimator=optimal_token_baseline"):
            _verl_advantage(f"steadyrl/{name}", torch.ones(4), np.array(["a", "a", "b", "b"], dtype=object))


def test_advantage_hyper_parameters_come_from_algorithm_steadyrl_kwargs():
    import numpy as np

    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0])
    index = np.array(["a"] * 4, dtype=object)
    plain, _ = _verl_advantage("steadyrl/grpo", rewards, index)
    wide, _ = _verl_advantage("steadyrl/grpo", rewards, index, steadyrl_kwargs={"eps": 10.0})
    assert (wide.abs().max() < plain.abs().max()).item()
    with pytest.raises(ConfigError, match="epz"):
        _verl_advantage("steadyrl/grpo", rewards, index, steadyrl_kwargs={"epz": 1.0})


def test_unequal_groups_are_refused_with_the_fix():
    import numpy as np

    with pytest.raises(ConfigError, match="same number of completions"):
        _verl_advantage("steadyrl/grpo", torch.ones(3), np.array(["a", "a", "b"], dtype=object))


def test_documented_command_line_composes():
    """docs/integrations/verl.md's main_ppo overrides, composed with verl's ppo_trainer config by hydra, build an
    actor config whose loss is steadyrl's, and verl's own config validation passes."""
    import importlib.resources
    import re
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from verl.utils.config import omega_conf_to_dataclass, validate_config

    from steadyrl.integrations.verl import SteadyPolicyLossConfig

    doc = (Path(__file__).resolve().parents[2] / "docs/integrations/verl.md").read_text()
    block = re.search(r"python3 -m verl\.trainer\.main_ppo \\\n(.*?)```", doc, re.S).group(1)
    overrides = [line.strip().rstrip("\\").strip() for line in block.splitlines() if line.strip()]
    config_dir = str(importlib.resources.files("verl") / "trainer" / "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        cfg = compose(config_name="ppo_trainer", overrides=overrides)
    actor = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
    assert isinstance(actor.policy_loss, SteadyPolicyLossConfig)
    assert actor.policy_loss.loss_mode == "steadyrl/cispo" and actor.policy_loss.kwargs == {"clip_high": 5.0}
    assert cfg.algorithm.adv_estimator == "steadyrl/dr_grpo"
    validate_config(cfg, use_reference_policy=False, use_critic=False)  # what main_ppo checks before Ray starts


def test_self_check_command_lists_what_verl_resolves():
    out = subprocess.run([sys.executable, "-m", "steadyrl.integrations.verl"], capture_output=True, text=True,
                         timeout=300, check=True).stdout
    assert "steadyrl/ppo_clip" in out and "steadyrl/grpo" in out and "not carried: steer" in out


@pytest.mark.parametrize(
    ("ours", "kwargs", "rollout_is", "threshold"),
    [("token_tis", {"cap": 2.0}, "token", 2.0), ("seq_tis", {"cap": 2.0}, "sequence", 2.0),
     ("icepop", {"ratio_min": 0.5, "ratio_max": 5.0}, "token", "0.5_5.0")],
)
def test_corrections_equal_verls_rollout_correction_weights(ours, kwargs, rollout_is, threshold):
    """Decoupled mode (anchor π_old): steadyrl's weight × keep-mask = verl's rollout_is_weights. (verl's IcePop
    zeroes the weight and keeps the token in response_mask, i.e. in the normaliser; steadyrl removes it.)"""
    from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_and_rejection_mask

    b = _batch(seed=11)
    old, mask = b["old"], b["response_mask"]
    mu = old + 0.6 * torch.randn(old.shape, generator=torch.Generator().manual_seed(3), dtype=old.dtype)
    inputs = LossInputs(logprobs=old.clone(), old_logprobs=old, advantages=b["adv"], response_mask=mask,
                        rollout_logprobs=mu)
    result = registry.resolve("correction", MethodSpec(ours, kwargs))(inputs)
    proto, verl_mask, _ = compute_rollout_correction_and_rejection_mask(
        old_log_prob=old, rollout_log_prob=mu, response_mask=mask.long(), rollout_is=rollout_is,
        rollout_is_threshold=threshold,
    )
    theirs = proto.batch["rollout_is_weights"]
    ours_w = torch.where(mask & result.mask, result.weights, 0.0)
    torch.testing.assert_close(ours_w, torch.where(mask, theirs, 0.0), rtol=1e-6, atol=1e-9)
    assert torch.equal(verl_mask.bool(), mask)
