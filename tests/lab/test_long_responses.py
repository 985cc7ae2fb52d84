"""The lab's length axis on known cases: gradient fidelity with completions of up to 6 tokens (127 per prompt,
enumerated whole), the enumeration's row cap, and the setup row's policy-weighted length.

Run: .venv/bin/python -m pytest -q tests/lab/test_long_responses.py
"""

from __future__ import annotations

import math

import pytest
import torch

from lab_models import EOS, PAD, all_completions, brute_distribution, tiny_lm, without_pad
from steadyrl.lab import fidelity as F
from steadyrl.lab.context import build_updater, method_config
from steadyrl.lab.enumeration import enumerate_completions
from steadyrl.lab.formulation import AGGREGATIONS, METHODS, FormulationLab
from steadyrl.lab.trainer_adapter import training_gradient

VOCAB, MAX_NEW, G = 4, 6, 4
PROMPTS = [[2, 3], [3, 2, 2]]


@pytest.fixture(scope="module")
def setup():
    policy = without_pad(tiny_lm(VOCAB, seed=3))
    with torch.no_grad():  # make EOS rarer so that long completions carry real mass
        policy.get_output_embeddings().bias[EOS] = -1.0
    enum = enumerate_completions([policy], PROMPTS, eos_id=EOS, pad_id=PAD, max_new_tokens=MAX_NEW, mass=1.0)
    # 1 + 2 + 4 + 8 + 16 (EOS-terminated, lengths 1-5) + 2^5 · 3 (length 6, any last token) = 127 per prompt
    assert len(all_completions(VOCAB, MAX_NEW)) == 127 and enum.num_rows == 2 * 127
    rewards = (enum.completion_ids[:, 0] == 2).float()  # binary: "the first token is 2"
    return policy, enum, rewards


@pytest.mark.parametrize("method", ["none", "tis"])
def test_on_policy_gradient_is_the_true_gradient_with_long_completions(setup, method):
    # N = 1, μ = π_old = π_θ, sum aggregation: E[g] = ((G−1)/G) ∇J whatever the length (token IS weights are 1).
    policy, enum, rewards = setup
    mu = F.sampler_token_logprobs(policy, enum)
    spec = METHODS[method]
    cfg = method_config(loss=spec["loss"], aggregation=AGGREGATIONS["sum"], correction=spec.get("correction"),
                        max_new_tokens=MAX_NEW)
    grad_j, J, mass = F.true_gradient(policy, enum, rewards)
    assert torch.allclose(mass, torch.ones(2, dtype=torch.float64), atol=1e-9) and 0 < J < 1
    g = -training_gradient(build_updater(policy, cfg), F.expected_batch(enum, rewards, mu, None, G), num_seqs=2, lr=1e-3)
    result = F.compare(g, grad_j, F.reference_scale(enum, mu, G, False))
    assert result["cos"] == pytest.approx(1.0, abs=1e-6) and result["rel_err"] < 1e-4


def test_row_cap_keeps_the_most_probable_completions_and_reports_the_missing_mass(setup):
    policy, _, _ = setup
    capped = enumerate_completions([policy], PROMPTS, eos_id=EOS, pad_id=PAD, max_new_tokens=MAX_NEW, mass=0.999, max_rows=10)
    for p, prompt in enumerate(PROMPTS):
        truth = brute_distribution(policy, prompt, VOCAB, MAX_NEW)
        top = sorted(truth.values(), reverse=True)[:10]
        assert int((capped.prompt_index == p).sum()) == 10
        assert capped.mass_of(0)[p].item() == pytest.approx(sum(top), abs=1e-6)  # the cap's floor: 1 − this
        assert capped.mass_of(0)[p].item() < 0.999


def test_setup_rows_policy_weighted_length_and_truncation(setup):
    policy, enum, _ = setup
    lab = FormulationLab.__new__(FormulationLab)  # only the pieces _policy_mean reads
    lab.enum, lab.old_lp = enum, F.trainer_token_logprobs(policy, enum)
    expected_len, expected_trunc = 0.0, 0.0
    for prompt in PROMPTS:  # E_π[|y|] and P_π(no EOS within 6 tokens) by brute force, averaged over prompts
        truth = brute_distribution(policy, prompt, VOCAB, MAX_NEW)
        total = sum(truth.values())
        expected_len += sum(q * len(c) for c, q in truth.items()) / total / len(PROMPTS)
        expected_trunc += sum(q for c, q in truth.items() if c[-1] != EOS) / total / len(PROMPTS)
    assert lab._policy_mean(enum.response_mask.sum(1).double()) == pytest.approx(expected_len, rel=1e-5)
    assert lab._policy_mean(enum.truncated.double()) == pytest.approx(expected_trunc, rel=1e-5)
    assert 2.0 < expected_len < MAX_NEW and not math.isclose(expected_trunc, 0.0)
