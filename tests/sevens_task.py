"""A task any policy scores on, for trainer tests."""

from __future__ import annotations

import random

from steadyrl.tasks import Prompt


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
