"""Best-first enumeration of a prompt's completions: the response space of the embedded model, almost exactly.

With ~3.5-token answers over a 23-token vocabulary the completions that carry 99.9 % of a prompt's mass
number about a hundred, so expectations over y ∼ π(·|x) can be *summed* instead of sampled:

    heap ← {empty prefix};  repeat: pop the most probable item;
        a finished completion (ends in EOS, or reaches max_new_tokens) → keep it;
        a prefix → push its |V| children with log π(prefix) + log π(v | prefix)
    until the kept completions carry ``mass`` of the prompt (or ``max_rows`` are kept).

Because items leave the heap in order of probability, the kept set is the smallest set of completions that
reaches ``mass`` (every finished completion outside it is less probable than every one inside). With several
``models`` the search runs under their mixture, log π_mix = log mean_m π_m, so one set covers the policy and
every sampler it is compared with; each model's own mass on the set is returned (``mass_of``).

Everything is teacher-forced with the model's own forward, left-padded prompts and positions counted over real
tokens, as the trainer scores them. Up to ``width`` prefixes per prompt are expanded per forward; a finished
completion is kept only when no prefix is waiting for expansion, so the order stays exactly best-first.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from steadyrl.rollout.base import left_pad, position_ids_from_mask
from steadyrl.types import RolloutBatch


@dataclass
class Enumerated:
    """The kept completions of every prompt, one row each (rows of a prompt are contiguous, best first)."""

    prompt_index: Tensor  # (R,) long, index into the prompt list
    prompt_ids: Tensor  # (R, Tp) long, left-padded
    prompt_mask: Tensor  # (R, Tp) bool
    completion_ids: Tensor  # (R, T) long, right-padded with pad
    response_mask: Tensor  # (R, T) bool, up to and including EOS
    truncated: Tensor  # (R,) bool, no EOS within max_new_tokens
    logprob: Tensor  # (M, R) float64, log π_m(y | x) of each row under each enumeration model
    num_prompts: int

    @property
    def num_rows(self) -> int:
        return int(self.prompt_index.shape[0])

    def mass_of(self, model_index: int = 0) -> Tensor:  # (P,) float64
        """Σ_{y kept} π_m(y | x) per prompt: the share of model m's mass the set covers."""
        out = torch.zeros(self.num_prompts, dtype=torch.float64)
        return out.index_add_(0, self.prompt_index, self.logprob[model_index].exp())

    def rollout(self, rollout_logprobs: Tensor | None = None) -> RolloutBatch:
        """The rows as a RolloutBatch (``rollout_logprobs`` (R, T) = log μ per token; zeros when None)."""
        lp = torch.zeros(self.completion_ids.shape) if rollout_logprobs is None else rollout_logprobs
        return RolloutBatch(
            prompt_ids=self.prompt_ids,
            prompt_mask=self.prompt_mask,
            completion_ids=self.completion_ids,
            response_mask=self.response_mask,
            rollout_logprobs=lp,
            truncated=self.truncated,
        )

    def select(self, rows: Tensor) -> Enumerated:
        return Enumerated(
            self.prompt_index[rows],
            self.prompt_ids[rows],
            self.prompt_mask[rows],
            self.completion_ids[rows],
            self.response_mask[rows],
            self.truncated[rows],
            self.logprob[:, rows],
            self.num_prompts,
        )


@torch.no_grad()
def next_token_logprobs(model: torch.nn.Module, sequences: list[list[int]], pad_id: int, temperature: float) -> Tensor:
    """(n, V) fp64 log-softmax(z / τ) of the token after each (left-padded) sequence, from the model's forward."""
    ids, mask = left_pad(sequences, pad_id, next(model.parameters()).device)
    logits = model(input_ids=ids, attention_mask=mask.long(), position_ids=position_ids_from_mask(mask)).logits
    return torch.log_softmax(logits[:, -1].double() / temperature, dim=-1).cpu()


def enumerate_completions(
    models: Sequence[torch.nn.Module],
    prompts: Sequence[Sequence[int]],
    *,
    eos_id: int,
    pad_id: int,
    max_new_tokens: int,
    mass: float = 0.999,
    temperature: float = 1.0,
    width: int = 8,
    max_rows: int = 2000,
) -> Enumerated:
    """Best-first enumeration (module docstring) of each prompt's completions under the mixture of ``models``."""
    if not models:
        raise ValueError("enumerate_completions needs at least one model.")
    if not 0.0 < mass <= 1.0:
        raise ValueError(f"mass must be in (0, 1], got {mass}.")
    log_m = math.log(len(models))
    # heap items: (−log π_mix, tie, prompt, tokens tuple, finished, per-model log-probs tuple)
    heaps: list[list] = [[(0.0, 0, p, (), False, (0.0,) * len(models))] for p in range(len(prompts))]
    kept: list[list[tuple[tuple[int, ...], bool, tuple[float, ...]]]] = [[] for _ in prompts]
    covered = [0.0] * len(prompts)
    tie = 1
    while True:
        expand = []  # (prompt, tokens, per-model logprobs)
        for p, heap in enumerate(heaps):
            taken = 0
            while heap and covered[p] < mass and len(kept[p]) < max_rows and taken < width:
                if heap[0][4] and taken:  # a finished item after an expansion waits: a child may beat it
                    break
                neg, _, _, tokens, finished, lps = heapq.heappop(heap)
                if finished:
                    kept[p].append((tokens, tokens[-1] != eos_id, lps))
                    covered[p] += math.exp(-neg)
                else:
                    expand.append((p, tokens, lps))
                    taken += 1
        if not expand:
            break
        seqs = [list(prompts[p]) + list(tokens) for p, tokens, _ in expand]
        nexts = torch.stack([next_token_logprobs(m, seqs, pad_id, temperature) for m in models], dim=1)  # (n, M, V)
        for (p, tokens, lps), lp in zip(expand, nexts.tolist()):
            for v in range(len(lp[0])):
                if v == pad_id:
                    continue
                child = tuple(a + row[v] for a, row in zip(lps, lp))
                top = max(child)
                mix = top + math.log(sum(math.exp(c - top) for c in child)) - log_m if top > -math.inf else top
                done = v == eos_id or len(tokens) + 1 >= max_new_tokens
                heapq.heappush(heaps[p], (-mix, tie, p, tokens + (v,), done, child))
                tie += 1
    return _pack(kept, prompts, pad_id, max_new_tokens, len(models))


def _pack(kept, prompts, pad_id: int, max_new_tokens: int, num_models: int) -> Enumerated:
    rows = [(p, tokens, truncated, lps) for p, items in enumerate(kept) for tokens, truncated, lps in items]
    if not rows:
        raise ValueError("the enumeration kept no completion; check the prompts and max_new_tokens.")
    prompt_ids, prompt_mask = left_pad([list(prompts[p]) for p, *_ in rows], pad_id)
    width = max(len(tokens) for _, tokens, _, _ in rows)
    completion = torch.full((len(rows), width), pad_id, dtype=torch.long)
    response = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (_, tokens, _, _) in enumerate(rows):
        completion[i, : len(tokens)] = torch.tensor(tokens)
        response[i, : len(tokens)] = True
    return Enumerated(
        prompt_index=torch.tensor([p for p, *_ in rows]),
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=completion,
        response_mask=response,
        truncated=torch.tensor([t for _, _, t, _ in rows]),
        logprob=torch.tensor([lps for *_, lps in rows], dtype=torch.float64).T.reshape(num_models, len(rows)),
        num_prompts=len(prompts),
    )
