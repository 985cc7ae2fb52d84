"""steadyrl's own rollout loop: a static KV cache, one forward per token, nothing else per step.

Same protocol, constructor and outputs as ``HFRolloutBackend``. What ``generate`` leaves out is the per-step
machinery around the forward (logits-processor and stopping-criteria objects, a KV cache and ``input_ids``
concatenated every step, a mask rebuilt every step, host syncs). What it keeps is the maths:

    μ(· | y_<t) = softmax(top_p(top_k(z_t / τ)))          z_t = fp32 logits of the last position
    y_t ~ μ  (inverse CDF with the caller's generator),     greedy: y_t = argmax z_t, μ = softmax(z_t)

with ``top_k`` and ``top_p`` written as transformers' ``TopKLogitsWarper`` / ``TopPLogitsWarper`` (ties at the
k-th value kept; the top-p cut on ascending cumulative probabilities ≤ 1 − p, the largest token always kept),
so both backends sample the same distribution and return the same μ for the same logits.

One call: prompts (B, Tp) left-padded → a prefill with positions counted over real tokens
(``position_ids_from_mask``) → N − 1 single-token decode steps writing slot Tp + t of a static cache of
length Tp + N − 1. Finished rows emit pad and keep stepping (shapes stay static) until every row has
finished; the "all finished" flag is read every step on CPU (free) and every ``stop_check_every`` steps on
CUDA (a host sync). The output is trimmed to the longest response, so its shape equals the HF backend's.

Two decode paths:
  * fused (dense Llama / Qwen2 with SDPA, the default where supported): ``LlamaFamilyDecodeStep`` runs the
    decoder op for op from the modules' weights, attends only over the slots written so far, and the prefill
    runs each distinct prompt once (GRPO batches repeat every prompt G times);
  * HF forward (any other model, e.g. MoE, eager attention, LoRA-wrapped, hooked): the model's own forward
    over a ``transformers.StaticCache``, so hooks such as the MoE routing recorder run.

On CUDA, ``compile=True`` compiles the decode step with ``torch.compile(mode="reduce-overhead")`` (CUDA
graphs over the static cache, as transformers' own static-cache generate does); the cache is then kept
between calls with its length rounded up to ``cache_bucket`` so that a new prompt length does not recompile.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings

import torch
from torch import Tensor
from transformers import DynamicCache, StaticCache
from transformers.masking_utils import create_masks_for_generate

from steadyrl.models.routing import RoutingRecorder
from steadyrl.ops.masking import masked_fill_zero, response_mask_from_eos
from steadyrl.rollout.base import SamplerCopyMixin, SamplingParams, position_ids_from_mask
from steadyrl.rollout.fused_decode import LlamaFamilyDecodeStep, plain_sdpa_causal
from steadyrl.rollout.sampling import sample_categorical, sampling_logprobs
from steadyrl.types import RolloutBatch


def _cache_kwarg(fn) -> str:
    """The name under which ``fn`` takes a KV cache: ``cache`` (transformers >= 5.24) or ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(fn).parameters else "past_key_values"


def _logits_kwarg(model: torch.nn.Module) -> str | None:
    """The forward argument that restricts the LM head to the last position, if the model has one."""
    names = inspect.signature(model.forward).parameters
    return next((name for name in ("logits_to_keep", "num_logits_to_keep") if name in names), None)


class NativeRolloutBackend(SamplerCopyMixin):
    """RolloutBackend with its own decode loop over a static KV cache.

    Arguments as ``HFRolloutBackend``: ``sampler_dtype`` samples with a separate copy of the policy in that
    dtype, refreshed by ``sync_weights`` (``sampler_quant="fp8"`` fake-quantises it; its hooks select the HF
    forward); ``record_routing`` (default: whenever the sampler is a supported MoE
    model) fills ``routed_experts`` for prompt + completion (R3). Plus:

    fused: decode with the op-for-op Llama / Qwen2 step (``LlamaFamilyDecodeStep``) instead of the HF
        forward. None (default) = whenever the model supports it; True = require it; False = HF forward.
    compile: on CUDA, compile the single-token decode step with ``torch.compile(mode="reduce-overhead")``
        (CUDA graphs over the static cache); ignored, with a warning, on other devices and while recording
        MoE routing.
    stop_check_every: decode steps between reads of the "all rows finished" flag on CUDA (each read is a
        host sync); on CPU the flag is read every step.
    cache_bucket: with ``compile``, the KV cache length is rounded up to a multiple of this, so that prompts
        of a new length reuse the compiled step.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        pad_token_id: int,
        eos_token_id: int | list[int],
        sampler_dtype: torch.dtype | None = None,
        record_routing: bool | None = None,
        sampler_quant: str | None = None,
        fused: bool | None = None,
        compile: bool = False,
        stop_check_every: int = 8,
        cache_bucket: int = 256,
    ) -> None:
        if stop_check_every < 1 or cache_bucket < 1:
            raise ValueError("stop_check_every and cache_bucket must be >= 1.")
        self._init_sampler(model, pad_token_id, eos_token_id, sampler_dtype, record_routing, sampler_quant)
        supported = LlamaFamilyDecodeStep.supports(self.sampler)
        if fused and not supported:
            raise ValueError(
                f"fused decoding needs a dense {'/'.join(LlamaFamilyDecodeStep.MODEL_TYPES)} model with plain "
                "nn.Linear layers, no hooks and SDPA attention; pass fused=None or False to use the HF forward."
            )
        self.fused = supported if fused is None else fused
        self._fused_step = LlamaFamilyDecodeStep(self.sampler) if self.fused else None
        self.compile = compile
        self.stop_check_every = stop_check_every
        self.cache_bucket = cache_bucket
        self._logits_kwarg = _logits_kwarg(self.sampler)
        self._make_masks = getattr(self.sampler, "create_masks_for_generate", create_masks_for_generate)
        self._forward_cache_kwarg = _cache_kwarg(self.sampler.forward)
        self._mask_cache_kwarg = _cache_kwarg(self._make_masks)
        self._own_mask = plain_sdpa_causal(self.sampler.config)
        self._compiled_step = None
        self._kept_cache: tuple[tuple, object] | None = None  # (shape key, StaticCache or K/V buffer lists)
        self._warned_compile = False

    def _hf_forward(
        self, step, input_ids: Tensor, attention_mask, position_ids: Tensor, cache: StaticCache
    ) -> Tensor:
        """fp32 logits (B, V) of the last position through the model's own forward."""
        extra = {self._logits_kwarg: 1} if self._logits_kwarg else {}
        out = step(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **{self._forward_cache_kwarg: cache},
            **extra,
        )
        # a copy: under CUDA graphs the output buffer is overwritten by the next replay
        return out.logits[:, -1].to(dtype=torch.float32, copy=True)

    def _step_fn(self, device: torch.device):
        """The decode step callable, compiled on CUDA when asked."""
        eager = self._fused_step if self.fused else self.sampler
        if not self.compile:
            return eager, False
        # the routing recorder's hooks keep router outputs, which a CUDA graph replay would overwrite
        why_not = "compiles on CUDA only" if device.type != "cuda" else None
        why_not = why_not or ("does not compile while recording MoE routing" if self.record_routing else None)
        if why_not:
            if not self._warned_compile:
                warnings.warn(
                    f"NativeRolloutBackend(compile=True) {why_not}; decoding eagerly.", stacklevel=3
                )
                self._warned_compile = True
            return eager, False
        if self._compiled_step is None:
            self._compiled_step = torch.compile(eager, mode="reduce-overhead", fullgraph=False, dynamic=False)
        return self._compiled_step, True

    def _cache(self, batch_size: int, length: int, device: torch.device, compiled: bool) -> StaticCache:
        """A fresh StaticCache, or (compiled decoding) the kept one when its shape fits, emptied."""
        if not compiled:
            return StaticCache(config=self.sampler.config, max_cache_len=length)
        key = ("static", batch_size, length, device, self.sampler.dtype)
        if self._kept_cache is not None and self._kept_cache[0] == key:
            cache = self._kept_cache[1]
            cache.reset()
            return cache
        self._kept_cache = None  # free the old one before allocating
        cache = StaticCache(config=self.sampler.config, max_cache_len=length)
        self._kept_cache = (key, cache)
        return cache

    def _kv_buffers(self, like: Tensor, batch_size: int, length: int, compiled: bool) -> tuple[list, list]:
        """Zeroed K and V buffers (B, H_kv, L, D) per layer (kept between calls when compiled).

        Zeros, not garbage: a masked slot gets attention weight 0, and 0 · NaN would still be NaN.
        """
        layers = len(self._fused_step.layers)
        shape = (batch_size, like.shape[1], length, like.shape[3])
        key = ("fused", shape, like.device, like.dtype)
        if compiled and self._kept_cache is not None and self._kept_cache[0] == key:
            keys, values = self._kept_cache[1]
            for buffer in keys + values:
                buffer.zero_()
            return keys, values
        self._kept_cache = None
        keys = [like.new_zeros(shape) for _ in range(layers)]
        values = [like.new_zeros(shape) for _ in range(layers)]
        if compiled:
            for buffer in keys + values:  # fixed addresses: CUDA graphs read them in place instead of copying
                torch._dynamo.mark_static_address(buffer)
            self._kept_cache = (key, (keys, values))
        return keys, values

    def _fused_prefill(self, prompt_ids: Tensor, prompt_mask: Tensor, cache_len: int, compiled: bool):
        """Prefill every distinct prompt once, through the HF forward; fill the K/V buffers for all B rows.

        GRPO repeats each prompt G times, so the prefill costs P rows, not P · G. Returns the (B, V) fp32
        logits of the last prompt position and the per-layer K/V buffers.
        """
        batch_size, prompt_len = prompt_ids.shape
        rows = prompt_ids.masked_fill(~prompt_mask, -1)  # padding never equals a real token
        distinct, inverse = torch.unique(rows, dim=0, return_inverse=True)
        if distinct.shape[0] < batch_size:
            first = torch.empty(distinct.shape[0], dtype=torch.long, device=prompt_ids.device)
            first.scatter_(0, inverse, torch.arange(batch_size, device=prompt_ids.device))
            prompt_ids, prompt_mask = prompt_ids[first], prompt_mask[first]
        else:
            inverse = None
        prefill_cache = DynamicCache(config=self.sampler.config)
        logits = self._hf_forward(
            self.sampler, prompt_ids, prompt_mask, position_ids_from_mask(prompt_mask), prefill_cache
        )
        layers = prefill_cache.layers
        keys, values = self._kv_buffers(layers[0].keys, batch_size, cache_len, compiled)
        for index, layer in enumerate(layers):
            layer_keys, layer_values = layer.keys, layer.values
            if inverse is not None:
                layer_keys, layer_values = layer_keys[inverse], layer_values[inverse]
            keys[index][:, :, :prompt_len].copy_(layer_keys)
            values[index][:, :, :prompt_len].copy_(layer_values)
        return (logits if inverse is None else logits[inverse]), keys, values

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: Tensor,  # (B, Tp) long, left-padded
        prompt_mask: Tensor,  # (B, Tp) bool
        params: SamplingParams,
        generator: torch.Generator | None = None,
    ) -> RolloutBatch:
        if params.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {params.max_new_tokens}.")
        device = prompt_ids.device
        batch_size, prompt_len = prompt_ids.shape
        new_tokens = params.max_new_tokens
        prompt_mask = prompt_mask.bool()
        step_fn, compiled = self._step_fn(device)
        cache_len = prompt_len + new_tokens - 1  # the last sampled token is never fed back
        if compiled:
            cache_len = -(-cache_len // self.cache_bucket) * self.cache_bucket
        # Which cache slots the next token attends to: the real prompt tokens, then each generated slot once
        # written. For plain causal SDPA models its (B, 1, 1, L) view is the attention mask itself; otherwise
        # transformers builds the mask from a padding mask (prompt padding off, everything after on: slots not
        # yet written are excluded there by causality).
        visible = torch.zeros((batch_size, cache_len), dtype=torch.bool, device=device)
        visible[:, :prompt_len] = prompt_mask
        if not self._own_mask:
            padding_mask = torch.ones_like(visible)
            padding_mask[:, :prompt_len] = prompt_mask
            empty_embeds = torch.empty((batch_size, 1, 0), dtype=self.sampler.dtype, device=device)
        eos_ids = torch.as_tensor(self.eos_token_id, device=device).reshape(-1)
        pad = torch.full((), self.pad_token_id, dtype=torch.long, device=device)

        completion = torch.full((batch_size, new_tokens), self.pad_token_id, dtype=torch.long, device=device)
        logprobs = torch.zeros((batch_size, new_tokens), dtype=torch.float32, device=device)
        finished = torch.zeros(batch_size, dtype=torch.bool, device=device)
        next_input = torch.empty((batch_size, 1), dtype=torch.long, device=device)
        # (B, 1): the first new token's position is the number of real prompt tokens
        next_position = prompt_mask.long().sum(-1, keepdim=True)
        slot = torch.full((1,), prompt_len, dtype=torch.long, device=device)
        check_every = self.stop_check_every if device.type == "cuda" else 1

        was_training = self.sampler.training
        self.sampler.eval()
        recording = RoutingRecorder(self.sampler) if self.record_routing else contextlib.nullcontext()
        try:
            with recording:
                if self.fused:
                    logits, keys, values = self._fused_prefill(prompt_ids, prompt_mask, cache_len, compiled)
                else:
                    cache = self._cache(batch_size, cache_len, device, compiled)
                    position_ids = position_ids_from_mask(prompt_mask)
                    logits = self._hf_forward(self.sampler, prompt_ids, prompt_mask, position_ids, cache)
                steps_done = new_tokens
                for t in range(new_tokens):
                    log_mu = sampling_logprobs(logits, params)  # (B, V)
                    if params.greedy:
                        token = logits.argmax(dim=-1)
                    else:
                        token = sample_categorical(log_mu.exp(), generator)
                    token = torch.where(finished, pad, token)  # finished rows emit pad, as HF generate does
                    completion[:, t] = token
                    logprobs[:, t] = log_mu.gather(1, token[:, None]).squeeze(1)
                    finished |= torch.isin(token, eos_ids)
                    if t == new_tokens - 1 or ((t + 1) % check_every == 0 and bool(finished.all())):
                        steps_done = t + 1
                        break
                    next_input.copy_(token[:, None])
                    visible[:, prompt_len + t] = True
                    if compiled:
                        torch.compiler.cudagraph_mark_step_begin()
                    if self.fused:
                        kv_len = None if compiled else prompt_len + t + 1
                        logits = step_fn(next_input, next_position, visible, slot, keys, values, kv_len)
                        slot += 1
                    else:
                        if self._own_mask:
                            attention_mask = visible[:, None, None, :]
                        else:
                            attention_mask = self._make_masks(
                                config=self.sampler.config,
                                inputs_embeds=empty_embeds,
                                attention_mask=padding_mask,
                                position_ids=next_position,
                                **{self._mask_cache_kwarg: cache},
                            )
                        logits = self._hf_forward(step_fn, next_input, attention_mask, next_position, cache)
                    next_position += 1
        finally:
            self.sampler.train(was_training)

        completion, logprobs = completion[:, :steps_done], logprobs[:, :steps_done]
        response_mask, truncated = response_mask_from_eos(completion, self.eos_token_id)
        if check_every > 1:
            # the flag was read every few steps: drop the steps after the last row finished, as HF does
            longest = int(response_mask.sum(-1).max())
            completion, logprobs = completion[:, :longest], logprobs[:, :longest]
            response_mask = response_mask[:, :longest]
        routed_experts = None
        if self.record_routing:
            # recorded: the prompt, then one position per fed-back token (steps_done − 1 of them)
            routed_experts = recording.routed_experts(batch_size, prompt_len + steps_done)
            routed_experts = routed_experts[:, : prompt_len + completion.shape[1]]
        return RolloutBatch(
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask,
            completion_ids=completion,
            response_mask=response_mask,
            rollout_logprobs=masked_fill_zero(logprobs, response_mask),
            truncated=truncated,
            routed_experts=routed_experts,
        )
