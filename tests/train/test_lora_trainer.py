"""The trainer with model.lora: adapters only, π_ref = adapters disabled (no second model), adapter-only
checkpoints that resume exactly, merged + adapter export; CAPO refused, PCR per adapted layer.

Run: .venv/bin/python -m pytest -q tests/train/test_lora_trainer.py
"""

from __future__ import annotations

import pytest
import torch

from extras import requires_extra
from resume_check import assert_resume_is_exact
from sevens_task import SevensTask
from steadyrl.config import ConfigError
from steadyrl.models.lora import is_peft_model
from steadyrl.report import read_metrics
from steadyrl.runtime.rundir import inspect as inspect_run_dir
from steadyrl.train.forward import policy_forward
from steadyrl.train.trainer import Trainer

pytestmark = requires_extra("lora", "peft")
LORA = ("model.lora={r: 4, alpha: 8, target_modules: [q_proj, v_proj, gate_proj, up_proj, down_proj]}",)


def test_lora_run_uses_the_base_model_as_reference_and_exports_both(tiny_config, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(*LORA, "kl.coef=0.1", "checkpoint.save_final_model=true", "optim.lr=5e-2")
    trainer = Trainer(cfg, task=SevensTask())
    assert is_peft_model(trainer.model) and trainer.scorer.ref_model is None
    trained = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert trained == {id(p) for n, p in trainer.model.named_parameters() if "lora_" in n}
    trainer.train()
    rows = read_metrics(trainer.run_dir)
    assert rows[-1]["kl/ref_k3"] > 0  # the adapters moved away from the base model, which is the reference

    # π_ref of a batch is the untouched base model's log-probs
    collected = trainer.collector.collect(3)
    trainer.scorer.score(collected.batch)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        expected = policy_forward(base, collected.batch.rollout).logprobs
    torch.testing.assert_close(collected.batch.ref_logprobs, expected, rtol=1e-6, atol=1e-6)

    final = AutoModelForCausalLM.from_pretrained(trainer.run_dir / "final")
    with torch.no_grad():
        torch.testing.assert_close(
            policy_forward(final, collected.batch.rollout).logprobs,
            policy_forward(trainer.model, collected.batch.rollout).logprobs,
            rtol=1e-5,
            atol=1e-5,
        )
    assert (trainer.run_dir / "final-adapter" / "adapter_config.json").is_file()
    assert inspect_run_dir(trainer.run_dir).foreign == ()  # the adapter export is one of steadyrl's own entries
    saved = torch.load(next((trainer.run_dir / "checkpoints").glob("step-*")) / "model.pt", weights_only=True)
    assert saved and all("lora_" in k for k in saved)  # the frozen base is not copied into checkpoints


def test_lora_resume_is_exact(tiny_config, tmp_path):
    def config_for(out):
        return tiny_config(*LORA, "optim.steps=4", "checkpoint.every=2", f"run.output_dir={out}", "kl.coef=0.05")

    assert_resume_is_exact(config_for, tmp_path, stop_after=2)


def test_lora_with_pcr_and_a_separate_sampler_trains(tiny_config):
    retention = "retention={task: {name: arithmetic, kwargs: {operations: '-', max_digits: 1}}, coef: 0.5, batch_size: 4}"
    cfg = tiny_config(*LORA, "combiner=pcr", retention, "optim.micro_batch_size=4", "rollout.sampler_dtype=bfloat16")
    trainer = Trainer(cfg, task=SevensTask())
    assert trainer.backend.separate_sampler and not is_peft_model(trainer.backend.sampler)
    summary = trainer.train()
    assert summary["skipped_steps"] == 0
    assert any(k.startswith("pcr/") for k in read_metrics(trainer.run_dir)[-1])


def test_capo_with_lora_is_refused_before_training(tiny_config):
    with pytest.raises(ConfigError, match="LM head is frozen"):
        Trainer(tiny_config(*LORA, "token_filters=[{name: capo}]"), task=SevensTask())
    with pytest.raises(ConfigError, match="includes the LM head"):
        Trainer(tiny_config("model.lora={target_modules: [lm_head]}"), task=SevensTask())


@pytest.mark.parametrize(
    "overrides",
    [
        ("optim.mini_batches=2", "optim.epochs=2", "loss.name=reinforce_is", "aggregation.name=seq_mean_token_sum"),
        ("kl.coef=0.1", "correction.name=token_tis", "rollout.sampler_dtype=bfloat16", "rollout.backend=native"),
        ("loss.name=gspo", "kl.coef=0.05", "kl.reference=old", "optim.mini_batches=2"),
        ("loss.name=lco_kld", "model.gradient_checkpointing=true"),
    ],
)
def test_lora_with_other_methods_trains_the_adapters(tiny_config, overrides):
    cfg = tiny_config(*LORA, *overrides)
    trainer = Trainer(cfg, task=SevensTask())
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    summary = trainer.train()
    assert summary["skipped_steps"] == 0
    for name, param in trainer.model.named_parameters():
        moved = not torch.equal(before[name], param.detach())
        assert moved == ("lora_" in name), name  # adapters move (B from 0), the base never does
    for key, value in read_metrics(trainer.run_dir)[-1].items():
        assert key.endswith(("_min", "_max")) or value == value, key  # no NaN


def test_guard_rollback_restores_the_adapters(tiny_config):
    from steadyrl.stabilisers.guard import GuardAction

    cfg = tiny_config(*LORA, "optim.steps=4", "guard.snapshot_every=1", "guard.keep_snapshots=1")
    trainer = Trainer(cfg, task=SevensTask())
    trainer.train(stop_after=2)  # the guard snapshotted step 2: the adapters only
    snapshot = trainer.guard.snapshots[0].state["model"]
    assert snapshot and all("lora_" in k for k in snapshot)
    at_step_2 = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    for step in (3, 4):
        trainer.rl_step(step)
    assert any(not torch.equal(p, at_step_2[n]) for n, p in trainer.model.named_parameters())
    trainer.guard.apply(GuardAction("rollback", 4, ("test",)))
    for name, param in trainer.model.named_parameters():
        assert torch.equal(param, at_step_2[name]), name
