"""Tiny models whose whole response space is small enough to enumerate by brute force (tests/lab)."""

from __future__ import annotations

import itertools
import math

import torch

from steadyrl.models import build_tiny_model, tiny_model_config
from steadyrl.rollout.base import left_pad, position_ids_from_mask

PAD, EOS = 0, 1


def tiny_lm(vocab: int = 5, seed: int = 0, arch: str = "qwen2", **extra) -> torch.nn.Module:
    cfg = tiny_model_config(arch, vocab_size=vocab, hidden_size=16, num_layers=1, num_heads=2, initializer_range=0.3, **extra)
    return build_tiny_model(cfg, seed=seed).train()


def all_completions(vocab: int, max_new_tokens: int) -> list[tuple[int, ...]]:
    """Every completion the enumeration may keep: non-pad tokens, EOS only last, or max_new_tokens long."""
    tokens = [t for t in range(vocab) if t != PAD]
    inner = [t for t in tokens if t != EOS]
    out = []
    for length in range(1, max_new_tokens + 1):
        for prefix in itertools.product(inner, repeat=length - 1):
            last = tokens if length == max_new_tokens else [EOS]
            out += [(*prefix, t) for t in last]
    return out


@torch.no_grad()
def brute_logprob(model: torch.nn.Module, prompt: list[int], completion: tuple[int, ...]) -> float:
    """log π(completion | prompt), one teacher-forced forward of the unpadded sequence, token by token."""
    ids, mask = left_pad([list(prompt) + list(completion)], PAD)
    logits = model(input_ids=ids, attention_mask=mask.long(), position_ids=position_ids_from_mask(mask)).logits[0]
    lp = torch.log_softmax(logits.double(), -1)
    start = len(prompt) - 1
    return float(sum(lp[start + i, t] for i, t in enumerate(completion)))


def brute_distribution(model, prompt, vocab, max_new_tokens) -> dict[tuple[int, ...], float]:
    return {c: math.exp(brute_logprob(model, prompt, c)) for c in all_completions(vocab, max_new_tokens)}


def without_pad(model: torch.nn.Module, bias: float = -40.0) -> torch.nn.Module:
    """Give the LM head a bias that makes the pad token impossible (e^-40), so the enumerated completions carry
    the whole mass and on-policy identities hold exactly."""
    head = model.get_output_embeddings()
    new = torch.nn.Linear(head.weight.shape[1], head.weight.shape[0], bias=True)
    with torch.no_grad():
        new.weight.copy_(head.weight)
        new.bias.zero_()
        new.bias[PAD] = bias
    model.set_output_embeddings(new)
    return model
