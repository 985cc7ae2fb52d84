"""Retention: how much of what the model knew before RL it still knows, and an SFT loss that keeps it.

PCR (arXiv 2602.06453, methods.md §2) frames RL post-training as plasticity (the reward) against stability.
The paper's stability term is the KL penalty and general capability is only *measured*; methods.md notes
that a framework should let the stability term be any auxiliary loss, e.g. SFT on a retention set [INF].
The lab's embedded model is warm-started on addition (which RL trains) and subtraction (which RL never
trains), so subtraction is the natural retention set.

* :class:`RetentionLoss` is an auxiliary term for ``PolicyUpdater(aux_terms=[...])``: the token-mean NLL
  of a fresh batch of correct demonstrations per optimizer step, weighted by ``coef``, named ``"retention"``
  (a stability term for the conflict combiners, an ordinary added loss for ``sum``).
* :func:`retention_metrics` measures ``retention/nll`` (held-out demonstrations) and ``retention/accuracy``
  (greedy, through ``steadyrl.evaluate``).
* :func:`build_retention` makes both from a ``TrainConfig`` for the trainer.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from steadyrl.config import TrainConfig
from steadyrl.evaluate import evaluate
from steadyrl.rollout.base import RolloutBackend, SamplingParams
from steadyrl.rollout.hf import HFRolloutBackend
from steadyrl.runtime.distributed import DistInfo, all_reduce_
from steadyrl.runtime.seeding import step_seed
from steadyrl.tasks import Prompt, Task
from steadyrl.tasks.demonstrations import demonstration_batch

_RETENTION_SALT = 7_727


def demonstration_nll(
    model: torch.nn.Module,
    input_ids: Tensor,  # (b, L) long, right-padded
    attention_mask: Tensor,  # (b, L)
    labels: Tensor,  # (b, L) long, -100 = no loss (prompt, padding)
    autocast_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:  # ((), ()) Σ NLL over labelled tokens (≥ fp32), number of labelled tokens
    """Summed next-token NLL of the labelled tokens (completion + EOS), and their count."""
    autocast = (
        torch.autocast(device_type=input_ids.device.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    with autocast:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    targets = labels[:, 1:]
    logits = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))  # at least fp32
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum")
    return nll, (targets != -100).sum()


class RetentionLoss:
    """Auxiliary term ``fn(micro_index, num_micro) -> {"retention": share}`` for ``PolicyUpdater``.

    Per optimizer step a batch of ``batch_size`` demonstrations is drawn from the task's train split, seeded
    by the step (``step_fn()``, e.g. the scheduler's step count, so a resumed run draws what the straight run
    drew). Every rank draws the same batch and keeps rows rank, rank + W, ...; its rows are split into
    ``num_micro`` contiguous chunks, and micro-batch j returns

        coef · Σ_{labelled tokens of chunk j} NLL / N,   N = labelled tokens of the whole batch,

    so the shares summed over micro-batches and ranks are coef × the batch's token-mean NLL. [INF] Splitting
    the batch (instead of returning the whole batch's loss / num_micro from every micro-batch) costs one
    forward of the batch per step, not one per micro-batch, and gives PCR J distinct stability samples, so
    σ²_sta is a real spread; with the whole batch each time every sample would be equal and σ²_sta = 0.
    A micro-batch whose chunk is empty (batch_size / W < num_micro) contributes a constant 0.

    Demonstrations come from ``task.demonstration``: configure the retention task with correct ones
    (arithmetic's default ``demo_error_rate=0``).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        task: Task,
        *,
        batch_size: int = 32,
        coef: float = 1.0,
        seed: int = 0,
        step_fn: Callable[[], int] | None = None,
        rank: int = 0,
        world_size: int = 1,
        autocast_dtype: torch.dtype | None = None,
        name: str = "retention",
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"retention batch_size must be at least 1, got {batch_size}.")
        self.model, self.tokenizer, self.task = model, tokenizer, task
        self.batch_size, self.coef, self.seed = batch_size, float(coef), seed
        self.rank, self.world_size = rank, world_size
        self.autocast_dtype = autocast_dtype
        self.name = name
        self._calls = 0
        self.step_fn = step_fn if step_fn is not None else self._count_steps
        self._step: int | None = None
        self._batch: tuple[Tensor, Tensor, Tensor] | None = None
        self._num_tokens: Tensor | None = None

    def _count_steps(self) -> int:
        return self._calls

    def _draw(self, step: int) -> None:
        device = next(self.model.parameters()).device
        seed = step_seed(self.seed, step, _RETENTION_SALT)
        prompts = self.task.sample("train", self.batch_size, seed=seed)
        ids, mask, labels = demonstration_batch(self.task, self.tokenizer, prompts, random.Random(seed), device)
        self._num_tokens = (labels[:, 1:] != -100).sum().clamp(min=1)  # the whole batch: every rank's normaliser
        rows = torch.arange(self.rank, ids.shape[0], self.world_size, device=device)
        self._batch = (ids[rows], mask[rows], labels[rows])
        self._step = step

    def __call__(self, micro_index: int, num_micro: int) -> dict[str, Tensor]:
        step = self.step_fn()
        if self._batch is None or step != self._step:
            self._draw(step)
        if micro_index == num_micro - 1:
            self._calls += 1
        ids, mask, labels = self._batch
        chunk = torch.arange(ids.shape[0], device=ids.device).tensor_split(num_micro)[micro_index]
        if chunk.numel() == 0:
            return {self.name: torch.zeros((), device=ids.device)}
        nll, _ = demonstration_nll(self.model, ids[chunk], mask[chunk], labels[chunk], self.autocast_dtype)
        return {self.name: self.coef * nll / self._num_tokens}


@torch.no_grad()
def retention_metrics(
    model: torch.nn.Module,
    tokenizer,
    task: Task,
    prompts: list[Prompt],
    *,
    backend: RolloutBackend | None = None,
    max_new_tokens: int | None = None,
    batch_size: int = 64,
    seed: int = 0,
    info: DistInfo | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """``retention/nll``: token-mean NLL of ``prompts``' demonstrations (completion + EOS) under ``model``;
    ``retention/accuracy``: greedy exact-answer accuracy (``steadyrl.evaluate``).

    Ranks split the prompts (r, r + W, ...) and sum their counts. ``backend`` defaults to an HF backend on
    ``model``; ``max_new_tokens`` defaults to the longest demonstration + 2 tokens.
    """
    info = info or DistInfo()
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        sums = torch.zeros(2, dtype=torch.float64, device=device)  # Σ NLL, labelled tokens
        mine = prompts[info.rank :: info.world_size]
        for i in range(0, len(mine), batch_size):
            ids, mask, labels = demonstration_batch(task, tokenizer, mine[i : i + batch_size], random.Random(seed), device)
            nll, count = demonstration_nll(model, ids, mask, labels, autocast_dtype)
            sums += torch.stack([nll.double(), count.double()])
    finally:
        model.train(was_training)
    if info.enabled:
        sums = all_reduce_(sums, "sum")
    if max_new_tokens is None:
        rng = random.Random(seed)
        longest = max(len(tokenizer(task.demonstration(p, rng), add_special_tokens=False)["input_ids"]) for p in prompts)
        max_new_tokens = longest + 2
    if backend is None:
        backend = HFRolloutBackend(model, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    accuracy = evaluate(
        backend,
        tokenizer,
        task,
        prompts,
        sampling=SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0),
        pass_k=0,
        greedy=True,
        seed=seed,
        info=info,
        device=device,
    )
    nll_sum, count = sums.tolist()
    return {"retention/nll": nll_sum / max(count, 1.0), "retention/accuracy": accuracy["eval/accuracy"]}


class Retention:
    """The trainer's handle on a retention set: the auxiliary loss (coef > 0) and the eval-time measure."""

    def __init__(self, cfg: TrainConfig, model: torch.nn.Module, tokenizer, task: Task, *, info: DistInfo, step_fn=None) -> None:
        rc = cfg.retention
        self.cfg, self.model, self.tokenizer, self.info = cfg, model, tokenizer, info
        self.task = task
        prompts = self.task.eval_prompts()
        self.prompts = prompts[: rc.eval_prompts] if rc.eval_prompts else prompts
        self.max_new_tokens = rc.max_new_tokens or cfg.rollout.max_new_tokens
        self.autocast_dtype = torch.bfloat16 if cfg.model.autocast_bf16 else None
        self.loss = None
        if rc.coef > 0:
            self.loss = RetentionLoss(
                model,
                tokenizer,
                self.task,
                batch_size=rc.batch_size,
                coef=rc.coef,
                seed=cfg.run.seed,
                step_fn=step_fn,
                rank=info.rank,
                world_size=info.world_size,
                autocast_dtype=self.autocast_dtype,
            )

    @property
    def aux_terms(self) -> list[RetentionLoss]:
        return [self.loss] if self.loss is not None else []

    def measure(self, backend: RolloutBackend | None, seed: int = 0) -> dict[str, float]:
        return retention_metrics(
            self.model,
            self.tokenizer,
            self.task,
            self.prompts,
            backend=backend,
            max_new_tokens=self.max_new_tokens,
            seed=seed,
            info=self.info,
            autocast_dtype=self.autocast_dtype,
        )


def build_retention(
    cfg: TrainConfig, model: torch.nn.Module, tokenizer, task: Task | None, *, info: DistInfo, step_fn=None
) -> Retention | None:
    """The run's :class:`Retention` on ``task`` (built from ``cfg.retention.task``), or None when the config has
    no ``retention`` section."""
    return Retention(cfg, model, tokenizer, task, info=info, step_fn=step_fn) if cfg.retention is not None else None
