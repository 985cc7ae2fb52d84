"""Tests for ops/logprobs.py: values and both gradients equal the unchunked computation; no (B·T, V) tensor
is ever saved for backward.

    .venv/bin/python -m pytest -q tests/ops/test_logprobs.py
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import reference_correction as ref
from steadyrl.ops.logprobs import logprobs_from_hidden, selective_log_softmax

F64 = torch.float64


# ------------------------------------------------------------------ selective_log_softmax


def test_selective_log_softmax_hand_values():
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, math.log(3.0)]])
    out = selective_log_softmax(logits, torch.tensor([1, 0]))
    # softmax = (1/4, 3/4): log(3/4) = −0.2876821, log(1/4) = −1.3862944
    torch.testing.assert_close(out, torch.tensor([math.log(0.75), math.log(0.25)]))


def test_selective_log_softmax_is_stable_for_huge_logits():
    logits = torch.tensor([[1e4, 1e4 + math.log(3.0)]], dtype=torch.float32)  # naive exp overflows
    out = selective_log_softmax(logits, torch.tensor([1]))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(
        out, torch.tensor([math.log(0.75)]), atol=1e-3, rtol=0
    )  # fp32 ulp at 1e4 ≈ 1e-3


@pytest.mark.parametrize("rows,vocab,chunk", [(1, 1, 1), (5, 7, 2), (9, 13, 4), (6, 3, 100)])
def test_selective_log_softmax_matches_loop_reference(rows, vocab, chunk):
    gen = torch.Generator().manual_seed(rows * vocab)
    logits = 4 * torch.randn(rows, vocab, generator=gen, dtype=F64)
    ids = torch.randint(0, vocab, (rows,), generator=gen)
    out = selective_log_softmax(logits, ids, chunk_size=chunk)
    expected = ref.selective_log_softmax(logits.tolist(), ids.tolist())
    torch.testing.assert_close(out, torch.tensor(expected, dtype=F64), rtol=1e-12, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 10), vocab=st.integers(1, 12), chunk=st.integers(1, 12), seed=st.integers(0, 999))
def test_selective_log_softmax_gradient_equals_log_softmax(rows, vocab, chunk, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=gen, dtype=F64, requires_grad=True)
    ids = torch.randint(0, vocab, (rows,), generator=gen)
    upstream = torch.randn(rows, generator=gen, dtype=F64)
    ours = torch.autograd.grad(
        (selective_log_softmax(logits, ids, chunk_size=chunk) * upstream).sum(), logits
    )[0]
    full = torch.log_softmax(logits, -1).gather(-1, ids[:, None]).squeeze(-1)
    theirs = torch.autograd.grad((full * upstream).sum(), logits)[0]
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


def test_selective_log_softmax_upcasts_bf16():
    logits = torch.randn(6, 50, dtype=torch.bfloat16)
    ids = torch.randint(0, 50, (6,))
    out = selective_log_softmax(logits, ids, chunk_size=4)
    assert out.dtype == torch.float32
    torch.testing.assert_close(
        out, torch.log_softmax(logits.float(), -1).gather(-1, ids[:, None]).squeeze(-1)
    )


# ------------------------------------------------------------------ logprobs_from_hidden


def make_problem(seed, batch=3, length=5, width=6, vocab=11, dtype=F64, bias=False):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, length, width, generator=gen, dtype=F64).to(dtype).requires_grad_(True)
    weight = torch.randn(vocab, width, generator=gen, dtype=F64).to(dtype).requires_grad_(True)
    b = torch.randn(vocab, generator=gen, dtype=F64).to(dtype).requires_grad_(True) if bias else None
    ids = torch.randint(0, vocab, (batch, length), generator=gen)
    return hidden, weight, b, ids


def full_reference(hidden, weight, bias, ids, temperature):
    """The unchunked computation: full (B, T, V) logits and torch.log_softmax."""
    logits = hidden.double() @ weight.double().T
    if bias is not None:
        logits = logits + bias.double()
    log_p = torch.log_softmax(logits / temperature, dim=-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    return log_p.gather(-1, ids[..., None]).squeeze(-1), entropy


@pytest.mark.parametrize("chunk", [1, 4, 7, 15, 1024])  # 15 = B·T, 4 and 7 do not divide it
@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("bias", [False, True])
def test_values_and_gradients_equal_unchunked(chunk, temperature, bias):
    hidden, weight, b, ids = make_problem(chunk, bias=bias)
    logprobs, entropy = logprobs_from_hidden(
        hidden, weight, ids, lm_head_bias=b, temperature=temperature, chunk_size=chunk, compute_entropy=True
    )
    expected, expected_entropy = full_reference(hidden, weight, b, ids, temperature)
    torch.testing.assert_close(logprobs, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(entropy, expected_entropy.detach(), rtol=1e-10, atol=1e-12)
    assert not entropy.requires_grad
    upstream = torch.randn_like(expected)
    params = [hidden, weight] + ([b] if bias else [])
    ours = torch.autograd.grad((logprobs * upstream).sum(), params)
    theirs = torch.autograd.grad((expected * upstream).sum(), params)
    for g_ours, g_theirs in zip(ours, theirs):
        torch.testing.assert_close(g_ours, g_theirs, rtol=1e-10, atol=1e-12)


def test_hand_value_uniform_weight_gives_log_uniform():
    # W = 0: every logit is 0, π = 1/V for every token, log π = −log V, entropy = log V
    hidden = torch.randn(2, 3, 4)
    weight = torch.zeros(5, 4)
    logprobs, entropy = logprobs_from_hidden(
        hidden, weight, torch.zeros(2, 3, dtype=torch.long), chunk_size=2, compute_entropy=True
    )
    torch.testing.assert_close(logprobs, torch.full((2, 3), -math.log(5)))
    torch.testing.assert_close(entropy, torch.full((2, 3), math.log(5)))


def test_bf16_inputs_compute_in_fp32_and_return_bf16_gradients():
    hidden, weight, _, ids = make_problem(3, dtype=torch.bfloat16, vocab=40, width=16)
    logprobs, _ = logprobs_from_hidden(hidden, weight, ids, chunk_size=4, temperature=0.7)
    assert logprobs.dtype == torch.float32
    expected, _ = full_reference(
        hidden.float(), weight.float(), None, ids, 0.7
    )  # fp32 math on the bf16 values
    torch.testing.assert_close(logprobs.double(), expected, rtol=1e-5, atol=1e-5)
    logprobs.sum().backward()
    assert hidden.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.bfloat16
    h32, w32 = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    full_reference(h32, w32, None, ids, 0.7)[0].sum().backward()
    torch.testing.assert_close(
        weight.grad.float(), w32.grad, rtol=2e-2, atol=2e-2
    )  # bf16 rounding of the grad


def test_no_grad_path_and_entropy_off():
    hidden, weight, _, ids = make_problem(4)
    with_grad, entropy = logprobs_from_hidden(hidden, weight, ids, chunk_size=4)
    assert entropy is None
    with torch.no_grad():
        without, _ = logprobs_from_hidden(hidden, weight, ids, chunk_size=4)
    assert not without.requires_grad
    torch.testing.assert_close(without, with_grad.detach())


def test_bad_arguments_name_the_problem():
    hidden, weight, _, ids = make_problem(5)
    with pytest.raises(ValueError, match="target_ids"):
        logprobs_from_hidden(hidden, weight, ids[:, :-1])
    with pytest.raises(ValueError, match="lm_head_weight"):
        logprobs_from_hidden(hidden, weight[:, :-1], ids)
    with pytest.raises(ValueError, match="chunk_size"):
        logprobs_from_hidden(hidden, weight, ids, chunk_size=0)
    with pytest.raises(ValueError, match="temperature"):
        logprobs_from_hidden(hidden, weight, ids, temperature=0.0)


# ------------------------------------------------------------------ memory: what autograd keeps


class SavedTensors:
    """Records the shape of every tensor autograd saves for backward while active."""

    def __init__(self):
        self.shapes: list[torch.Size] = []

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda x: x)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)

    def _pack(self, tensor):
        self.shapes.append(tensor.shape)
        return tensor


def test_saved_tensor_hooks_see_full_logits_in_the_naive_computation():
    # The probe itself must be able to fail: the unchunked computation saves (B, T, V) tensors.
    batch, length, width, vocab = 4, 6, 8, 50
    hidden, weight, _, ids = make_problem(6, batch, length, width, vocab, dtype=torch.float32)
    with SavedTensors() as saved:
        full_reference(hidden, weight, None, ids, 1.0)
    assert any(math.prod(s) >= batch * length * vocab for s in saved.shapes)


@pytest.mark.parametrize("chunk", [1, 5, 16])
def test_no_saved_tensor_has_full_vocabulary_batch_size(chunk):
    batch, length, width, vocab = 4, 6, 8, 50  # B·T = 24 > chunk; H < B·T so the weight is smaller than B·T·V
    hidden, weight, _, ids = make_problem(7, batch, length, width, vocab, dtype=torch.float32)
    with SavedTensors() as saved:
        logprobs, _ = logprobs_from_hidden(hidden, weight, ids, chunk_size=chunk, compute_entropy=True)
    assert saved.shapes, "nothing recorded: the probe is not attached"
    assert all(math.prod(s) < batch * length * vocab for s in saved.shapes)
    # Checkpointing keeps no logits at all: nothing (·, V)-shaped survives the forward.
    assert sum(math.prod(s) for s in saved.shapes if s and s[-1] == vocab) == 0
    logprobs.sum().backward()  # and backward still works from what was kept
    assert hidden.grad is not None and weight.grad is not None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_peak_memory_is_one_chunk_not_the_batch():
    device = torch.device("cuda")
    batch, length, width, vocab, chunk = 8, 1024, 256, 32_000, 1024
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(
        batch, length, width, device=device, dtype=torch.bfloat16, generator=gen
    ).requires_grad_()
    weight = (
        (0.05 * torch.randn(vocab, width, device=device, generator=gen)).to(torch.bfloat16).requires_grad_()
    )
    ids = torch.randint(0, vocab, (batch, length), device=device, generator=gen)
    full_logits_bytes = batch * length * vocab * 4  # one fp32 copy: ~1 GB
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    logprobs, entropy = logprobs_from_hidden(hidden, weight, ids, chunk_size=chunk, compute_entropy=True)
    logprobs.sum().backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    assert peak < 0.25 * full_logits_bytes, (peak, full_logits_bytes)
    with torch.no_grad():
        logits = (hidden.float() @ weight.float().T).view(-1, vocab)
        expected = torch.log_softmax(logits, -1).gather(-1, ids.view(-1, 1)).view(batch, length)
    torch.testing.assert_close(logprobs, expected, rtol=1e-4, atol=1e-4)
