"""Test-session settings, and the trainer fixtures: a tiny random Qwen2 with the char tokenizer and a config
factory around it (tests/sevens_task.py has a task any policy scores on).

One intra-op thread per process: the models under test are tiny, and the distributed tests run two
processes on CI's two cores, where two threads each would oversubscribe the machine and stall.
"""

import pytest
import torch

from steadyrl.config_load import load_config
from steadyrl.models import build_char_tokenizer, build_tiny_model, tiny_model_config
from steadyrl.models.tokenizer import ARITHMETIC_ALPHABET
from steadyrl.runtime.checkpoint import save_pretrained_atomic

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-model")
    tok = build_char_tokenizer(ARITHMETIC_ALPHABET)
    cfg = tiny_model_config("qwen2", vocab_size=len(tok), hidden_size=32, num_layers=2, num_heads=2)
    save_pretrained_atomic(build_tiny_model(cfg, seed=0), tok, path)
    return str(path)


@pytest.fixture
def tiny_config(tiny_model_dir, tmp_path):
    """A config factory: tiny model, 4 prompts x 4 samples, 4 new tokens, no eval, no report."""

    def make(*overrides: str):
        base = [
            f"model.name_or_path={tiny_model_dir}",
            "rollout.prompts_per_step=4",
            "rollout.group_size=4",
            "rollout.max_new_tokens=4",
            "optim.steps=2",
            "optim.lr=1e-2",
            "optim.micro_batch_size=8",
            "eval.every=0",
            "logging.progress=false",
            "logging.report=false",
            "logging.tensorboard=false",
            "checkpoint.save_final_model=false",
            f"run.output_dir={tmp_path / 'run'}",
            "run.device=cpu",
        ]
        return load_config(None, base + list(overrides))

    return make
