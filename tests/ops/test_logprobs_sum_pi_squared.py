"""Σ_v π_v² from the chunked LM head (the optimal token baseline's statistic): equals the full-softmax value,
and no (B·T, V) tensor is kept for backward with it switched on.

    .venv/bin/python -m pytest -q tests/ops/test_logprobs_sum_pi_squared.py
"""

from __future__ import annotations

import math

import pytest
import torch
from test_logprobs import SavedTensors, full_reference, make_problem

from steadyrl.ops.logprobs import logprobs_from_hidden


def full_sum_pi_squared(hidden, weight, bias, temperature):
    logits = hidden.double() @ weight.double().T
    if bias is not None:
        logits = logits + bias.double()
    return torch.softmax(logits / temperature, dim=-1).square().sum(-1)


@pytest.mark.parametrize("chunk", [1, 4, 7, 1024])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("bias", [False, True])
def test_sum_pi_squared_equals_the_full_softmax(chunk, temperature, bias):
    hidden, weight, b, ids = make_problem(chunk + 20, bias=bias)
    logprobs, entropy, token_logits, sum_sq = logprobs_from_hidden(
        hidden, weight, ids, lm_head_bias=b, temperature=temperature, chunk_size=chunk,
        compute_entropy=True, return_token_logits=True, compute_sum_pi_squared=True,
    )
    torch.testing.assert_close(sum_sq, full_sum_pi_squared(hidden, weight, b, temperature).detach(), rtol=1e-12, atol=1e-14)
    assert not sum_sq.requires_grad
    expected, expected_entropy = full_reference(hidden, weight, b, ids, temperature)
    torch.testing.assert_close(logprobs, expected, rtol=1e-12, atol=1e-12)  # the other outputs are unchanged
    torch.testing.assert_close(entropy, expected_entropy.detach(), rtol=1e-10, atol=1e-12)
    assert token_logits.shape == logprobs.shape


def test_sum_pi_squared_hand_values():
    # W = 0: π = 1/V → Σπ² = V · 1/V² = 1/V;  one dominant logit (+50): Σπ² → 1
    hidden = torch.randn(2, 3, 4, dtype=torch.float64)
    _, _, sum_sq = logprobs_from_hidden(hidden, torch.zeros(5, 4, dtype=torch.float64),
                                        torch.zeros(2, 3, dtype=torch.long), compute_sum_pi_squared=True)
    torch.testing.assert_close(sum_sq, torch.full((2, 3), 0.2, dtype=torch.float64))
    bias = torch.tensor([50.0, 0.0, 0.0], dtype=torch.float64)
    _, _, sum_sq = logprobs_from_hidden(hidden, torch.zeros(3, 4, dtype=torch.float64), torch.zeros(2, 3, dtype=torch.long),
                                        lm_head_bias=bias, compute_sum_pi_squared=True)
    assert torch.all((sum_sq - 1.0).abs() < 1e-20 + 4 * math.exp(-50))


def test_sum_pi_squared_order_and_no_grad_path():
    hidden, weight, _, ids = make_problem(3)
    logprobs, entropy, sum_sq = logprobs_from_hidden(hidden, weight, ids, chunk_size=4, compute_sum_pi_squared=True)
    assert entropy is None and sum_sq.shape == logprobs.shape
    with torch.no_grad():
        _, _, again = logprobs_from_hidden(hidden, weight, ids, chunk_size=4, compute_sum_pi_squared=True)
    torch.testing.assert_close(again, sum_sq)
    # gradients of the log-probs are those without the statistic
    plain, _ = logprobs_from_hidden(hidden, weight, ids, chunk_size=4)
    g1 = torch.autograd.grad(logprobs.sum(), [hidden, weight])
    g2 = torch.autograd.grad(plain.sum(), [hidden, weight])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("chunk", [1, 5, 16])
def test_no_batch_vocabulary_tensor_is_saved_with_the_statistic(chunk):
    batch, length, width, vocab = 4, 6, 8, 50
    hidden, weight, _, ids = make_problem(7, batch, length, width, vocab, dtype=torch.float32)
    with SavedTensors() as saved:
        logprobs, _, sum_sq = logprobs_from_hidden(
            hidden, weight, ids, chunk_size=chunk, compute_entropy=True, compute_sum_pi_squared=True
        )
    assert saved.shapes, "nothing recorded: the probe is not attached"
    assert all(math.prod(s) < batch * length * vocab for s in saved.shapes)
    assert sum(math.prod(s) for s in saved.shapes if s and s[-1] == vocab) == 0
    logprobs.sum().backward()
    assert hidden.grad is not None and torch.isfinite(sum_sq).all()
