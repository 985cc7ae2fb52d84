"""The policy forward of the trainer: per-token log-probs (and entropy) of completions, computed in chunks,
and the MoE routing that forward runs under.

The decoder runs once over prompt + completion; the LM head is applied chunk by chunk on the completion
positions only (``ops.logprobs.logprobs_from_hidden``), so full-vocabulary logits never exist for the whole
batch. Positions are counted as HF ``generate`` counts them for left-padded prompts, so the trainer scores
exactly the sequence the sampler produced.

Routing Replay (models/routing.py) changes this forward: ``routing(model, batch, replay)`` fixes the experts of
every MoE layer for the forward *and* for its recomputation in backward under activation checkpointing, so
the update wraps a micro-batch's forward and backward in it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from steadyrl.config import ConfigError
from steadyrl.models.lora import unwrap_peft
from steadyrl.models.routing import RoutingReplayer, WeightRule
from steadyrl.ops.logprobs import logprobs_from_hidden
from steadyrl.rollout.base import position_ids_from_mask
from steadyrl.runtime.fsdp import FORWARD_METHOD
from steadyrl.types import RolloutBatch


@dataclass
class PolicyOutput:
    logprobs: Tensor  # (B, T) log π(y_t) at the sampling temperature
    entropy: Tensor | None  # (B, T) full-vocabulary entropy, detached unless asked with its gradient
    hidden: Tensor | None  # (B, T, H) final hidden state predicting y_t (CAPO's features), when asked
    token_logits: Tensor | None = None  # (B, T) raw logit of y_t (LCO's logit regression)
    sum_pi_squared: Tensor | None = None  # (B, T) Σ_v π_v², detached (the optimal token baseline's statistic)


def model_inputs(batch: RolloutBatch) -> tuple[Tensor, Tensor, Tensor]:
    """input_ids (B, Tp+T), attention_mask (B, Tp+T), position_ids (B, Tp+T) for a teacher-forced forward."""
    input_ids = torch.cat([batch.prompt_ids, batch.completion_ids], dim=1)
    # Completion positions are all attended: tokens after EOS are padding that no counted token can see.
    attn = torch.cat([batch.prompt_mask, torch.ones_like(batch.completion_ids, dtype=torch.bool)], dim=1)
    return input_ids, attn.long(), position_ids_from_mask(attn)


def decoder_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The decoder stack (hidden states after the final norm) and the LM head of a HF causal LM (inside a peft
    LoRA wrapper too: its LoRA layers then run in the decoder)."""
    model = unwrap_peft(model)
    head = model.get_output_embeddings()
    decoder = getattr(model, "base_model", None)
    if head is None or decoder is None or decoder is model:
        raise TypeError(
            f"{type(model).__name__} does not expose a decoder and an LM head (get_output_embeddings); "
            "steadyrl needs a causal LM whose logits are lm_head(hidden)."
        )
    if type(head) is not torch.nn.Linear and hasattr(head, "base_layer"):
        raise TypeError("the LM head carries a LoRA adapter, which the chunked log-prob path does not apply; leave it out of model.lora.target_modules.")
    if getattr(model.config, "final_logit_softcapping", None):
        raise TypeError(f"{type(model).__name__} soft-caps its logits, which the chunked log-prob path does not model.")
    return decoder, head


def policy_forward(model: torch.nn.Module, batch: RolloutBatch, **settings: Any) -> PolicyOutput:
    """π(y_t) of the batch's completions, with ``chunked_policy_forward``'s settings. A model sharded with
    FSDP (runtime/fsdp.py) runs it as its root unit's forward method, which gathers the embeddings and LM head."""
    sharded = getattr(model, FORWARD_METHOD, None)
    return sharded(batch, **settings) if sharded is not None else chunked_policy_forward(model, batch, **settings)


def chunked_policy_forward(
    model: torch.nn.Module,
    batch: RolloutBatch,
    *,
    temperature: float = 1.0,
    compute_entropy: bool = True,
    keep_hidden: bool = False,
    chunk_size: int = 1024,
    autocast_dtype: torch.dtype | None = None,
    compute_sum_pi_squared: bool = False,
    entropy_grad: bool = False,
    support: tuple[int, float] = (0, 1.0),
) -> PolicyOutput:
    """The body of ``policy_forward``: the decoder once, then the LM head chunk by chunk. ``support`` =
    (top_k, top_p) scores on the sampler's truncated support (``rollout.trainer_truncation``), (0, 1.0) on the
    full vocabulary."""
    decoder, head = decoder_and_head(model)
    input_ids, attn, pos = model_inputs(batch)
    device_type = input_ids.device.type
    autocast = (
        torch.autocast(device_type=device_type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    with autocast:
        out = decoder(input_ids=input_ids, attention_mask=attn, position_ids=pos, use_cache=False)
    prompt_len = batch.prompt_ids.shape[1]
    # hidden[t] predicts token t+1: completion token j is predicted at position prompt_len - 1 + j.
    hidden = out.last_hidden_state[:, prompt_len - 1 : -1]
    logprobs, entropy, token_logits, *sum_pi_squared = logprobs_from_hidden(
        hidden,
        head.weight,
        batch.completion_ids,
        lm_head_bias=getattr(head, "bias", None),
        temperature=temperature,
        chunk_size=chunk_size,
        compute_entropy=compute_entropy,
        return_token_logits=True,
        compute_sum_pi_squared=compute_sum_pi_squared,
        entropy_grad=entropy_grad,
        top_k=support[0],
        top_p=support[1],
    )
    kept = hidden if keep_hidden else None
    return PolicyOutput(logprobs, entropy, kept, token_logits, sum_pi_squared[0] if sum_pi_squared else None)


def routing(
    model: torch.nn.Module, batch: RolloutBatch, replay: str | None, rule: WeightRule = "restricted_softmax"
) -> contextlib.AbstractContextManager:
    """The MoE routing of the forwards inside the context.

    None: the routers' own choice. "batch": replay ``batch.routed_experts`` (the sampler's experts under R3,
    the π_old forward's under R2). "own": the router's own top-k, gated with the replay ``rule`` (R2's π_old
    forward, so that π_old and the replayed π_θ share one gating formula).
    """
    if replay is None:
        return contextlib.nullcontext()
    if replay == "batch" and batch.routed_experts is None:
        raise ConfigError(
            "routing replay found no recorded experts in the batch; the rollout backends (hf, native) record "
            "them for supported MoE models (see models/routing.py)."
        )
    return RoutingReplayer(model, batch.routed_experts if replay == "batch" else None, rule=rule)

