"""Fixtures for trainer tests: a tiny random Qwen2 with the char tokenizer, and a task any policy scores on."""

from __future__ import annotations

import random

import pytest

from steadyrl.config import load_config
from steadyrl.models import build_char_tokenizer, build_tiny_model, tiny_model_config
from steadyrl.models.tokenizer import ARITHMETIC_ALPHABET
from steadyrl.tasks import Prompt
from steadyrl.train.checkpoint import save_pretrained_atomic


class SevensTask:
    """Reward = share of '7' characters in the completion: a random policy already has reward variance."""

    name = "sevens"

    def sample(self, split: str, n: int, seed: int) -> list[Prompt]:
        rng = random.Random(seed * 2 + (split == "eval"))
        out = []
        for i in range(n):
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            out.append(Prompt(id=f"{split}-{seed}-{i}", text=f"{a}+{b}=", answer="777"))
        return out

    def eval_prompts(self) -> list[Prompt]:
        return self.sample("eval", 8, 0)

    def reward(self, prompt: Prompt, completion: str) -> float:
        return completion.count("7") / max(1, len(completion))

    def demonstration(self, prompt: Prompt, rng: random.Random) -> str:
        return "777"


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
