"""The entropy bonus and Skywork-OR1's adaptive coefficient (stabilisers/entropy.py): the differentiable entropy
of the chunked LM head, the controller by hand and against TRL 1.16's own ``_compute_loss``, the gradient the
trainer applies, and the state a checkpoint restores.

    .venv/bin/python -m pytest -q tests/train/test_entropy_bonus.py
"""

from __future__ import annotations

import math

import pytest
import torch

from extras import requires_extra
from framework_parity import TRLEntropyController
from sevens_task import SevensTask
from steadyrl.config import ConfigError, EntropyConfig
from steadyrl.ops.logprobs import logprobs_from_hidden
from steadyrl.stabilisers.entropy import EntropyBonus
from steadyrl.train.forward import model_inputs
from steadyrl.train.trainer import Trainer
from steadyrl.types import GlobalCounts


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_the_entropy_with_gradient_equals_the_full_softmax(chunk):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 4, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.randn(11, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    ids = torch.randint(0, 11, (3, 4), generator=gen)
    _, entropy = logprobs_from_hidden(hidden, weight, ids, temperature=0.7, chunk_size=chunk, compute_entropy=True, entropy_grad=True)
    assert entropy.requires_grad
    p = torch.softmax(hidden @ weight.T / 0.7, dim=-1)
    expected = -(p * p.log()).sum(-1)
    torch.testing.assert_close(entropy, expected, rtol=1e-12, atol=1e-12)
    upstream = torch.randn(3, 4, dtype=torch.float64, generator=gen)
    got = torch.autograd.grad((entropy * upstream).sum(), [hidden, weight])
    want = torch.autograd.grad((expected * upstream).sum(), [hidden, weight])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    _, detached = logprobs_from_hidden(hidden, weight, ids, temperature=0.7, chunk_size=chunk, compute_entropy=True)
    assert not detached.requires_grad


def _step(bonus: EntropyBonus, entropy: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, dict]:
    counts = GlobalCounts(num_tokens=mask.sum().double(), num_seqs=float(mask.shape[0]))
    term = bonus.term(entropy, mask, counts)
    return term, bonus.end_step(lambda x: x)


def test_the_adaptive_controller_by_hand():
    cfg = EntropyConfig(coef=0.01, adaptive=True, target=1.0, delta=0.005, coef_min=0.0, coef_max=0.012)
    bonus = EntropyBonus(cfg)
    mask = torch.tensor([[True, True, False], [True, False, False]])

    def entropies(a, b, c):  # the third token is masked: its value must not count
        return torch.tensor([[a, b, 99.0], [c, 99.0, 99.0]], dtype=torch.float64, requires_grad=True)

    # step 1: Ĥ_last = +inf > target → applied 0; measured (0.6 + 0.9 + 0.9)/3 = 0.8 ≤ 1 → c = min(0.015, 0.012)
    term, m = _step(bonus, entropies(0.6, 0.9, 0.9), mask)
    assert term.item() == 0.0 and m["entropy/applied_coef"].item() == 0.0
    assert m["entropy/measured"].item() == pytest.approx(0.8) and m["entropy/coef"].item() == pytest.approx(0.012)
    # step 2: Ĥ_last = 0.8 ≤ 1 → applied 0.012: term = −0.012·(1.2 + 1.5 + 1.8)/3 = −0.018; measured 1.5 → c = 0.007
    h = entropies(1.2, 1.5, 1.8)
    term, m = _step(bonus, h, mask)
    assert term.item() == pytest.approx(-0.018)
    grad = torch.autograd.grad(term, h)[0]
    torch.testing.assert_close(grad, torch.tensor([[-0.004, -0.004, 0.0], [-0.004, 0.0, 0.0]], dtype=torch.float64))
    assert m["entropy/coef"].item() == pytest.approx(0.007)
    # step 3: Ĥ_last = 1.5 > 1 → applied 0 although c = 0.007; measured 0.3 → c = 0.012 (clamped)
    term, m = _step(bonus, entropies(0.3, 0.3, 0.3), mask)
    assert term.item() == 0.0 and m["entropy/coef"].item() == pytest.approx(0.012)
    # state round trip
    state = bonus.state_dict()
    fresh = EntropyBonus(cfg)
    fresh.load_state_dict(state)
    assert fresh.coef.item() == pytest.approx(0.012) and fresh.last_entropy.item() == pytest.approx(0.3)


def test_a_fixed_coefficient_never_moves_and_applies_from_the_first_step():
    bonus = EntropyBonus(EntropyConfig(coef=0.1, target=0.0))
    mask = torch.ones(1, 2, dtype=torch.bool)
    term, m = _step(bonus, torch.tensor([[1.0, 3.0]]), mask)
    assert term.item() == pytest.approx(-0.2) and m["entropy/coef"].item() == pytest.approx(0.1)


def test_bad_settings_name_the_fix():
    with pytest.raises(ConfigError, match="coef_min <= coef_max"):
        EntropyBonus(EntropyConfig(adaptive=True, coef_min=0.5, coef_max=0.1))


@requires_extra("trl", "trl")
def test_the_bonus_and_controller_match_trl():
    settings = {"coef": 0.02, "target": 0.5, "delta": 0.01, "coef_min": 0.0, "coef_max": 0.035}
    trl = TRLEntropyController(adaptive=True, **settings)
    ours = EntropyBonus(EntropyConfig(adaptive=True, **settings))
    gen = torch.Generator().manual_seed(3)
    # two micro-batches of 2 × 5 tokens per optimizer step, each with 6 counted tokens (TRL's per-micro-batch
    # mean / accumulation equals the global mean when the counts are equal)
    masks = [torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]], dtype=torch.bool), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 0, 0]], dtype=torch.bool)]
    levels = [0.3, 0.4, 0.9, 0.2, 0.45, 0.7, 0.1]  # mean entropy per step: crosses the target both ways
    for level in levels:
        counts = GlobalCounts(num_tokens=sum(m.sum() for m in masks).double(), num_seqs=4.0)
        for j, mask in enumerate(masks):
            entropy = (level + 0.2 * torch.rand(2, 5, dtype=torch.float64, generator=gen) - 0.1).requires_grad_()
            logprobs = torch.zeros(2, 5, dtype=torch.float64, requires_grad=True)
            trl_loss = trl.loss(logprobs, entropy, mask, torch.zeros(2, dtype=torch.float64), accumulation=2, last=j == 1)
            trl_grad = torch.autograd.grad(trl_loss, entropy, allow_unused=True)[0]
            term = ours.term(entropy, mask, counts)
            our_grad = torch.autograd.grad(term, entropy)[0]
            torch.testing.assert_close(term, trl_loss, rtol=1e-6, atol=1e-12)  # TRL's policy term is 0 at Â = 0
            torch.testing.assert_close(our_grad, torch.zeros_like(our_grad) if trl_grad is None else trl_grad, rtol=1e-6, atol=1e-12)
        ours.end_step(lambda x: x)
        assert ours.coef.item() == pytest.approx(trl.stand_in.entropy_coef, rel=1e-9)
        assert ours.last_entropy.item() == pytest.approx(trl.stand_in._last_world_entropy, rel=1e-9)


def test_the_trainer_applies_the_gradient_of_minus_c_times_the_mean_entropy(tiny_config, monkeypatch):
    coef = 0.3
    trainer = Trainer(tiny_config(f"entropy.coef={coef}", "loss=reinforce", "optim.grad_clip=0"), task=SevensTask())
    batch = trainer.collector.collect(1).batch
    trainer.scorer.score(batch)
    batch.advantages = torch.zeros_like(batch.advantages)  # the policy term contributes no gradient
    model = trainer.model
    params = [p for p in model.parameters() if p.requires_grad]
    input_ids, attn, pos = model_inputs(batch.rollout)
    logits = model(input_ids=input_ids, attention_mask=attn, position_ids=pos).logits.float()
    log_p = torch.log_softmax(logits[:, batch.rollout.prompt_ids.shape[1] - 1 : -1], dim=-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    mask = batch.token_mask
    expected = torch.autograd.grad(-coef * entropy[mask].mean(), params, allow_unused=True)
    seen = {}

    def capture(lr_scale=None):
        seen["grads"] = [p.grad.clone() if p.grad is not None else None for p in params]
        trainer.optimizer.zero_grad(set_to_none=True)
        return torch.tensor(0.0), 0

    monkeypatch.setattr(trainer.updater, "_apply_gradient", capture)
    result = trainer.updater.update(batch)
    assert result.metrics["entropy/applied_coef"] == pytest.approx(coef)
    for got, want in zip(seen["grads"], expected):
        if want is None:
            continue
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)


def test_the_controller_state_is_training_state(tiny_config):
    trainer = Trainer(tiny_config("entropy.adaptive=true", "entropy.target=100.0", "entropy.coef=0.0"), task=SevensTask())
    trainer.train()
    state = trainer.training_state()["updater"].state_dict()["entropy_bonus"]
    assert state["coef"].item() == pytest.approx(0.01)  # two steps below the target: 0 + 2 · 0.005
    assert math.isfinite(state["last_entropy"].item())
    trainer.updater.load_state_dict({"entropy_bonus": {"coef": torch.tensor(0.5), "last_entropy": torch.tensor(1.0)}})
    assert trainer.updater.entropy_bonus.coef.item() == 0.5


def test_a_resumed_run_restores_the_controller(tiny_config):
    cfg = tiny_config("entropy.adaptive=true", "entropy.target=100.0", "checkpoint.every=1")
    first = Trainer(cfg, task=SevensTask())
    first.train(stop_after=1)
    assert first.updater.entropy_bonus.coef.item() == pytest.approx(0.005)
    second = Trainer(cfg, task=SevensTask())
    assert second.start_step == 1
    assert second.updater.entropy_bonus.coef.item() == pytest.approx(0.005)
    assert second.updater.entropy_bonus.last_entropy.item() == pytest.approx(first.updater.entropy_bonus.last_entropy.item())


def test_the_entropy_gradient_is_finite_on_a_truncated_support():
    """Scoring on the sampler's top-k support puts −∞ logits in the chunk: the entropy's gradient stays finite
    and equals the full softmax's over the kept entries."""
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 3, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.randn(9, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    ids = torch.zeros(2, 3, dtype=torch.long)
    _, entropy = logprobs_from_hidden(hidden, weight, ids, chunk_size=4, compute_entropy=True, entropy_grad=True, top_k=3)
    grads = torch.autograd.grad(entropy.sum(), [hidden, weight])
    assert all(torch.isfinite(g).all() for g in grads)
    logits = hidden @ weight.T
    kept = logits >= logits.topk(3, dim=-1).values[..., -1:]
    p = torch.softmax(logits.masked_fill(~kept, float("-inf")), dim=-1)
    expected = -(torch.where(kept, p * p.clamp_min(1e-300).log(), 0.0)).sum(-1)
    torch.testing.assert_close(entropy, expected, rtol=1e-10, atol=1e-12)
    want = torch.autograd.grad(expected.sum(), [hidden, weight])
    for a, b in zip(grads, want):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
