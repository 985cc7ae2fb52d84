"""Gradient fidelity (lab/fidelity.py, lab/trainer_adapter.py) on a model whose response space is enumerated
whole: the exact expectation against every pair of sampled completions, the true gradient against a plain loop.

Run: .venv/bin/python -m pytest -q tests/lab/test_fidelity.py
"""

from __future__ import annotations

import copy
import dataclasses
import itertools

import pytest
import torch

from lab_models import EOS, PAD, tiny_lm, without_pad
from steadyrl import registry
from steadyrl.lab import fidelity as F
from steadyrl.lab.context import build_updater, method_config
from steadyrl.lab.enumeration import enumerate_completions
from steadyrl.lab.formulation import AGGREGATIONS, METHODS
from steadyrl.lab.trainer_adapter import optimizer_step, training_gradient
from steadyrl.ops.masking import masked_fill_zero
from steadyrl.rollout.base import left_pad, position_ids_from_mask
from steadyrl.train.batch import ScoredBatch

VOCAB, MAX_NEW, G = 5, 2, 2
PROMPTS = [[2, 3], [4, 2, 3]]


def _updater(model, method: str, agg: str = "sum"):
    spec = METHODS[method]
    cfg = method_config(loss=spec["loss"], aggregation=AGGREGATIONS[agg], correction=spec.get("correction"),
                        max_new_tokens=MAX_NEW)
    return build_updater(model, cfg)


@pytest.fixture(scope="module")
def setup():
    policy = without_pad(tiny_lm(VOCAB, seed=0))
    sampler = without_pad(tiny_lm(VOCAB, seed=0))
    with torch.no_grad():  # a mismatched sampler: the same model with a perturbed head
        sampler.get_output_embeddings().weight.add_(0.3 * torch.randn(VOCAB, 16, generator=torch.Generator().manual_seed(1)))
    enum = enumerate_completions([policy], PROMPTS, eos_id=EOS, pad_id=PAD, max_new_tokens=MAX_NEW, mass=1.0)
    assert enum.num_rows == 2 * 13 and torch.allclose(enum.mass_of(0), torch.ones(2, dtype=torch.float64), atol=1e-9)
    rewards = torch.zeros(enum.num_rows)
    rewards[[1, 4, 15, 20]] = 1.0  # an arbitrary binary reward, two right answers per prompt
    return policy, sampler, enum, rewards


def _stale(model):
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for i, p in enumerate(moved.parameters()):
            p.add_(0.15 * torch.randn(p.shape, generator=torch.Generator().manual_seed(10 + i)))
    return moved


def test_true_gradient_matches_a_plain_loop(setup):
    policy, _, enum, rewards = setup
    grad, J, mass = F.true_gradient(policy, enum, rewards)
    policy.zero_grad()
    total = torch.zeros(())
    for r in rewards.nonzero().squeeze(-1).tolist():  # J = (1/P) Σ_y R(y) Π_t π(y_t | ·), one sequence at a time
        prompt = PROMPTS[int(enum.prompt_index[r])]
        completion = enum.completion_ids[r, : int(enum.response_mask[r].sum())].tolist()
        ids, mask = left_pad([prompt + completion], PAD)
        logits = policy(input_ids=ids, attention_mask=mask.long(), position_ids=position_ids_from_mask(mask)).logits[0]
        lp = torch.log_softmax(logits, -1)
        total = total + torch.exp(sum(lp[len(prompt) - 1 + i, t] for i, t in enumerate(completion))) / len(PROMPTS)
    total.backward()
    ref = torch.cat([p.grad.reshape(-1) for p in policy.parameters()])
    policy.zero_grad()
    assert pytest.approx(float(total.detach()), rel=1e-5) == J
    assert torch.allclose(grad, ref, rtol=1e-4, atol=1e-7)
    assert torch.allclose(mass, torch.ones(2, dtype=torch.float64), atol=1e-9)


@pytest.mark.parametrize("agg", ["sum", "mean"])
def test_on_policy_fp32_training_gradient_is_the_true_gradient(setup, agg):
    # N = 1, μ = π_old = π_θ: E[g] = ((G−1)/G) ∇J exactly for the sum; the mean divides each sequence by its
    # length, which here is 1 or 2, so it is not ∇J's direction (the cosine stays below 1).
    policy, _, enum, rewards = setup
    mu = F.sampler_token_logprobs(policy, enum)
    grad_j, _, _ = F.true_gradient(policy, enum, rewards)
    g = -training_gradient(_updater(policy, "none", agg), F.expected_batch(enum, rewards, mu, None, G), num_seqs=2, lr=1e-3)
    result = F.compare(g, grad_j, F.reference_scale(enum, mu, G, agg == "mean"))
    if agg == "sum":
        assert result["cos"] == pytest.approx(1.0, abs=1e-6) and result["rel_err"] < 1e-4
    else:
        assert result["cos"] < 0.999


def _all_pairs_average(updater, enum, rewards, mu_lp, old_lp):
    """Σ over every group (y1, y2) of μ̃(y1) μ̃(y2) × the trainer's gradient on that sampled group, per prompt."""
    mu = F.conditional_probs(F.sequence_logprob(mu_lp, enum.response_mask), enum.prompt_index, enum.num_prompts)
    adv_fn = registry.resolve("advantage", "dr_grpo")
    total = None
    for p in range(enum.num_prompts):
        rows = (enum.prompt_index == p).nonzero().squeeze(-1).tolist()
        for i, j in itertools.product(rows, rows):
            index = torch.tensor([i, j])
            part = enum.select(index)
            adv = adv_fn(rewards[index], G)
            advantages = masked_fill_zero(adv.advantages[:, None].expand(2, MAX_NEW).clone(), part.response_mask)
            batch = ScoredBatch(part.rollout(mu_lp[index]), rewards[index], advantages, adv.sample_mask,
                                old_logprobs=None if old_lp is None else old_lp[index])
            g = training_gradient(updater, batch, num_seqs=2, lr=1e-3) * float(mu[i] * mu[j]) / enum.num_prompts
            total = g if total is None else total + g
    return total


@pytest.mark.parametrize(
    "method,agg,stale,mismatched",
    [("none", "sum", False, True), ("ppo_clip", "sum", True, False), ("minirl", "sum", True, True),
     ("tis", "mean", True, True), ("ppo_clip", "mean", True, True)],
)
def test_exact_expectation_equals_the_average_over_every_sampled_group(setup, method, agg, stale, mismatched):
    # The identity E[Â | y] = ((G−1)/G)(R(y) − p) with sign(Â) = sign(R − p) (binary reward) makes one loss on
    # the enumerated rows the expectation of the trainer's loss over sampled groups, masks and clips included.
    policy, sampler, enum, rewards = setup
    mu_lp = F.sampler_token_logprobs(sampler if mismatched else policy, enum)
    old_lp = F.trainer_token_logprobs(policy, enum) if stale else None
    model = _stale(policy) if stale else policy
    updater = _updater(model, method, agg)
    exact = training_gradient(updater, F.expected_batch(enum, rewards, mu_lp, old_lp, G), num_seqs=enum.num_prompts, lr=1e-3)
    average = _all_pairs_average(updater, enum, rewards, mu_lp, old_lp)
    assert torch.allclose(exact, average, rtol=1e-4, atol=1e-7)
    assert exact.norm() > 0


def test_at_n1_ppo_clip_is_none_and_minirl_is_tis(setup):
    policy, sampler, enum, rewards = setup
    batch = F.expected_batch(enum, rewards, F.sampler_token_logprobs(sampler, enum), None, G)
    grads = {m: training_gradient(_updater(policy, m), batch, num_seqs=2, lr=1e-3) for m in ("none", "ppo_clip", "tis", "minirl")}
    assert torch.allclose(grads["none"], grads["ppo_clip"], rtol=1e-6, atol=1e-9)
    assert torch.allclose(grads["tis"], grads["minirl"], rtol=1e-6, atol=1e-9)
    assert not torch.allclose(grads["none"], grads["tis"], rtol=1e-3)


def test_sequence_is_control_is_exact_under_mismatch(setup):
    policy, sampler, enum, rewards = setup
    mu = F.sampler_token_logprobs(sampler, enum)
    grad_j, _, _ = F.true_gradient(policy, enum, rewards)
    g = -training_gradient(_updater(policy, "seq_is"), F.expected_batch(enum, rewards, mu, None, G), num_seqs=2, lr=1e-3)
    # Σ μ̃ (π/μ̃')(R − p_μ) ∇log π = ∇J − p_μ ∇mass = ∇J (mass ≡ 1): exact up to fp32.
    assert F.compare(g, grad_j, (G - 1) / G)["rel_err"] < 1e-4


STEP_CASES = {
    # no in-loop rejection: the loss's own mask (MiniRL's staleness mask) keeps its tokens in the count
    "minirl": ({"loss": METHODS["minirl"]["loss"]}, "seq_mean_token_sum", False),
    # a correction that reweights and rejects nothing: the rescale is exactly 1
    "tis": ({"loss": "reinforce", "correction": METHODS["tis"]["correction"]}, "token_mean", False),
    # rejections leave the normaliser (docs/normalisation.md): the updater rescales its gradient by D(before)/D(after)
    "token_mis": ({"loss": "reinforce", "correction": {"name": "token_mis", "ratio_min": 0.8, "ratio_max": 1.25}},
                  "token_mean", True),
    "seq_mis": ({"loss": "reinforce", "correction": {"name": "seq_mis", "ratio_min": 0.8, "ratio_max": 1.25}},
                "seq_mean_token_mean", True),
}


@pytest.mark.parametrize("case", list(STEP_CASES))
def test_training_gradient_is_what_the_optimizer_steps_on(setup, case):
    policy, sampler, enum, rewards = setup
    method, agg, rejects = STEP_CASES[case]
    model = copy.deepcopy(policy)
    cfg = method_config(loss=method["loss"], aggregation=agg, correction=method.get("correction"), max_new_tokens=MAX_NEW)
    updater = build_updater(model, dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, grad_clip=0.0)))
    mu = F.sampler_token_logprobs(sampler, enum)  # mismatched, so that the corrections' bands reject something
    batch = F.expected_batch(enum, rewards, mu, F.trainer_token_logprobs(model, enum), G)
    expected = training_gradient(updater, batch, lr=1e-3)  # the trainer's own counts (num_seqs=None)
    seen = {}

    def grab(opt, args, kwargs):
        seen["g"] = torch.cat([p.grad.reshape(-1).clone() for p in model.parameters()])

    updater.optimizer.register_step_pre_hook(grab)
    metrics = optimizer_step(updater, batch)
    assert torch.allclose(seen["g"], expected, rtol=1e-5, atol=1e-9)
    # The case is what it says: the rejecting corrections did reject (so the rescale was exercised), the others not.
    assert (metrics.get("mismatch/masked_frac", 0.0) > 0) == rejects
    if rejects:  # and the exact expectation refuses a normaliser that is a ratio of sampled counts
        with pytest.raises(ValueError, match="leaves the normaliser|rejected tokens"):
            training_gradient(updater, batch, num_seqs=enum.num_prompts, lr=1e-3)


def test_compare_and_sequence_kl_by_hand():
    true = torch.tensor([1.0, 0.0])
    assert F.compare(torch.tensor([0.5, 0.0]), true, 0.5) == pytest.approx({"cos": 1.0, "rel_err": 0.0, "norm_ratio": 1.0})
    # g = (0, 1) against c∇J = (1, 0): cos 0, ‖g − c∇J‖ = √2, norm ratio 1
    assert F.compare(torch.tensor([0.0, 1.0]), true, 1.0) == pytest.approx({"cos": 0.0, "rel_err": 2**0.5, "norm_ratio": 1.0})
    # two rows of one prompt: π_old = (½, ½), π_new = (¼, ¾): KL = ½ ln 2 + ½ ln(2/3) = 0.143841
    from steadyrl.lab.enumeration import Enumerated

    enum = Enumerated(torch.tensor([0, 0]), torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1, dtype=torch.bool),
                      torch.ones(2, 1, dtype=torch.long), torch.ones(2, 1, dtype=torch.bool), torch.zeros(2, dtype=torch.bool),
                      torch.zeros(1, 2, dtype=torch.float64), 1)
    old = torch.log(torch.tensor([[0.5], [0.5]]))
    new = torch.log(torch.tensor([[0.25], [0.75]]))
    assert F.sequence_kl(old, new, enum) == pytest.approx(0.143841, abs=1e-6)
    assert F.sequence_kl(old, old, enum) == 0.0


def test_non_binary_reward_is_refused(setup):
    policy, _, enum, rewards = setup
    with pytest.raises(ValueError, match="binary"):
        F.expected_batch(enum, rewards * 0.5, F.sampler_token_logprobs(policy, enum), None, G)
