"""Step diagnostics: ops/diagnostics.py, and the metrics the running code reports (losses, estimators,
the chunked log-prob pass) against plain-loop references.

.venv/bin/python -m pytest -q tests/ops/test_diagnostics.py
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import reference_correction as ref
import reference_losses as rl
from steadyrl.ops import advantages, losses
from steadyrl.ops import diagnostics as D
from steadyrl.ops.logprobs import logprobs_from_hidden
from steadyrl.ops.masking import masked_max, masked_min
from steadyrl.types import LossInputs

F64 = torch.float64


def close(actual, expected, tol=1e-6):
    assert math.isclose(float(actual), expected, rel_tol=tol, abs_tol=tol), (float(actual), expected)


# ------------------------------------------------------------------ entropy (as the chunked log-prob pass runs it)


def _entropy_through_the_head(logits: torch.Tensor, chunk: int) -> torch.Tensor:
    """The trainer's entropy of ``logits`` (N, V): hidden = I, LM head W = logitsᵀ, so z = h·Wᵀ = logits."""
    n = logits.shape[0]
    hidden = torch.eye(n, dtype=logits.dtype).unsqueeze(0)  # (1, N, N)
    ids = torch.zeros(1, n, dtype=torch.long)
    _, entropy = logprobs_from_hidden(hidden, logits.T.contiguous(), ids, chunk_size=chunk, compute_entropy=True)
    return entropy[0]


def test_entropy_hand_values():
    V = 7
    close(D.entropy_fp32(torch.zeros(2, V))[0], math.log(V))  # uniform: H = log V
    # p = (0.25, 0.75): H = −(0.25 ln 0.25 + 0.75 ln 0.75) = 0.5623351446
    close(D.entropy_fp32(torch.tensor([[0.0, math.log(3.0)]]))[0], 0.5623351446)
    # a −inf logit has p = 0 and contributes 0 (not NaN): one certain token → H = 0
    assert D.entropy_fp32(torch.tensor([[0.0, -float("inf"), -float("inf")]]))[0] == 0.0


@pytest.mark.parametrize("rows,vocab,chunk", [(1, 5, 1), (9, 4, 3), (6, 11, 2), (12, 6, 1000)])
def test_trainer_entropy_matches_loop_reference(rows, vocab, chunk):
    gen = torch.Generator().manual_seed(rows + vocab)
    logits = 3 * torch.randn(rows, vocab, generator=gen, dtype=F64)
    out = _entropy_through_the_head(logits, chunk)
    torch.testing.assert_close(out.double(), torch.tensor(ref.entropy(logits.tolist()), dtype=F64), rtol=1e-5, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 12), vocab=st.integers(1, 20), chunk=st.integers(1, 15), seed=st.integers(0, 999))
def test_trainer_entropy_is_independent_of_chunking_detached_and_bounded(rows, vocab, chunk, seed):
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed))
    out = _entropy_through_the_head(logits, chunk)
    torch.testing.assert_close(out, _entropy_through_the_head(logits, rows))
    assert not out.requires_grad
    assert (out >= -1e-6).all() and (out <= math.log(vocab) + 1e-5).all()


# ------------------------------------------------------------------ clip fractions and k3, as the losses report them


def test_clip_fractions_hand_values():
    ratio = torch.tensor([[0.7, 0.9, 1.3, 1.5, 1.0]], dtype=F64)
    inputs = LossInputs(
        logprobs=torch.log(ratio).requires_grad_(),
        old_logprobs=torch.zeros_like(ratio),
        advantages=torch.tensor([[-1.0, -1.0, 1.0, -1.0, 1.0]], dtype=F64),
        response_mask=torch.tensor([[True, True, True, True, False]]),
    )
    m = losses.ppo_clip_loss(inputs, clip_low=0.2, clip_high=0.28).metrics
    # low: 0.7 < 0.8 with Â < 0 (yes); high: 1.3 > 1.28 with Â > 0 (yes), 1.5 has Â < 0 (clip inactive)
    close(m["ratio/clip_frac_low"], 1 / 4)
    close(m["ratio/clip_frac_high"], 1 / 4)
    # k3 of KL(π_old‖π_θ): mean of r − 1 − ln r over the 4 valid tokens
    close(m["kl/approx_old"], sum(r - 1 - math.log(r) for r in (0.7, 0.9, 1.3, 1.5)) / 4)


@pytest.mark.parametrize("seed,batch,length", [(0, 1, 1), (1, 4, 9), (2, 7, 3)])
def test_loss_clip_fractions_and_k3_match_loop_references(seed, batch, length):
    inputs = rl.random_inputs(batch, length, seed)
    m = losses.ppo_clip_loss(inputs, clip_low=0.2, clip_high=0.27).metrics
    logp, old, adv, mask = (x.detach().tolist() for x in (inputs.logprobs, inputs.old_logprobs, inputs.advantages, inputs.response_mask))
    ratio = [[math.exp(a - b) for a, b in zip(ra, rb)] for ra, rb in zip(logp, old)]
    expected = ref.clip_fractions(ratio, adv, mask, 0.2, 0.27)
    close(m["ratio/clip_frac_low"], expected["ratio/clip_frac_low"])
    close(m["ratio/clip_frac_high"], expected["ratio/clip_frac_high"])
    close(m["kl/approx_old"], ref.approx_kl_k3(logp, old, mask), tol=1e-9)
    assert m["kl/approx_old"] >= 0


# ------------------------------------------------------------------ zero-variance groups, as the estimators report them


@settings(max_examples=40, deadline=None)
@given(
    rewards=st.lists(st.sampled_from([0.0, 1.0, 0.5, float("nan")]), min_size=1, max_size=24),
    group=st.integers(2, 6),
)
def test_advantage_zero_std_frac_matches_loop_reference(rewards, group):
    rewards = rewards[: len(rewards) - len(rewards) % group] or [0.0] * group
    out = advantages.grpo_advantages(torch.tensor(rewards), group).metrics["adv/zero_std_frac"]
    close(out, ref.zero_variance_group_frac(rewards, group), tol=1e-7)


# ------------------------------------------------------------------ weights, ESS, groups


def test_effective_sample_size_hand_values():
    ones = torch.ones(4, dtype=torch.bool)
    close(D.effective_sample_size(torch.ones(4), ones), 1.0)  # equal weights
    close(D.effective_sample_size(torch.tensor([1.0, 0.0, 0.0, 0.0]), ones), 0.25)  # one carries all: 1/N
    close(D.effective_sample_size(torch.tensor([2.0, 1.5, 0.25]), ones[:3]), 3.75**2 / (3 * 6.3125))
    assert D.effective_sample_size(torch.ones(3), torch.zeros(3, dtype=torch.bool)) == 0  # nothing selected
    assert D.effective_sample_size(torch.zeros(3), ones[:3]) == 0  # all weight zero


def test_is_weight_stats_hand_values_and_empty_identities():
    w = torch.tensor([[2.0, 0.5, float("nan")]])
    mask = torch.tensor([[True, True, False]])
    m = D.is_weight_stats(w, mask, prefix="mismatch/is_")
    assert set(m) == {
        "mismatch/is_weight_mean",
        "mismatch/is_weight_min",
        "mismatch/is_weight_max",
        "mismatch/is_ess",
    }
    close(m["mismatch/is_weight_mean"], 1.25)
    close(m["mismatch/is_weight_min"], 0.5)
    close(m["mismatch/is_weight_max"], 2.0)
    close(m["mismatch/is_ess"], 2.5**2 / (2 * 4.25))  # (Σw)² / (N Σw²)
    empty = D.is_weight_stats(w, torch.zeros_like(mask))
    assert empty["is/weight_min"] == float("inf") and empty["is/weight_max"] == float("-inf")
    assert empty["is/weight_mean"] == 0 and empty["is/ess"] == 0


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 999), n=st.integers(1, 20))
def test_is_weight_stats_match_loop_reference(seed, n):
    gen = torch.Generator().manual_seed(seed)
    w = torch.rand(n, generator=gen, dtype=F64) * 3
    mask = torch.rand(n, generator=gen) < 0.7
    out = D.is_weight_stats(w, mask, prefix="mismatch/is_")
    for key, value in ref.weight_stats(w.tolist(), mask.tolist()).items():
        assert float(out[key]) == pytest.approx(value, rel=1e-9, abs=1e-12)


def test_masked_min_max_and_at_least_fp32():
    x = torch.tensor([3.0, -1.0, float("nan")])
    keep = torch.tensor([True, True, False])
    assert masked_min(x, keep) == -1.0 and masked_max(x, keep) == 3.0
    none = torch.zeros(3, dtype=torch.bool)  # the identities of the reductions
    assert masked_min(x, none) == float("inf") and masked_max(x, none) == float("-inf")
    assert D.at_least_fp32(torch.ones(2, dtype=torch.bfloat16)).dtype == torch.float32
    assert D.at_least_fp32(torch.ones(2, dtype=F64)).dtype == F64
