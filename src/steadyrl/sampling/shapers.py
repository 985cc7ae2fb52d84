"""Reward shapers (registry family ``reward_shaper``): change the rewards of a step's rows before filtering
and the advantage.  ``overlong_penalty`` is DAPO's soft length punishment; ``majority_vote`` is M-GRPO's
label-free reward (a pseudo-label voted by the policy and a slow momentum copy of it).
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import replace
from typing import Any

import torch

from steadyrl.ops.sampling import overlong_penalty
from steadyrl.sampling.base import extract_answer
from steadyrl.sampling.groups import POLICY, Groups
from steadyrl.types import Metrics

_MOMENTUM_SALT = 500_009


class OverlongPenalty:
    """DAPO soft overlong punishment (``ops.sampling.overlong_penalty``; verl ``DAPORewardManager``): adds
    min(−(|y| − (L_max − L_cache))/L_cache · ``factor``, 0) to every reward.  L_cache = ``buffer_len``;
    L_max = ``max_len`` or, when 0, the run's ``rollout.max_new_tokens`` (DAPO: L_cache 4096 of L_max 20480).  DAPO's overlong *filtering* (truncated
    completions out of the loss) is ``rollout.mask_truncated: true``.  Adds ``overlong/penalised_frac``."""

    def __init__(self, buffer_len: int = 4096, factor: float = 1.0, max_len: int = 0, max_new_tokens: int = 0) -> None:
        self.max_len = max_len or max_new_tokens
        overlong_penalty(torch.zeros(1), max_len=self.max_len, buffer_len=buffer_len, factor=factor)  # validate now
        self.buffer_len, self.factor = buffer_len, factor
        self._frac = torch.tensor(0.0)

    def shape(self, step: int, groups: Groups, layer: Any) -> Groups:
        penalty = overlong_penalty(groups.lengths, max_len=self.max_len, buffer_len=self.buffer_len, factor=self.factor)
        self._frac = (penalty < 0).float().mean()
        return replace(groups, rewards=groups.rewards + penalty.to(groups.rewards))

    def metrics(self) -> Metrics:
        return {"overlong/penalised_frac": self._frac}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class MajorityVote:
    """M-GRPO's momentum-anchored pseudo-label (arXiv 2512.13070, official baibizhe/M_GRPO; methods.md §6.11,
    addendum §3.2).  The gold answer is never read for the reward: labels are withheld.

        momentum   θ_k ← m·θ_k + (1 − m)·θ_q after every policy update (m = ``momentum``, 0.99 in the code)
        vote       per prompt, the answers of the G policy rollouts and of ``momentum_samples`` rollouts of the
                   momentum policy; label = the most frequent answer when it holds ≥ ``threshold`` of the
                   parsable answers (0.5, the code's ``self_consistency_threshold``), else no label
        reward     R_i = task.reward(prompt with answer := label, y_i) for the policy rollouts; 0 without a
                   label (the code's choice); the momentum rollouts are only voters, never trained on

    From the code: the EMA (``update_momentum_rollout(m=0.99)`` after each actor update), the vote threshold
    and the 0 reward of unlabelled prompts.  [INF] The co-sampling: the stored code has the momentum rollouts
    commented out (``n_actor = n_total``); the paper's M + N pool is implemented, with N =
    ``momentum_samples`` (the commented code tried G/4 and G/2).  Ties go to the answer seen first.  The EMA
    runs at the start of the next step's collection (the policy has not moved in between).  Answers come from
    ``task.extract_answer`` or the first word of the completion.  Not reproduced: the code also drops the KL term
of unlabelled prompts; steadyrl's KL penalty applies to every completion in the loss.  Diagnostics that do read the gold answer:
    ``mgrpo/label_accuracy`` (labels equal to it), ``mgrpo/labelled_frac``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        task: Any,
        backend_spec: Any,
        momentum: float = 0.99,
        momentum_samples: int = 4,
        threshold: float = 0.5,
    ) -> None:
        if not 0 <= momentum <= 1 or momentum_samples < 0 or not 0 < threshold <= 1:
            raise ValueError("majority_vote needs 0 <= momentum <= 1, momentum_samples >= 0 and 0 < threshold <= 1.")
        from steadyrl import registry  # the registry imports this module

        self.policy, self.task = model, task
        self.momentum, self.samples, self.threshold = momentum, momentum_samples, threshold
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.backend = registry.build_backend(backend_spec, self.model, tokenizer) if momentum_samples else None
        self.last_step: int | None = None
        self._metrics: Metrics = {}

    @torch.no_grad()
    def _ema(self) -> None:
        for p_k, p_q in zip(self.model.parameters(), self.policy.parameters()):
            p_k.mul_(self.momentum).add_(p_q.detach().to(p_k.dtype), alpha=1.0 - self.momentum)

    def shape(self, step: int, groups: Groups, layer: Any) -> Groups:
        if self.last_step is not None and step > self.last_step:
            self._ema()
        self.last_step = step
        g, voters = groups.group_size, [[] for _ in groups.prompts]
        for i in range(groups.num_groups):
            voters[i] = [extract_answer(self.task, c) for c in groups.completions[i * g : (i + 1) * g]]
        if self.samples:
            rows = [p for p in groups.prompts for _ in range(self.samples)]
            _, completions = layer.generate_rows(step, _MOMENTUM_SALT, rows, backend=self.backend)
            for k, c in enumerate(completions):
                voters[k // self.samples].append(extract_answer(self.task, c))
        rewards, labelled, correct = groups.rewards.clone(), 0, 0
        for i, prompt in enumerate(groups.prompts):
            answers = [a for a in voters[i] if a]
            label = None
            if answers:
                top, count = Counter(answers).most_common(1)[0]
                label = top if count / len(answers) >= self.threshold else None
            labelled += label is not None
            correct += label is not None and label == prompt.answer
            pseudo = replace(prompt, answer=label) if label is not None else None
            for r in range(i * g, (i + 1) * g):
                if groups.origin[r] == POLICY and rewards[r] == rewards[r]:
                    rewards[r] = float(self.task.reward(pseudo, groups.completions[r])) if pseudo else 0.0
        n = max(groups.num_groups, 1)
        self._metrics = {"mgrpo/labelled_frac": torch.tensor(labelled / n),
                         "mgrpo/label_accuracy": torch.tensor(correct / max(labelled, 1))}
        return replace(groups, rewards=rewards)

    def metrics(self) -> Metrics:
        return dict(self._metrics)

    def state_dict(self) -> dict[str, Any]:
        return {"momentum_model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
                "last_step": self.last_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "momentum_model" in state:
            self.model.load_state_dict(state["momentum_model"])
            self.last_step = state.get("last_step")
