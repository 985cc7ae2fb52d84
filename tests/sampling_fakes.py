"""A deterministic rollout backend and a binary task for the sampling layer's tests.

``FakeBackend`` makes a completion a pure function of the prompt, its copy index within a run of identical
prompts, and the number of ``sync_weights`` calls (one per step): not of the generator or the rank, so one
process and two processes generate exactly the same rows and any difference comes from the layer.
"""

from __future__ import annotations

import hashlib
import random

import torch

from steadyrl.models import build_char_tokenizer
from steadyrl.models.tokenizer import ARITHMETIC_ALPHABET
from steadyrl.runtime.distributed import DistInfo
from steadyrl.tasks import Prompt
from steadyrl.types import RolloutBatch


def char_tokenizer():
    return build_char_tokenizer(ARITHMETIC_ALPHABET)


class FakeBackend:
    def __init__(self, tokenizer, max_len: int = 4) -> None:
        self.tokenizer, self.max_len, self.version = tokenizer, max_len, 0

    def sync_weights(self) -> None:
        self.version += 1

    def generate(self, prompt_ids, prompt_mask, params, generator=None) -> RolloutBatch:
        rows, previous, copy = [], None, 0
        for ids, mask in zip(prompt_ids.tolist(), prompt_mask.tolist()):
            key = tuple(i for i, m in zip(ids, mask) if m)
            copy = copy + 1 if key == previous else 0
            previous = key
            digest = hashlib.blake2b(repr((key, copy, self.version)).encode(), digest_size=8).digest()
            n = 1 + digest[0] % (self.max_len - 1)  # 1 .. max_len − 1 digits, then EOS
            text = "".join(str(b % 10) for b in digest[1 : 1 + n])
            rows.append((self.tokenizer(text)["input_ids"] + [self.tokenizer.eos_token_id], -0.1 - digest[7] % 7 / 10))
        width = max(len(r[0]) for r in rows)
        ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.bool)
        logp = torch.zeros((len(rows), width))
        for k, (tokens, lp) in enumerate(rows):
            ids[k, : len(tokens)], mask[k, : len(tokens)], logp[k, : len(tokens)] = torch.tensor(tokens), True, lp
        return RolloutBatch(prompt_ids, prompt_mask.bool(), ids, mask, logp, torch.zeros(len(rows), dtype=torch.bool))


class SevenTask:
    """Reward 1 when the completion contains a 7 (about a third of the fake completions do); answer "77" so
    that SAGE's answer-prefix hint ("7") rescues an unrewarded group."""

    name = "seven"

    def sample(self, split: str, n: int, seed: int) -> list[Prompt]:
        rng = random.Random(seed * 2 + (split == "eval"))
        return [Prompt(id=f"{a}+{b}", text=f"{a}+{b}=", answer="77") for a, b in
                ((rng.randint(0, 9), rng.randint(0, 9)) for _ in range(n))]

    def eval_prompts(self) -> list[Prompt]:
        return self.sample("eval", 4, 0)

    def reward(self, prompt: Prompt, completion: str) -> float:
        return 1.0 if "7" in completion else 0.0

    def demonstration(self, prompt: Prompt, rng: random.Random) -> str:
        return "7"


def fake_collector(layer_cfg: list[str] | None = None, *, info: DistInfo | None = None, prompts_per_step: int = 4,
                   group_size: int = 4, seed: int = 0, advantage: str = "grpo"):
    """A RolloutCollector on FakeBackend / SevenTask with the sampling layer of ``layer_cfg`` overrides."""
    from steadyrl import registry
    from steadyrl.config_load import load_config
    from steadyrl.rollout.base import SamplingParams
    from steadyrl.sampling.layer import build_sampling_layer
    from steadyrl.train.collect import RolloutCollector

    info = info or DistInfo()
    tokenizer, task = char_tokenizer(), SevenTask()
    cfg = load_config(None, [f"rollout.prompts_per_step={prompts_per_step}", f"rollout.group_size={group_size}",
                             "rollout.max_new_tokens=4", f"run.seed={seed}", *(layer_cfg or [])])
    layer = build_sampling_layer(cfg, task=task, tokenizer=tokenizer, model=None, info=info, device=torch.device("cpu"))
    return RolloutCollector(FakeBackend(tokenizer), tokenizer, task, registry.resolve("advantage", advantage),
                            params=SamplingParams(max_new_tokens=4), prompts_per_step=prompts_per_step,
                            group_size=group_size, info=info, seed=seed, device=torch.device("cpu"), layer=layer)
