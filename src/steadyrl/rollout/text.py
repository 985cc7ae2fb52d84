"""Text in and out of a rollout backend: prompts to left-padded ids, completion ids back to text."""

from __future__ import annotations

import torch
from torch import Tensor

from steadyrl.models.chat import PromptRenderer
from steadyrl.rollout.base import left_pad
from steadyrl.tasks import Prompt


def encode_prompts(
    tokenizer, prompts: list[Prompt], device: torch.device, renderer: PromptRenderer | None = None
) -> tuple[Tensor, Tensor]:
    """(B, Tp) left-padded prompt ids and their bool mask; ``renderer`` (default: the chat template when the
    tokenizer has one, else the raw text, see models/chat.py) turns each prompt into ids."""
    renderer = renderer or PromptRenderer()
    ids = [renderer.encode(tokenizer, p) for p in prompts]
    if any(len(x) == 0 for x in ids):
        empty = next(p for p, x in zip(prompts, ids) if len(x) == 0)
        raise ValueError(f"prompt {empty.id!r} encodes to no tokens; every prompt needs at least one token.")
    return left_pad(ids, tokenizer.pad_token_id, device)


def eos_ids(tokenizer) -> set[int]:
    """The tokenizer's EOS id(s) as a set (an int, a list, or None)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, (list, tuple)) else {eos}


def decode_completions(tokenizer, completion_ids: Tensor, mask: Tensor, eos: set[int]) -> list[str]:
    """The text of each completion's counted tokens, EOS dropped."""
    texts = []
    for row, row_mask in zip(completion_ids.tolist(), mask.tolist()):
        tokens = [t for t, m in zip(row, row_mask) if m and t not in eos]
        texts.append(tokenizer.decode(tokens, skip_special_tokens=True))
    return texts
