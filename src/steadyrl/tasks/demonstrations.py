"""Supervised batches of a task's demonstrations (warm start, retention loss)."""

from __future__ import annotations

import random

import torch

from steadyrl.tasks.base import Prompt, Task


def demonstration_batch(task: Task, tokenizer, prompts: list[Prompt], rng: random.Random, device) -> tuple[torch.Tensor, ...]:
    """Right-padded (ids, attention mask, labels) with the loss on completion tokens and EOS only."""
    eos = tokenizer.eos_token_id
    seqs, labels = [], []
    for p in prompts:
        prompt_ids = tokenizer(p.text)["input_ids"]
        completion = tokenizer(task.demonstration(p, rng), add_special_tokens=False)["input_ids"] + [eos]
        seqs.append(prompt_ids + completion)
        labels.append([-100] * len(prompt_ids) + completion)
    width = max(map(len, seqs))
    pad = tokenizer.pad_token_id
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=device)
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
    lab = torch.tensor([x + [-100] * (width - len(x)) for x in labels], device=device)
    return ids, mask, lab
