"""The update stage: how a micro-batch's terms are composed (hand-computed), the normaliser decision, and
the updater's gradient against the same composition written out from the ops.

    .venv/bin/python -m pytest -q tests/train/test_update.py
"""

from __future__ import annotations

import math

import pytest
import torch

from sevens_task import SevensTask
from steadyrl.ops import aggregation, correction, kl, losses
from steadyrl.ops.aggregation import global_counts
from steadyrl.stabilisers.filters import FilterResult, TokenFilter
from steadyrl.train.forward import policy_forward
from steadyrl.train.trainer import Trainer
from steadyrl.train.update import micro_batch_terms, normaliser_scale
from steadyrl.types import GlobalCounts, LossInputs

LN = math.log


class RejectAndWeigh(TokenFilter):
    """A filter that rejects given tokens and reweights others: the composition rules, without CAPO's maths."""

    def __init__(self, keep: torch.Tensor, weights: torch.Tensor, penalty: torch.Tensor | None = None) -> None:
        super().__init__(model=None)
        self.keep, self.weights, self.penalty = keep, weights, penalty

    def __call__(self, inputs, hidden, lr):
        return FilterResult(self.keep, self.weights, self.penalty, {"test/filter_calls": torch.tensor(1.0)})


def _two_sequences() -> LossInputs:
    """A: 3 tokens, Â = +1; B: 2 tokens + padding, Â = −1; on-policy (π_old = π_θ)."""
    nan = float("nan")
    logprobs = torch.tensor([[LN(0.5), LN(0.25), LN(0.5)], [LN(0.5), LN(0.8), nan]], dtype=torch.float64)
    logprobs.requires_grad_(True)
    return LossInputs(
        logprobs=logprobs,
        old_logprobs=logprobs.detach(),
        advantages=torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, nan]], dtype=torch.float64),
        response_mask=torch.tensor([[True, True, True], [True, True, False]]),
        # μ = π_θ except B's first token, which the sampler drew at 0.1: ρ = π_old/μ = 5 there
        rollout_logprobs=torch.tensor([[LN(0.5), LN(0.25), LN(0.5)], [LN(0.1), LN(0.8), nan]], dtype=torch.float64),
        ref_logprobs=torch.tensor([[LN(0.5), LN(0.5), LN(0.5)], [LN(0.5), LN(0.5), nan]], dtype=torch.float64),
    )


def test_micro_batch_terms_by_hand():
    inputs = _two_sequences()
    # The filter rejects A's last token and doubles the weight of A's first.
    f = RejectAndWeigh(
        keep=torch.tensor([[True, True, False], [True, True, True]]),
        weights=torch.tensor([[2.0, 1.0, 1.0], [1.0, 1.0, 1.0]], dtype=torch.float64),
    )
    counts = GlobalCounts(num_tokens=3.0, num_seqs=2.0, max_len=3.0)  # the step's final counts (see below)
    out = micro_batch_terms(
        inputs, loss=losses.reinforce_loss, aggregation=aggregation.token_mean, counts=counts,
        correction=correction.token_mis,  # band [0.5, 2]: rejects B's first token (ρ = 5)
        token_filters=[f], kl=kl.kl_k1, kl_coef=0.1,
    )
    # mask = response ∧ correction ∧ filter = A: [1, 1, 0], B: [0, 1, 0]  → 3 counted tokens
    assert out.mask.tolist() == [[True, True, False], [False, True, False]]
    # ℓ = −Â·log π · w:  A0: −ln 0.5 · 2 = 1.386294;  A1: −ln 0.25 = 1.386294;  B1: +ln 0.8 = −0.223144
    # policy = Σ / 3 = 2.549445 / 3 = 0.849815
    assert out.terms["policy"].item() == pytest.approx((2 * -LN(0.5) - LN(0.25) + LN(0.8)) / 3)
    # kl = β Σ_mask k1 / 3, k1 = log π − log π_ref:  A0: 0;  A1: ln 0.5;  B1: ln 1.6   → 0.1·(−0.223144)/3
    assert out.terms["kl"].item() == pytest.approx(0.1 * (LN(0.5) + LN(1.6)) / 3)
    (grad,) = torch.autograd.grad(out.terms["policy"] + out.terms["kl"], inputs.logprobs)
    # ∂/∂log π_t = (−Â·w + β) / 3 on counted tokens, 0 elsewhere (rejected, padding)
    expected = [[(-2 + 0.1) / 3, (-1 + 0.1) / 3, 0.0], [0.0, (1 + 0.1) / 3, 0.0]]
    torch.testing.assert_close(grad, torch.tensor(expected, dtype=torch.float64))
    assert out.metrics["test/filter_calls"] == 1.0 and "mismatch/masked_frac" in out.metrics


def test_a_penalty_counts_every_unfiltered_token():
    inputs = _two_sequences()
    penalty = torch.full((2, 3), 0.5, dtype=torch.float64)
    f = RejectAndWeigh(torch.tensor([[True, True, False], [True, True, True]]), torch.ones(2, 3, dtype=torch.float64), penalty)
    out = micro_batch_terms(
        inputs, loss=losses.reinforce_loss, aggregation=aggregation.token_mean,
        counts=GlobalCounts(num_tokens=5.0, num_seqs=2.0), token_filters=[f],
    )
    # the penalty covers the pre-filter mask (A0, A1, A2, B0, B1), so A2 is counted again and carries only 0.5
    assert out.mask.tolist() == [[True, True, True], [True, True, False]]
    expected = (-LN(0.5) - LN(0.25) + LN(0.5) + LN(0.8) + 5 * 0.5) / 5
    assert out.terms["policy"].item() == pytest.approx(expected)


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "constant_norm"])
def test_normaliser_scale_converts_between_counts(mode):
    fn = getattr(aggregation, mode)
    before = GlobalCounts(torch.tensor(10.0, dtype=torch.float64), torch.tensor(4.0, dtype=torch.float64), 8.0)
    after = GlobalCounts(torch.tensor(6.0, dtype=torch.float64), torch.tensor(3.0, dtype=torch.float64), 8.0)
    loss = torch.randn(4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    mask = torch.rand(4, 8, generator=torch.Generator().manual_seed(1)) < 0.7
    scaled = fn(loss, mask, before) * normaliser_scale(fn, before, after)
    torch.testing.assert_close(scaled, fn(loss, mask, after))


# ----------------------------------------------------------------------------- the updater on a real batch


def _trainer_and_batch(tiny_config, *overrides):
    cfg = tiny_config("rollout.prompts_per_step=2", "rollout.group_size=2", "optim.grad_clip=0", *overrides)
    trainer = Trainer(cfg, task=SevensTask())
    trainer.updater.optimizer = torch.optim.SGD(trainer.updater.params, lr=1.0)  # Δθ = −gradient
    trainer.updater.scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.updater.optimizer, lambda i: 1.0)
    batch = trainer.collector.collect(1).batch
    trainer.scorer.score(batch)
    # advantages with signal whatever the rewards were (a tiny random policy often ties a group of two)
    signs = torch.tensor([1.0, -1.0, 0.5, -0.5])[:, None].expand_as(batch.advantages)
    batch.advantages = torch.where(batch.rollout.response_mask, signs, 0.0)
    return trainer, batch


def _step(trainer, batch) -> list[torch.Tensor]:
    before = [p.detach().clone() for p in trainer.updater.params]
    trainer.updater.update(batch)
    return [p.detach() - b for p, b in zip(trainer.updater.params, before)]


def test_a_sequence_rejected_by_a_correction_leaves_the_normaliser(tiny_config):
    trainer, batch = _trainer_and_batch(
        tiny_config, "correction={name: seq_mis, ratio_min: 0.5, ratio_max: 2.0}",
        "aggregation=seq_mean_token_mean", "optim.micro_batch_size=1",
    )
    # The sampler "drew" sequence 1 at e⁻² of π_θ's probability per token: ρ = e² each, Π ρ ≫ 2, rejected.
    with torch.no_grad():
        logprobs = policy_forward(trainer.model, batch.rollout).logprobs
    mu = logprobs.clone()
    mu[1] = logprobs[1] - 2.0
    batch.rollout.rollout_logprobs = torch.where(batch.rollout.response_mask, mu, torch.zeros_like(mu))
    state = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    delta = _step(trainer, batch)

    # The same composition written out from the ops: rejected sequence out of the mask and of the count.
    trainer.model.load_state_dict(state)
    trainer.model.zero_grad(set_to_none=True)
    fwd = policy_forward(trainer.model, batch.rollout)
    inputs = batch.loss_inputs(fwd)
    corr = correction.seq_mis(inputs)
    mask = inputs.response_mask & corr.mask
    counts = global_counts(mask, batch.rollout.completion_ids.shape[1])
    assert counts.num_seqs.item() == 3.0  # of 4 sampled sequences (the trainer used to count 4)
    loss = losses.ppo_clip_loss(inputs).loss * corr.weights
    aggregation.seq_mean_token_mean(torch.where(mask, loss, 0.0), mask, counts).backward()
    for d, p in zip(delta, trainer.updater.params):
        torch.testing.assert_close(d, -p.grad, rtol=1e-5, atol=1e-7)
    # ... and the old count (every sampled sequence) gives a different update: the test can fail.
    flat = lambda ts: torch.cat([t.reshape(-1) for t in ts])  # noqa: E731
    old_count = flat(p_grad_with_count(trainer, batch, state, 4.0))
    assert not torch.allclose(flat(delta), -old_count, rtol=1e-3, atol=1e-9)


def p_grad_with_count(trainer, batch, state, num_seqs: float) -> list[torch.Tensor]:
    trainer.model.load_state_dict(state)
    trainer.model.zero_grad(set_to_none=True)
    inputs = batch.loss_inputs(policy_forward(trainer.model, batch.rollout))
    corr = correction.seq_mis(inputs)
    mask = inputs.response_mask & corr.mask
    counts = GlobalCounts(num_tokens=mask.sum().double(), num_seqs=num_seqs)
    loss = losses.ppo_clip_loss(inputs).loss * corr.weights
    aggregation.seq_mean_token_mean(torch.where(mask, loss, 0.0), mask, counts).backward()
    return [p.grad.clone() for p in trainer.updater.params]


@pytest.mark.parametrize("micro", [1, 3])
def test_the_update_does_not_depend_on_the_micro_batch_split_with_rejections(tiny_config, micro):
    # A token-level correction whose rejections are known only after each micro-batch's forward.
    trainer, batch = _trainer_and_batch(tiny_config, "correction={name: token_mis, ratio_min: 0.9, ratio_max: 1.1}")
    with torch.no_grad():
        logprobs = policy_forward(trainer.model, batch.rollout).logprobs
    noise = 0.3 * torch.randn(logprobs.shape, generator=torch.Generator().manual_seed(3))
    batch.rollout.rollout_logprobs = torch.where(batch.rollout.response_mask, logprobs + noise, 0.0)
    state = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    whole = _step(trainer, batch)
    trainer.model.load_state_dict(state)
    trainer.updater.settings = type(trainer.updater.settings)(**{**vars(trainer.updater.settings), "micro_batch_size": micro})
    split = _step(trainer, batch)
    for a, b in zip(whole, split):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
