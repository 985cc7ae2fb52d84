"""Rollouts with transformers' ``generate``, returning the sampler's own per-token log-probs μ.

``generate`` applies user logits processors *before* its own temperature / top-k / top-p warpers, so this
backend disables the built-in warpers and passes its own, followed by a recorder that keeps the final
log-softmax of each step: μ is then exactly the distribution the token was drawn from. The recorder holds one
(B, V) step at a time, never the (B, T, V) history that ``output_scores`` would keep.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from steadyrl.models.routing import RoutingRecorder
from steadyrl.ops.masking import masked_fill_zero, response_mask_from_eos
from steadyrl.rollout.base import SamplerCopyMixin, SamplingParams
from steadyrl.types import RolloutBatch


class _SampledLogprobRecorder(LogitsProcessor):
    """Records log softmax(processed scores)[sampled token] for every decoding step."""

    def __init__(self) -> None:
        self.previous: Tensor | None = None  # (B, V) log-probs of the last step, awaiting its sampled token
        self.logprobs: list[Tensor] = []

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if self.previous is not None:
            self.logprobs.append(self.previous.gather(1, input_ids[:, -1:]).squeeze(1))
        self.previous = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def finish(self, last_tokens: Tensor) -> Tensor:
        """(B, T) log-probs once generation is over; ``last_tokens`` are the tokens of the final step."""
        if self.previous is not None:
            self.logprobs.append(self.previous.gather(1, last_tokens[:, None]).squeeze(1))
        return torch.stack(self.logprobs, dim=1)


class HFRolloutBackend(SamplerCopyMixin):
    """RolloutBackend over ``model.generate``.

    ``sampler_dtype`` (e.g. torch.bfloat16) samples with a separate copy of the policy in that dtype, kept in
    sync by ``sync_weights``: a real, measurable train-inference mismatch as with a bf16/fp8 inference engine.
    ``sampler_quant="fp8"`` fake-quantises that copy's linear layers to FP8 (rollout/quant.py).

    ``record_routing`` (default: whenever the sampler is a supported MoE model, see models/routing.py) fills
    ``RolloutBatch.routed_experts`` with the sampler's own expert choices for prompt + completion (R3).
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
    ) -> None:
        self._init_sampler(model, pad_token_id, eos_token_id, sampler_dtype, record_routing, sampler_quant)

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: Tensor,  # (B, Tp)
        prompt_mask: Tensor,  # (B, Tp) bool
        params: SamplingParams,
        generator: torch.Generator | None = None,
    ) -> RolloutBatch:
        recorder = _SampledLogprobRecorder()
        processors: list[LogitsProcessor] = []
        if not params.greedy:
            if params.temperature != 1.0:
                processors.append(TemperatureLogitsWarper(params.temperature))
            if params.top_k:
                processors.append(TopKLogitsWarper(top_k=params.top_k))
            if params.top_p < 1.0:
                processors.append(TopPLogitsWarper(top_p=params.top_p))
        processors.append(recorder)
        gen_config = GenerationConfig(
            do_sample=not params.greedy,
            max_new_tokens=params.max_new_tokens,
            temperature=1.0,
            top_k=None,
            top_p=1.0,
            pad_token_id=self.pad_token_id,
            eos_token_id=self.eos_token_id,
        )
        was_training = self.sampler.training
        self.sampler.eval()
        device = prompt_ids.device
        seed = None if generator is None else int(torch.randint(0, 2**62, (1,), generator=generator))
        devices = [device] if device.type == "cuda" else []
        recording = RoutingRecorder(self.sampler) if self.record_routing else contextlib.nullcontext()
        with torch.random.fork_rng(devices=devices, enabled=seed is not None), recording:
            if seed is not None:
                torch.manual_seed(seed)
            out = self.sampler.generate(
                input_ids=prompt_ids,
                attention_mask=prompt_mask.long(),
                generation_config=gen_config,
                logits_processor=LogitsProcessorList(processors),
            )
        self.sampler.train(was_training)
        completion_ids = out[:, prompt_ids.shape[1] :]
        routed_experts = recording.routed_experts(out.shape[0], out.shape[1]) if self.record_routing else None
        logprobs = recorder.finish(completion_ids[:, -1])
        response_mask, truncated = response_mask_from_eos(completion_ids, self.eos_token_id)
        completion_ids = torch.where(response_mask, completion_ids, torch.full_like(completion_ids, self.pad_token_id))
        return RolloutBatch(
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask.bool(),
            completion_ids=completion_ids,
            response_mask=response_mask,
            rollout_logprobs=masked_fill_zero(logprobs, response_mask),
            truncated=truncated,
            routed_experts=routed_experts,
        )
