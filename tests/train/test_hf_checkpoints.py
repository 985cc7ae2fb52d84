"""Checkpoints in Hugging Face format (checkpoint.hf_format): every step-N/hf/ that a run leaves loads with
``AutoModelForCausalLM.from_pretrained``, while the run goes on, to the log-probs of the trainer's own model at
that step; with LoRA the merged model there and the adapter in step-N/hf-adapter/; written atomically with the
checkpoint and pruned with it.

Run: .venv/bin/python -m pytest -q tests/train/test_hf_checkpoints.py
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from extras import requires_extra
from sevens_task import SevensTask
from steadyrl.runtime.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from steadyrl.train.forward import policy_forward
from steadyrl.train.trainer import Trainer
from steadyrl.types import RolloutBatch

LORA = ("model.lora={r: 4, alpha: 8, target_modules: [q_proj, v_proj, gate_proj, up_proj, down_proj]}",)


def _probe_batch(vocab_size: int) -> RolloutBatch:
    """A fixed teacher-forced batch: 3 left-padded prompts and 4 completion tokens each."""
    gen = torch.Generator().manual_seed(5)
    prompt_ids = torch.randint(3, vocab_size, (3, 5), generator=gen)
    prompt_mask = torch.ones(3, 5, dtype=torch.bool)
    prompt_mask[0, :2] = False
    completion_ids = torch.randint(3, vocab_size, (3, 4), generator=gen)
    ones = torch.ones(3, 4, dtype=torch.bool)
    return RolloutBatch(prompt_ids, prompt_mask, completion_ids, ones, torch.zeros(3, 4), torch.zeros(3, dtype=torch.bool))


@torch.no_grad()
def _logprobs(model: nn.Module, batch: RolloutBatch) -> torch.Tensor:
    return policy_forward(model, batch, compute_entropy=False).logprobs


def _run_loading_each_checkpoint(trainer: Trainer, load) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Train; right after each checkpoint is saved (the run then goes on) load its HF export with ``load`` and
    keep (the trainer's log-probs at that step, the loaded model's)."""
    batch = _probe_batch(len(trainer.tokenizer))
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    save = trainer.save

    def save_then_load(step: int) -> None:
        save(step)
        seen[step] = (_logprobs(trainer.model, batch), _logprobs(load(trainer.run_dir / "checkpoints" / f"step-{step:08d}"), batch))

    trainer.save = save_then_load
    trainer.train()
    return seen


def test_every_checkpoint_loads_with_from_pretrained_to_the_trainers_logprobs(tiny_config):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = tiny_config("optim.steps=3", "checkpoint.every=1", "checkpoint.keep_last=2", "optim.lr=5e-2")
    assert cfg.checkpoint.hf_format  # on by default
    trainer = Trainer(cfg, task=SevensTask())
    seen = _run_loading_each_checkpoint(trainer, lambda step_dir: AutoModelForCausalLM.from_pretrained(step_dir / "hf"))
    assert sorted(seen) == [1, 2, 3]
    for step, (trainer_logprobs, loaded_logprobs) in seen.items():
        torch.testing.assert_close(loaded_logprobs, trainer_logprobs, rtol=0, atol=0, msg=f"step {step}")
    assert not torch.allclose(seen[1][0], seen[3][0])  # the policy moved, so a stale export would fail above
    kept = list_checkpoints(trainer.run_dir)
    assert [s for s, _ in kept] == [2, 3]  # keep_last prunes step-1 and its hf/ with it
    step_dir = kept[-1][1]
    assert AutoTokenizer.from_pretrained(step_dir / "hf").encode("7+7") == trainer.tokenizer.encode("7+7")
    assert not (step_dir / "hf-adapter").exists()


def test_hf_format_false_writes_the_resumable_state_only(tiny_config):
    trainer = Trainer(tiny_config("optim.steps=1", "checkpoint.hf_format=false"), task=SevensTask())
    trainer.train()
    step_dir = latest_checkpoint(trainer.run_dir)
    assert not (step_dir / "hf").exists() and (step_dir / "model.pt").is_file()


@requires_extra("lora", "peft")
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # peft's call into transformers
def test_lora_checkpoints_hold_the_merged_model_and_the_adapter(tiny_config, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(*LORA, "optim.steps=2", "checkpoint.every=1", "optim.lr=5e-2")
    trainer = Trainer(cfg, task=SevensTask())
    merged = _run_loading_each_checkpoint(trainer, lambda d: AutoModelForCausalLM.from_pretrained(d / "hf"))
    adapter = {}
    batch = _probe_batch(len(trainer.tokenizer))
    for step, path in list_checkpoints(trainer.run_dir):
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        adapter[step] = _logprobs(PeftModel.from_pretrained(base, path / "hf-adapter"), batch)
        assert not any("lora_" in k for k in AutoModelForCausalLM.from_pretrained(path / "hf").state_dict())
    for step in (1, 2):
        trainer_logprobs, merged_logprobs = merged[step]
        # W + (α/r)·B·A in one matrix rounds differently from W·x + (α/r)·B·(A·x)
        torch.testing.assert_close(merged_logprobs, trainer_logprobs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(adapter[2], merged[2][0], rtol=1e-5, atol=1e-5)  # the adapter of the last step
    assert not torch.allclose(merged[1][0], merged[2][0])


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 2)


def test_a_failing_export_leaves_the_previous_checkpoint_and_no_partial_step(tmp_path):
    model = _Tiny()
    first = save_checkpoint(tmp_path, 1, model=model, exports={"hf": lambda path: path.mkdir()})
    assert (first / "hf").is_dir()

    def crash(path):
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 2, model=model, exports={"hf": crash})
    assert latest_checkpoint(tmp_path) == first and [s for s, _ in list_checkpoints(tmp_path)] == [1]
    load_checkpoint(first, model=model)
    third = save_checkpoint(tmp_path, 3, model=model, exports={"hf": lambda path: path.mkdir()})
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-00000001", third.name]


def test_export_names_are_plain_directory_names(tmp_path):
    for bad in ("../hf", "model.pt", "", ".hidden"):
        with pytest.raises(ValueError, match="plain directory name"):
            save_checkpoint(tmp_path, 1, model=_Tiny(), exports={bad: lambda path: path.mkdir()})
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())
