"""Routing Replay in the trainer (R2 / R3, arXiv 2512.01374 §5): wiring, metrics, the MiniRL MoE recipes."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from sevens_task import SevensTask
from steadyrl.config import ConfigError
from steadyrl.config_load import load_config
from steadyrl.models import build_char_tokenizer, build_tiny_model, tiny_model_config
from steadyrl.models.routing import RoutingRecorder, RoutingReplayer, supported_moe_layers
from steadyrl.models.tokenizer import ARITHMETIC_ALPHABET
from steadyrl.report import read_metrics
from steadyrl.runtime.checkpoint import save_pretrained_atomic
from steadyrl.train.forward import policy_forward
from steadyrl.train.trainer import Trainer

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
ROUTING_KEYS = ("routing/agreement", "routing/agreement_all_layers", "mismatch/kl_k3_no_replay", "mismatch/kl_k3")


def _moe_dir(tmp_path_factory, arch: str) -> str:
    path = tmp_path_factory.mktemp(f"tiny-{arch}")
    tok = build_char_tokenizer(ARITHMETIC_ALPHABET)
    cfg = tiny_model_config(arch, vocab_size=len(tok), hidden_size=32, num_layers=2, num_heads=2, norm_topk_prob=True)
    save_pretrained_atomic(build_tiny_model(cfg, seed=0), tok, path)
    return str(path)


@pytest.fixture(scope="session")
def qwen2_moe_dir(tmp_path_factory):
    return _moe_dir(tmp_path_factory, "qwen2_moe")


@pytest.fixture(scope="session")
def qwen3_moe_dir(tmp_path_factory):
    return _moe_dir(tmp_path_factory, "qwen3_moe")


def _minirl(tiny_config, model_dir, *overrides):
    return tiny_config(
        f"model.name_or_path={model_dir}",
        "loss.name=reinforce_is",
        "advantage.name=dr_grpo",
        "aggregation.name=seq_mean_token_sum",
        "rollout.sampler_dtype=bfloat16",
        *overrides,
    )


def _finite_rows(run_dir):
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        for key, value in row.items():
            assert math.isfinite(value), f"step {row['step']}: {key} = {value}"
    return rows


@pytest.mark.parametrize(
    "arch,overrides",
    [
        ("qwen2_moe", ("routing_replay=R2", "optim.mini_batches=2")),
        ("qwen3_moe", ("routing_replay=R3", "optim.mini_batches=4", "optim.micro_batch_size=2", "kl.coef=0.1", "rollout.prompts_per_step=2")),
        ("qwen3_moe", ("routing_replay=none",)),
    ],
)
def test_routing_replay_trains_with_routing_metrics(tiny_config, qwen2_moe_dir, qwen3_moe_dir, arch, overrides):
    cfg = _minirl(tiny_config, qwen2_moe_dir if arch == "qwen2_moe" else qwen3_moe_dir, *overrides)
    trainer = Trainer(cfg, task=SevensTask())
    routers_before = [r.weight.detach().clone() for r in supported_moe_layers(trainer.model)]
    trainer.train()
    rows = _finite_rows(cfg.run.output_dir)
    for key in ROUTING_KEYS:
        assert key in rows[-1], key
        assert 0.0 <= rows[-1][key] <= 1.0 or key.startswith("mismatch/")
    for before, router in zip(routers_before, supported_moe_layers(trainer.model)):
        assert not torch.equal(before, router.weight.detach())  # replayed gates still train the router


def test_dense_model_with_routing_replay_fails_before_training(tiny_config):
    with pytest.raises(ConfigError, match="routing_replay=none"):
        Trainer(tiny_config("routing_replay=R2"), task=SevensTask())


def _collected(trainer):
    scored = trainer.collector.collect(1).batch
    return scored, scored.rollout.routed_experts.clone()


def test_r2_replays_the_old_forwards_own_routing_even_on_policy(tiny_config, qwen2_moe_dir):
    trainer = Trainer(_minirl(tiny_config, qwen2_moe_dir, "routing_replay=R2"), task=SevensTask())
    scored, sampler_routing = _collected(trainer)
    metrics = trainer.scorer.score(scored)
    assert scored.old_logprobs is not None  # π_old is computed on-policy (N = 1) because R2 records there
    rollout = scored.rollout
    with torch.no_grad(), RoutingRecorder(trainer.model) as recorder:
        plain = policy_forward(trainer.model, rollout, compute_entropy=False)
    assert torch.equal(rollout.routed_experts, recorder.routed_experts(rollout.batch_size))  # the trainer's own
    assert rollout.routed_experts.shape == sampler_routing.shape
    # At θ = θ_old the replayed training forward is π_old exactly (norm_topk_prob=True: same gating).
    with torch.no_grad(), RoutingReplayer(trainer.model, rollout.routed_experts):
        replayed = policy_forward(trainer.model, rollout, compute_entropy=False)
    mask = scored.token_mask
    assert torch.equal(replayed.logprobs[mask], scored.old_logprobs[mask])
    torch.testing.assert_close(plain.logprobs[mask], scored.old_logprobs[mask], atol=1e-5, rtol=0)
    assert set(metrics) == {"routing/agreement", "routing/agreement_all_layers", "mismatch/kl_k3_no_replay"}


def test_r3_replays_the_sampler_routing_in_the_old_forward(tiny_config, qwen3_moe_dir):
    trainer = Trainer(_minirl(tiny_config, qwen3_moe_dir, "routing_replay=R3", "optim.mini_batches=2"), task=SevensTask())
    scored, sampler_routing = _collected(trainer)
    assert sampler_routing.shape[1] == scored.rollout.prompt_ids.shape[1] + scored.rollout.completion_ids.shape[1]
    trainer.scorer.score(scored)
    assert torch.equal(scored.rollout.routed_experts, sampler_routing)  # R3 keeps the sampler's routing
    with torch.no_grad(), RoutingReplayer(trainer.model, sampler_routing):
        replayed = policy_forward(trainer.model, scored.rollout, compute_entropy=False)
    mask = scored.token_mask
    assert torch.equal(replayed.logprobs[mask], scored.old_logprobs[mask])


def test_routing_diagnostics_can_be_turned_off(tiny_config, qwen3_moe_dir, tmp_path):
    assert Trainer(_minirl(tiny_config, qwen3_moe_dir, "routing_replay=R3"), task=SevensTask()).scorer.settings.routing_diagnostics
    cfg = _minirl(tiny_config, qwen3_moe_dir, "routing_replay=R3", "routing_diagnostics=false", f"run.output_dir={tmp_path / 'off'}")
    trainer = Trainer(cfg, task=SevensTask())
    scored, _ = _collected(trainer)
    assert trainer.scorer.score(scored) == {}
    assert scored.old_logprobs is None  # on-policy R3 needs no π_old forward


@pytest.mark.parametrize("recipe", ["minirl_moe_r2", "minirl_moe_r3"])
def test_recipes_train_on_a_tiny_moe_model(recipe, qwen3_moe_dir, tmp_path):
    assert load_config(CONFIGS / f"{recipe}.yaml").model.name_or_path == "embedded:tiny-adder-moe"
    cfg = load_config(
        CONFIGS / f"{recipe}.yaml",
        [
            f"model.name_or_path={qwen3_moe_dir}",
            "rollout.prompts_per_step=4",
            "rollout.group_size=4",
            "rollout.max_new_tokens=4",
            "optim.steps=2",
            "optim.micro_batch_size=4",
            "eval.every=0",
            "logging.progress=false",
            "logging.report=false",
            "logging.tensorboard=false",
            "checkpoint.save_final_model=false",
            f"run.output_dir={tmp_path / recipe}",
        ],
    )
    assert cfg.routing_replay == {"minirl_moe_r2": "R2", "minirl_moe_r3": "R3"}[recipe]
    assert cfg.optim.mini_batches == {"minirl_moe_r2": 2, "minirl_moe_r3": 4}[recipe]
    Trainer(cfg, task=SevensTask()).train()
    rows = _finite_rows(cfg.run.output_dir)
    assert all(key in rows[-1] for key in ROUTING_KEYS)
