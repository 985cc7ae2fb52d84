"""Precision switches of the policy: an FP32 LM head (ScaleRL, arXiv 2510.13786; TRL ``cast_lm_head_to_fp32``)
and fp16 training with dynamic loss scaling (Precision-RL, arXiv 2510.26788).

FP32 LM head. ``cast_lm_head_to_fp32(model)`` stores the LM head's parameters in fp32 and makes the head's own
forward compute in fp32 with autocast off (fp32 logits from fp32 weights), as TRL does. The trainer's chunked
log-prob pass (``ops.logprobs``) always multiplies in fp32; with the switch its weight is the fp32 master
copy rather than a low-precision one, and the sampler's logits come from the same fp32 head (the sampler
copy of ``rollout.sampler_dtype`` gets its own fp32 head, train/../rollout/base.py), so the sampled μ and the
trained π share the head's precision. A tied input embedding becomes fp32 with it; its output is cast back
to the dtype the embedding had, so the decoder keeps its precision (TRL casts it the same way). The
forwards are replaced on the module instances (no hooks), which the native backend's fused decode step
keeps using.

Dynamic loss scaling. ``DynamicLossScale`` is the standard scheme of fp16 mixed precision (Micikevicius et
al. 2018, torch.amp.GradScaler's defaults): terms are multiplied by S before backward, gradients by 1/S
before clipping; a step whose gradient is not finite is skipped and halves S, ``growth_interval`` finite
steps in a row double it. The skip itself is the update stage's (a non-finite gradient never steps).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


class _FP32Linear:
    """The LM head's forward in fp32 with autocast off; a class (not a closure) so ``copy.deepcopy`` of the
    model rebinds it to the copy's own head."""

    def __init__(self, head: torch.nn.Linear) -> None:
        self.head = head

    def __call__(self, hidden: Tensor) -> Tensor:
        with torch.autocast(hidden.device.type, enabled=False):
            bias = None if self.head.bias is None else self.head.bias.float()
            return F.linear(hidden.float(), self.head.weight.float(), bias)


class _EmbeddingIn:
    """An embedding's forward with its output cast to ``dtype`` (a tied embedding whose weight became fp32)."""

    def __init__(self, embedding: torch.nn.Embedding, dtype: torch.dtype) -> None:
        self.embedding, self.dtype = embedding, dtype

    def __call__(self, ids: Tensor) -> Tensor:
        return type(self.embedding).forward(self.embedding, ids).to(self.dtype)


def cast_lm_head_to_fp32(model: torch.nn.Module) -> torch.nn.Module:
    """Store ``model``'s LM head in fp32 and compute its logits in fp32 (module docstring); returns ``model``.
    Idempotent; marks the model (``lm_head_fp32``) so a sampler copy can be given the same head."""
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise TypeError(
            f"the FP32 LM head needs an nn.Linear output layer, got {type(head).__name__}; turn off "
            "model.lm_head_fp32 for this model."
        )
    embedding = model.get_input_embeddings()
    tied = embedding is not None and embedding.weight is head.weight
    embedding_dtype = embedding.weight.dtype if embedding is not None else None
    head.float()
    head.forward = _FP32Linear(head)
    if tied and embedding_dtype is not None and embedding_dtype != torch.float32:
        embedding.forward = _EmbeddingIn(embedding, embedding_dtype)
    model.lm_head_fp32 = True
    return model


def body_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of the model's parameters other than its LM head (which an FP32 head keeps apart)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_params = {id(p) for p in head.parameters()} if head is not None else set()
    return next((p.dtype for p in model.parameters() if id(p) not in head_params), next(model.parameters()).dtype)


class DynamicLossScale:
    """Dynamic loss scale for fp16 (module docstring). ``state_dict`` is training state (a checkpoint and a
    guard rollback restore it)."""

    def __init__(self, init_scale: float = 2.0**16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000) -> None:
        self.scale, self.growth_factor, self.backoff_factor = float(init_scale), growth_factor, backoff_factor
        self.growth_interval, self.good_steps = growth_interval, 0

    def scaled(self, terms: dict[str, Tensor]) -> dict[str, Tensor]:
        return {name: term * self.scale for name, term in terms.items()}

    def unscale_(self, params: list[torch.nn.Parameter]) -> None:
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, 1.0 / self.scale)

    def update(self, finite: bool) -> None:
        """After the step's finite check: back off on overflow, grow after ``growth_interval`` good steps."""
        if not finite:
            self.scale *= self.backoff_factor
            self.good_steps = 0
            return
        self.good_steps += 1
        if self.good_steps == self.growth_interval:
            self.scale *= self.growth_factor
            self.good_steps = 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.scale, self.good_steps = float(state["scale"]), int(state["good_steps"])
