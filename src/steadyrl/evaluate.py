"""Held-out evaluation: greedy accuracy and sampled pass@1 / pass@k, split over ranks."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from steadyrl.models.chat import PromptRenderer
from steadyrl.rollout.base import RolloutBackend, SamplingParams
from steadyrl.rollout.text import decode_completions, encode_prompts, eos_ids
from steadyrl.runtime.distributed import DistInfo, all_reduce_
from steadyrl.tasks import Prompt, Task, score_batch


def evaluate(
    backend: RolloutBackend,
    tokenizer,
    task: Task,
    prompts: list[Prompt],
    *,
    sampling: SamplingParams,
    pass_k: int = 8,
    greedy: bool = True,
    batch_size: int = 256,
    seed: int = 0,
    info: DistInfo | None = None,
    device: torch.device | str = "cpu",
    correct_threshold: float = 1.0,
    renderer: PromptRenderer | None = None,
    on_samples: Callable[[list[dict[str, Any]]], None] | None = None,
    num_samples: int = 4,
) -> dict[str, float]:
    """Metrics over ``prompts``: eval/accuracy (greedy), eval/pass@1 (mean over k samples), eval/pass@k.

    A completion is correct when its reward is at least ``correct_threshold`` (full marks by default, so tasks
    with partial credit count only fully correct answers). Rank r evaluates prompts r, r+W, r+2W, ...
    ``renderer`` renders the prompts as in training (rollout.text.encode_prompts).

    ``on_samples`` receives this rank's first ``num_samples`` prompts with their completion and reward, as
    dicts ``{prompt, answer, completion, reward (None when unscorable), greedy}``: the greedy completions, or
    the first sampled one of each prompt when ``greedy`` is off.
    """
    info = info or DistInfo()
    device = torch.device(device)
    mine = prompts[info.rank :: info.world_size]
    eos = eos_ids(tokenizer)
    generator = torch.Generator(device=device).manual_seed(seed * 7_919 + info.rank)
    # sums: greedy correct, greedy reward, prompts, sampled correct, prompts with any correct, samples, length
    sums = torch.zeros(7, dtype=torch.float64)
    samples: list[dict[str, Any]] = []

    def run(
        batch_prompts: list[Prompt], params: SamplingParams, record_every: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = encode_prompts(tokenizer, batch_prompts, device, renderer)
        out = backend.generate(ids, mask, params, generator=generator)
        texts = decode_completions(tokenizer, out.completion_ids, out.response_mask, eos)
        rewards = score_batch(task, batch_prompts, texts).rewards
        if record_every:  # every k-th: the first of each prompt's k samples
            for j in range(0, len(batch_prompts), record_every)[: max(num_samples - len(samples), 0)]:
                samples.append(_sample(batch_prompts[j], texts[j], float(rewards[j]), params.temperature == 0.0))
        return rewards, out.response_mask.sum(1).float().cpu()

    if greedy:
        greedy_params = SamplingParams(max_new_tokens=sampling.max_new_tokens, temperature=0.0)
        for i in range(0, len(mine), batch_size):
            rewards, lengths = run(mine[i : i + batch_size], greedy_params, record_every=1)
            rewards = torch.nan_to_num(rewards.double(), nan=0.0)
            sums[0] += (rewards >= correct_threshold).sum()
            sums[1] += rewards.sum()
            sums[6] += lengths.sum()
    sums[2] += len(mine)
    if pass_k > 0:
        per_batch = max(1, batch_size // pass_k)
        for i in range(0, len(mine), per_batch):
            chunk = mine[i : i + per_batch]
            expanded = [p for p in chunk for _ in range(pass_k)]
            rewards, _ = run(expanded, sampling, record_every=None if greedy else pass_k)
            correct = (torch.nan_to_num(rewards.double(), nan=0.0) >= correct_threshold).view(len(chunk), pass_k)
            sums[3] += correct.sum()
            sums[4] += correct.any(dim=1).sum()
            sums[5] += correct.numel()
    if info.enabled:
        sums = all_reduce_(sums.to(device), "sum").cpu()
    n_prompts = max(sums[2].item(), 1.0)
    metrics: dict[str, float] = {}
    if greedy:
        metrics["eval/accuracy"] = sums[0].item() / n_prompts
        metrics["eval/reward_mean"] = sums[1].item() / n_prompts
        metrics["eval/len_mean"] = sums[6].item() / n_prompts
    if pass_k > 0:
        metrics["eval/pass@1"] = sums[3].item() / max(sums[5].item(), 1.0)
        metrics[f"eval/pass@{pass_k}"] = sums[4].item() / n_prompts
    if on_samples is not None and samples:
        on_samples(samples)
    return metrics


def _sample(prompt: Prompt, completion: str, reward: float, greedy: bool) -> dict[str, Any]:
    return {
        "prompt": prompt.text,
        "answer": prompt.answer,
        "completion": completion,
        "reward": reward if math.isfinite(reward) else None,
        "greedy": greedy,
    }
