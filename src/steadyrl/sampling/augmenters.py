"""Group augmenters (registry family ``group_augmenter``): put signal back into groups whose rewards are all
equal, by replaying a stored trajectory of the same prompt (R³) or by regenerating with a hint (SAGE).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from steadyrl.sampling.groups import HINTED, POLICY, REPLAYED, Groups
from steadyrl.sampling.store import TrajectoryBuffer
from steadyrl.tasks import Prompt
from steadyrl.types import Metrics, RolloutBatch

_HINT_SALT = 400_009


class R3Replay:
    """R³ cross-context replay (Jiang et al., arXiv 2601.19620; methods.md §6.18): a group whose rewards are
    all equal gets up to ``replay_per_group`` of its rows replaced by stored trajectories of the same prompt
    whose reward differs, so the group has reward variance again.

    Only the abstract is public and no code was released: everything below is [INF] and a parameter.
      * store: after each step, for every policy-sampled group, one trajectory per distinct reward value (the
        first row with it), in a ``TrajectoryBuffer`` of ``per_prompt`` trajectories per prompt (oldest
        evicted) and ``max_prompts`` prompts (least recently updated evicted);
      * replay: the newest stored trajectories with another reward replace the group's last rows; they keep
        the sampler log-probs μ of the step that generated them, so an IS correction (e.g.
        ``correction: token_tis``) sees how stale they are; the update itself treats them like fresh rows;
      * the reflection re-prompts and the entropy-ranking reward of R³ are not implemented.
    Metrics: ``r3/replayed_groups`` (fraction of groups), ``r3/stored``.
    """

    moves_rows = True

    def __init__(self, replay_per_group: int = 1, per_prompt: int = 4, max_prompts: int = 4096) -> None:
        if replay_per_group < 1:
            raise ValueError(f"replay_per_group must be >= 1, got {replay_per_group}.")
        self.replay_per_group = replay_per_group
        self.buffer = TrajectoryBuffer(per_prompt, max_prompts)
        self._replayed = 0.0

    def augment(self, step: int, groups: Groups, layer: Any) -> Groups:
        g, replayed = groups.group_size, 0
        rewards, keep, origin = groups.rewards.tolist(), groups.keep.tolist(), groups.origin.tolist()
        for i, prompt in enumerate(groups.prompts):
            rows = range(i * g, (i + 1) * g)
            if any(origin[r] != POLICY for r in rows):
                continue
            values = {rewards[r] for r in rows if keep[r] and rewards[r] == rewards[r]}  # NaN != NaN
            if len(values) != 1:
                continue
            stored = self.buffer.candidates(prompt.id, values.pop())[: min(self.replay_per_group, g - 1)]
            if not stored:
                continue
            targets = torch.tensor(list(rows)[g - len(stored):], dtype=torch.long)
            new = _stored_rows(stored, groups, targets, layer)
            groups = groups.replace_rows(targets, new, torch.arange(len(stored)), layer.pad_token_id)
            replayed += 1
        self._replayed = replayed / max(groups.num_groups, 1)
        return groups

    def observe(self, step: int, groups: Groups) -> None:
        g, r = groups.group_size, groups.rollout
        rewards, task_rewards = groups.rewards.tolist(), groups.task_rewards.tolist()
        keep, origin, lengths = groups.keep.tolist(), groups.origin.tolist(), r.response_mask.sum(1).tolist()
        ids, logp, truncated = r.completion_ids.tolist(), r.rollout_logprobs.tolist(), r.truncated.tolist()
        for i, prompt in enumerate(groups.prompts):
            seen: set[float] = set()
            for row in range(i * g, (i + 1) * g):
                reward = rewards[row]
                if not keep[row] or origin[row] != POLICY or reward != reward or reward in seen:
                    continue
                seen.add(reward)
                n = lengths[row]
                self.buffer.add(prompt.id, {
                    "ids": ids[row][:n], "logprobs": logp[row][:n], "truncated": truncated[row],
                    "reward": reward, "task_reward": task_rewards[row], "step": step,
                })

    def metrics(self) -> Metrics:
        return {"r3/replayed_groups": torch.tensor(self._replayed), "r3/stored": torch.tensor(float(len(self.buffer)))}

    def state_dict(self) -> dict[str, Any]:
        return {"buffer": self.buffer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.buffer.load_state_dict(state.get("buffer", {}))


def _stored_rows(stored: list[dict], groups: Groups, targets: torch.Tensor, layer: Any) -> Groups:
    """The stored trajectories as rows answering the same prompt as ``targets`` (their prompt ids reused)."""
    device = groups.rewards.device
    width = max(len(t["ids"]) for t in stored)
    ids = torch.full((len(stored), width), layer.pad_token_id, dtype=torch.long, device=device)
    logp = torch.zeros((len(stored), width), dtype=torch.float32, device=device)
    mask = torch.zeros((len(stored), width), dtype=torch.bool, device=device)
    for k, t in enumerate(stored):
        n = len(t["ids"])
        ids[k, :n], logp[k, :n], mask[k, :n] = torch.tensor(t["ids"]), torch.tensor(t["logprobs"]), True
    src = groups.rollout.select(targets.to(device))
    rollout = RolloutBatch(src.prompt_ids, src.prompt_mask, ids, mask, logp,
                           torch.tensor([t["truncated"] for t in stored], device=device))
    rows = targets.tolist()
    return Groups(
        prompts=[], group_size=groups.group_size, rollout=rollout,
        row_prompts=[groups.row_prompts[r] for r in rows], completions=layer.decode(ids, mask),
        task_rewards=torch.tensor([t["task_reward"] for t in stored], device=device),
        rewards=torch.tensor([t["reward"] for t in stored], device=device),
        keep=torch.ones(len(stored), dtype=torch.bool, device=device),
        origin=torch.full((len(stored),), REPLAYED, dtype=torch.int8, device=device),
    )


class SageHints:
    """SAGE hinted rollouts (Liao et al., arXiv 2602.03143; official BaohaoLiao/SAGE ``recipe/hint``,
    ``method: sage``; methods.md §6.17, addendum §3.2).

    As the official on-policy "sage" method: a group none of whose rollouts is rewarded (no reward > 0) is
    regenerated with a level-1 hint in the prompt; the whole group is replaced by the hinted rollouts; a group
    still unrewarded is regenerated at level 2, then 3.  The update trains on log π(τ | x, hint) (the hint is
    part of the prompt the rows carry); evaluation never sees a hint.

    [INF] The hint.  SAGE has the policy write three levels of hints from a reference solution; a tiny
    arithmetic model cannot write one, so the task's reference answer supplies it: level k reveals the first
    k characters of the answer (never all of it), appended to the prompt as the beginning of the completion
    ("47+38=" → "47+38=8"), and the task scores hint + completion.  It is the same kind of privileged context
    (partial solution) the paper uses, made mechanical.  ``levels`` is the number of levels (3 as in SAGE).
    Metrics: ``sage/hinted_groups`` (fraction of groups regenerated), ``sage/rescued_groups`` (of those, rewarded
    after the hint).
    """

    moves_rows = True

    def __init__(self, levels: int = 3) -> None:
        if levels < 1:
            raise ValueError(f"levels must be >= 1, got {levels}.")
        self.levels = levels
        self._metrics: Metrics = {}

    @staticmethod
    def hint(prompt: Prompt, level: int) -> str | None:
        answer = prompt.answer
        return answer[:level] if 0 < level < len(answer) else None

    def augment(self, step: int, groups: Groups, layer: Any) -> Groups:
        g = groups.group_size
        solved = lambda i: bool((groups.task_rewards[i * g : (i + 1) * g] > 0).any())  # noqa: E731
        todo = [i for i in range(groups.num_groups) if not solved(i)]
        hinted: set[int] = set()
        for level in range(1, self.levels + 1):
            targets = [i for i in todo if not solved(i) and self.hint(groups.prompts[i], level) is not None]
            if not targets:
                continue
            originals = [groups.prompts[i] for i in targets]
            hints = [self.hint(p, level) for p in originals]
            prompts = [replace(p, text=p.text + h, meta={**p.meta, "sage_hint": h}) for p, h in zip(originals, hints)]
            rows = [p for p in prompts for _ in range(g)]
            rollout, completions = layer.generate_rows(step, _HINT_SALT + level, rows)
            scored = [hints[k // g] + c for k, c in enumerate(completions)]
            task_rewards = layer.score([p for p in originals for _ in range(g)], scored)
            new = Groups(prompts=originals, group_size=g, rollout=rollout, row_prompts=rows, completions=scored,
                         task_rewards=task_rewards, rewards=task_rewards.clone(),
                         keep=torch.ones(len(rows), dtype=torch.bool, device=task_rewards.device),
                         origin=torch.full((len(rows),), HINTED, dtype=torch.int8, device=task_rewards.device))
            new = layer.shape(step, new)
            groups = groups.replace_rows(groups.group_rows(targets), new, torch.arange(len(rows)), layer.pad_token_id)
            hinted.update(targets)
        n = max(groups.num_groups, 1)
        self._metrics = {
            "sage/hinted_groups": torch.tensor(len(hinted) / n),
            "sage/rescued_groups": torch.tensor(sum(solved(i) for i in hinted) / max(len(hinted), 1)),
        }
        return groups

    def observe(self, step: int, groups: Groups) -> None:
        pass

    def metrics(self) -> Metrics:
        return dict(self._metrics)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
