"""The rows of a step while the sampling layer works on them: groups of completions with their rewards.

``Groups`` holds rows ``g*G .. g*G+G-1`` for prompt ``g`` (groups contiguous, as everywhere in steadyrl).
In a multi-process run the layer either works on the *global* rows (every rank holds every row, gathered
after generation, so that a filter can drop a group generated on one rank and a later round refill it on
another) or, when no component moves rows, on the rank's own rows only (today's cheap path; only per-row
scalars are gathered for the advantage).  Everything here is bookkeeping, no method math.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch import Tensor

from steadyrl.runtime.distributed import DistInfo
from steadyrl.tasks import Prompt
from steadyrl.types import RolloutBatch

POLICY, REPLAYED, HINTED = 0, 1, 2
"""``Groups.origin`` codes: sampled from the policy for the prompt as selected, replayed from the trajectory
store (R³), sampled with a hint in the prompt (SAGE)."""


@dataclass
class Groups:
    prompts: list[Prompt]  # (P) the prompt each group answers, as selected
    group_size: int
    rollout: RolloutBatch  # (rows, ...)
    row_prompts: list[Prompt]  # (rows) the prompt the row was generated from (a SAGE hint appended)
    completions: list[str]  # (rows) what the task scored (a SAGE hint prefix included)
    task_rewards: Tensor  # (rows,) the task's reward, before reward shaping
    rewards: Tensor  # (rows,) after shaping; NaN = unscorable
    keep: Tensor  # (rows,) bool; False = left out of the advantage statistics and of the loss
    origin: Tensor  # (rows,) int8, POLICY / REPLAYED / HINTED
    first_group: int = 0  # global index of prompts[0] (rank-local rows); 0 for global rows
    components: Tensor | None = None  # (rows, K) a multi-reward task's named rewards (GDPO), NaN = missing
    component_names: tuple[str, ...] = ()

    def named_components(self) -> dict[str, Tensor]:
        if self.components is None:
            return {}
        return {name: self.components[:, k] for k, name in enumerate(self.component_names)}

    @property
    def num_groups(self) -> int:
        return len(self.prompts)

    @property
    def lengths(self) -> Tensor:
        return self.rollout.response_mask.sum(1)

    def group_rows(self, index: list[int]) -> Tensor:
        g = self.group_size
        return torch.tensor([i * g + j for i in index for j in range(g)], dtype=torch.long)

    def select_groups(self, index: list[int]) -> Groups:
        rows = self.group_rows(index)
        device_rows = rows.to(self.rewards.device)
        return replace(
            self,
            prompts=[self.prompts[i] for i in index],
            rollout=self.rollout.select(device_rows),
            row_prompts=[self.row_prompts[i] for i in rows.tolist()],
            completions=[self.completions[i] for i in rows.tolist()],
            task_rewards=self.task_rewards[device_rows],
            rewards=self.rewards[device_rows],
            keep=self.keep[device_rows],
            origin=self.origin[device_rows],
            components=None if self.components is None else self.components[device_rows],
        )

    def concat(self, other: Groups, pad_token_id: int) -> Groups:
        return replace(
            self,
            prompts=self.prompts + other.prompts,
            rollout=concat_rollouts([self.rollout, other.rollout], pad_token_id),
            row_prompts=self.row_prompts + other.row_prompts,
            completions=self.completions + other.completions,
            task_rewards=torch.cat([self.task_rewards, other.task_rewards]),
            rewards=torch.cat([self.rewards, other.rewards]),
            keep=torch.cat([self.keep, other.keep]),
            origin=torch.cat([self.origin, other.origin]),
            components=_cat_optional(self.components, other.components),
        )

    def replace_rows(self, rows: Tensor, new: Groups, new_rows: Tensor, pad_token_id: int) -> Groups:
        """These rows overwritten by ``new``'s rows ``new_rows`` (same prompts; widths padded to fit)."""
        base, other = pad_to_common([self.rollout, new.rollout], pad_token_id)
        out = {}
        for name in ("prompt_ids", "prompt_mask", "completion_ids", "response_mask", "rollout_logprobs", "truncated"):
            t = getattr(base, name).clone()
            t[rows] = getattr(other, name)[new_rows]
            out[name] = t
        row_prompts, completions = list(self.row_prompts), list(self.completions)
        for dst, src in zip(rows.tolist(), new_rows.tolist()):
            row_prompts[dst], completions[dst] = new.row_prompts[src], new.completions[src]
        pick = lambda old, src: _scatter(old, rows, src[new_rows.to(src.device)])  # noqa: E731
        return replace(
            self,
            rollout=RolloutBatch(**out, routed_experts=None),
            row_prompts=row_prompts,
            completions=completions,
            task_rewards=pick(self.task_rewards, new.task_rewards),
            rewards=pick(self.rewards, new.rewards),
            keep=pick(self.keep, new.keep),
            origin=pick(self.origin, new.origin),
            components=None if self.components is None or new.components is None
            else pick(self.components, new.components),
        )


def _cat_optional(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    return None if a is None or b is None else torch.cat([a, b])


def _scatter(old: Tensor, rows: Tensor, values: Tensor) -> Tensor:
    out = old.clone()
    out[rows.to(old.device)] = values.to(old.dtype)
    return out


def pad_rollout(r: RolloutBatch, prompt_len: int, completion_len: int, pad_token_id: int) -> RolloutBatch:
    """Prompts left-padded to ``prompt_len``, completions right-padded to ``completion_len`` (masks False)."""
    if r.routed_experts is not None and (prompt_len, completion_len) != (r.prompt_ids.shape[1], r.completion_ids.shape[1]):
        raise ValueError("cannot re-pad a rollout that carries recorded MoE routing (R3); see the sampling docs.")
    dp, dc = prompt_len - r.prompt_ids.shape[1], completion_len - r.completion_ids.shape[1]
    left = lambda t, v: torch.nn.functional.pad(t, (dp, 0), value=v)  # noqa: E731
    right = lambda t, v: torch.nn.functional.pad(t, (0, dc), value=v)  # noqa: E731
    return RolloutBatch(
        prompt_ids=left(r.prompt_ids, pad_token_id),
        prompt_mask=left(r.prompt_mask, False),
        completion_ids=right(r.completion_ids, pad_token_id),
        response_mask=right(r.response_mask, False),
        rollout_logprobs=right(r.rollout_logprobs, 0.0),
        truncated=r.truncated,
        routed_experts=r.routed_experts,
    )


def pad_to_common(rollouts: list[RolloutBatch], pad_token_id: int) -> list[RolloutBatch]:
    tp = max(r.prompt_ids.shape[1] for r in rollouts)
    tc = max(r.completion_ids.shape[1] for r in rollouts)
    return [pad_rollout(r, tp, tc, pad_token_id) for r in rollouts]


def concat_rollouts(rollouts: list[RolloutBatch], pad_token_id: int) -> RolloutBatch:
    padded = pad_to_common(rollouts, pad_token_id)
    fields = ("prompt_ids", "prompt_mask", "completion_ids", "response_mask", "rollout_logprobs", "truncated")
    return RolloutBatch(**{f: torch.cat([getattr(r, f) for r in padded]) for f in fields}, routed_experts=None)


def empty_rollout(device: torch.device) -> RolloutBatch:
    """A rollout with no rows (a rank with nothing to generate in a round still joins the gather)."""
    long = torch.zeros((0, 1), dtype=torch.long, device=device)
    flag = torch.zeros((0, 1), dtype=torch.bool, device=device)
    return RolloutBatch(long, flag, long.clone(), flag.clone(), torch.zeros((0, 1), device=device),
                        torch.zeros(0, dtype=torch.bool, device=device))


def share(num_groups: int, info: DistInfo) -> range:
    """The contiguous groups rank ``info.rank`` generates: ⌈n/w⌉ each, the last ranks fewer."""
    per = -(-num_groups // info.world_size)
    return range(min(info.rank * per, num_groups), min((info.rank + 1) * per, num_groups))


def gather_rollout(local: RolloutBatch, info: DistInfo, pad_token_id: int) -> RolloutBatch:
    """Every rank's rows, in rank order, on every rank (rows may differ in number between ranks)."""
    if not info.enabled:
        return local
    if local.routed_experts is not None:
        raise ValueError("recorded MoE routing (R3) cannot travel between ranks; see the sampling docs.")
    device = local.completion_ids.device
    sizes = torch.tensor([local.batch_size, local.prompt_ids.shape[1], local.completion_ids.shape[1]], device=device)
    all_sizes = [torch.zeros_like(sizes) for _ in range(info.world_size)]
    dist.all_gather(all_sizes, sizes)
    rows = [int(s[0]) for s in all_sizes]
    tp, tc = max(int(s[1]) for s in all_sizes), max(int(s[2]) for s in all_sizes)
    padded = pad_rollout(local, tp, tc, pad_token_id)
    fields = ("prompt_ids", "prompt_mask", "completion_ids", "response_mask", "rollout_logprobs", "truncated")
    out = {}
    for name in fields:
        t = getattr(padded, name)
        full = torch.zeros((max(rows),) + tuple(t.shape[1:]), dtype=t.dtype, device=device)
        full[: t.shape[0]] = t
        parts = [torch.empty_like(full) for _ in range(info.world_size)]
        dist.all_gather(parts, full)
        out[name] = torch.cat([p[:n] for p, n in zip(parts, rows)])
    return RolloutBatch(**out, routed_experts=None)


def gather_tensor(local: Tensor, info: DistInfo) -> Tensor:
    """Concatenation over ranks of equally sized per-row tensors (identity on one process)."""
    if not info.enabled:
        return local
    parts = [torch.empty_like(local) for _ in range(info.world_size)]
    dist.all_gather(parts, local.contiguous())
    return torch.cat(parts)


def gather_objects(local: list, info: DistInfo) -> list:
    """Concatenation over ranks of per-row Python objects (answers for COPO in the rank-local path)."""
    if not info.enabled:
        return local
    parts: list = [None] * info.world_size
    dist.all_gather_object(parts, local)
    return [x for part in parts for x in part]
