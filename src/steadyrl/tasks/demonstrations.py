"""Supervised batches of a task's demonstrations (warm start, retention loss)."""

from __future__ import annotations

import random

import torch

from steadyrl.tasks.base import Prompt, Task


def demonstration_batch(
    task: Task, tokenizer, prompts: list[Prompt], rng: random.Random, device, renderer=None
) -> tuple[torch.Tensor, ...]:
    """Right-padded (ids, attention mask, labels) with the loss on completion tokens and EOS only; the prompt is
    rendered by ``renderer`` (models/chat.py; default: the chat template when the tokenizer has one) as in RL."""
    from steadyrl.models.chat import PromptRenderer  # models.chat imports tasks

    renderer = renderer or PromptRenderer()
    eos = tokenizer.eos_token_id
    seqs, labels = [], []
    for p in prompts:
        prompt_ids = renderer.encode(tokenizer, p)
        completion = tokenizer(task.demonstration(p, rng), add_special_tokens=False)["input_ids"] + [eos]
        seqs.append(prompt_ids + completion)
        labels.append([-100] * len(prompt_ids) + completion)
    width = max(map(len, seqs))
    pad = tokenizer.pad_token_id
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=device)
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
    lab = torch.tensor([x + [-100] * (width - len(x)) for x in labels], device=device)
    return ids, mask, lab
