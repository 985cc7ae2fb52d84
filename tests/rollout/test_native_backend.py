"""NativeRolloutBackend against HFRolloutBackend (the oracle) and against a teacher-forced forward.

Run: .venv/bin/python -m pytest -q tests/rollout/test_native_backend.py
"""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from steadyrl.models import build_char_tokenizer, build_tiny_model, tiny_model_config
from steadyrl.models.routing import routed_positions_mask
from steadyrl.models.tokenizer import ARITHMETIC_ALPHABET
from steadyrl.registry import ROLLOUT_BACKENDS, build_backend
from steadyrl.rollout import HFRolloutBackend, NativeRolloutBackend, SamplingParams, left_pad
from steadyrl.rollout.base import position_ids_from_mask
from steadyrl.rollout.sampling import sampling_logprobs

PAD, EOS, VOCAB = 0, 1, 12


def _model(arch: str, seed: int = 0):
    # initializer_range 0.5: a random model whose greedy completions vary and hit EOS at different steps
    cfg = tiny_model_config(
        arch,
        vocab_size=VOCAB,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        initializer_range=0.5,
    )
    return build_tiny_model(cfg, seed=seed)


@pytest.fixture(scope="module")
def models():
    return {arch: _model(arch) for arch in ("qwen2", "llama", "qwen2_moe")}


def _prompts(lengths: list[int], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return left_pad([torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths], PAD)


def _assert_same_rollout(hf, native, logprob_atol=1e-5):
    assert native.completion_ids.shape == hf.completion_ids.shape
    assert torch.equal(native.completion_ids, hf.completion_ids)
    assert torch.equal(native.response_mask, hf.response_mask)
    assert torch.equal(native.truncated, hf.truncated)
    assert torch.equal(native.prompt_ids, hf.prompt_ids) and torch.equal(native.prompt_mask, hf.prompt_mask)
    torch.testing.assert_close(native.rollout_logprobs, hf.rollout_logprobs, atol=logprob_atol, rtol=0)


# ------------------------------------------------------------------ greedy: token for token the HF backend


@pytest.mark.parametrize(
    "arch,fused", [("qwen2", True), ("qwen2", False), ("llama", True), ("qwen2_moe", False)]
)
@pytest.mark.parametrize(
    "lengths,max_new_tokens,eos",
    [
        (
            [5, 2, 6, 1, 3, 6, 4, 2],
            10,
            EOS,
        ),  # left padding; EOS mid-sequence in some rows, truncation in others
        ([4, 4, 4], 7, EOS),  # no padding
        ([3], 12, EOS),  # B = 1
        ([6, 1, 3, 5], 1, EOS),  # a single new token
        ([5, 2, 6, 1, 3, 6, 4, 2], 10, [EOS, 2, 6]),  # several EOS ids: qwen2 stops early, after 4 steps
        ([5, 2, 6, 1, 3, 6, 4, 2], 10, [EOS, 6, 11]),  # qwen2: the last row finishes on the last step
    ],
)
def test_greedy_equals_hf_backend(models, arch, fused, lengths, max_new_tokens, eos):
    model = models[arch]
    ids, mask = _prompts(lengths)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    hf = HFRolloutBackend(model, pad_token_id=PAD, eos_token_id=eos).generate(ids, mask, params)
    backend = NativeRolloutBackend(model, pad_token_id=PAD, eos_token_id=eos, fused=fused)
    assert backend.fused == fused
    native = backend.generate(ids, mask, params)
    _assert_same_rollout(hf, native)
    if arch == "qwen2_moe":  # R3: the sampler's own routing, as the HF backend records it
        routed = routed_positions_mask(hf.prompt_mask, hf.response_mask)
        assert native.routed_experts.shape == hf.routed_experts.shape
        assert torch.equal(native.routed_experts[routed], hf.routed_experts[routed])
    else:
        assert native.routed_experts is None


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_repeated_prompts_are_prefilled_once(models, arch):
    """A GRPO batch (each prompt G times) prefills P rows and still samples exactly what the HF backend does."""
    model = models[arch]
    prompts, masks = _prompts([5, 2, 6], seed=4)
    order = torch.tensor([2, 0, 1, 0, 2, 1, 0, 1, 2, 2, 0, 1])  # G = 4 copies of 3 prompts, interleaved
    ids, mask = prompts[order], masks[order]
    backend = NativeRolloutBackend(model, pad_token_id=PAD, eos_token_id=EOS)
    prefill_rows = []
    forward = backend._hf_forward

    def counting_forward(step, input_ids, *args):
        prefill_rows.append(input_ids.shape[0])
        return forward(step, input_ids, *args)

    backend._hf_forward = counting_forward
    params = SamplingParams(max_new_tokens=8, temperature=0.0)
    _assert_same_rollout(
        HFRolloutBackend(model, pad_token_id=PAD, eos_token_id=EOS).generate(ids, mask, params),
        backend.generate(ids, mask, params),
    )
    assert prefill_rows == [3]
    sampled = backend.generate(
        ids, mask, SamplingParams(max_new_tokens=8), generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(
        sampled.rollout_logprobs,
        _teacher_forced_logprobs(model, sampled, SamplingParams()),
        atol=1e-5,
        rtol=0,
    )
    assert len({tuple(row) for row in sampled.completion_ids.tolist()}) > 3  # copies of a prompt sample apart


def test_greedy_cases_cover_eos_truncation_and_early_stop(models):
    """The cases above are only worth something if they exercise EOS, truncation and an early stop."""
    backend = NativeRolloutBackend(models["qwen2"], pad_token_id=PAD, eos_token_id=EOS)
    out = backend.generate(
        *_prompts([5, 2, 6, 1, 3, 6, 4, 2]), SamplingParams(max_new_tokens=10, temperature=0.0)
    )
    lengths = out.response_mask.sum(-1)
    assert out.truncated.any() and (~out.truncated).any()
    assert ((lengths > 1) & (lengths < 10) & ~out.truncated).any()  # an EOS mid-sequence
    # finished rows hold pad after EOS, and μ is 0 wherever the mask is off
    assert (out.completion_ids[~out.response_mask] == PAD).all()
    assert (out.rollout_logprobs[~out.response_mask] == 0).all()
    three_eos = NativeRolloutBackend(models["qwen2"], pad_token_id=PAD, eos_token_id=[EOS, 2, 6])
    early = three_eos.generate(
        *_prompts([5, 2, 6, 1, 3, 6, 4, 2]), SamplingParams(max_new_tokens=10, temperature=0.0)
    )
    assert (
        early.completion_ids.shape[1] < 10 and not early.truncated.any()
    )  # every row stopped before the limit


def test_greedy_logprobs_are_the_temperature_one_logprobs(models):
    model = models["qwen2"]
    ids, mask = _prompts([5, 2, 6, 3])
    out = NativeRolloutBackend(model, pad_token_id=PAD, eos_token_id=EOS).generate(
        ids, mask, SamplingParams(max_new_tokens=6, temperature=0.0, top_k=2, top_p=0.5)
    )
    expected = _teacher_forced_logprobs(model, out, SamplingParams(temperature=1.0))
    torch.testing.assert_close(out.rollout_logprobs, expected, atol=1e-5, rtol=0)


# ------------------------------------------------------------------ sampling


def _teacher_forced_logprobs(model, out, params: SamplingParams):
    """log μ(y_t) from one forward over prompt + completion, processed by transformers' own warpers."""
    ids = torch.cat([out.prompt_ids, out.completion_ids], dim=1)
    mask = torch.cat([out.prompt_mask, torch.ones_like(out.response_mask)], dim=1)
    with torch.no_grad():
        logits = model(
            input_ids=ids, attention_mask=mask.long(), position_ids=position_ids_from_mask(mask)
        ).logits
    prompt_len, length = out.prompt_ids.shape[1], out.completion_ids.shape[1]
    logprobs = torch.zeros(out.completion_ids.shape)
    for t in range(length):
        scores = logits[:, prompt_len - 1 + t].float()
        if params.temperature != 1.0:
            scores = TemperatureLogitsWarper(params.temperature)(None, scores)
        if params.top_k:
            scores = TopKLogitsWarper(top_k=params.top_k)(None, scores)
        if params.top_p < 1.0:
            scores = TopPLogitsWarper(top_p=params.top_p)(None, scores)
        logprobs[:, t] = torch.log_softmax(scores, -1).gather(1, out.completion_ids[:, t : t + 1]).squeeze(1)
    return torch.where(out.response_mask, logprobs, 0.0)


@pytest.mark.parametrize("arch,fused", [("qwen2", True), ("qwen2", False), ("qwen2_moe", False)])
@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_new_tokens=8, temperature=1.0),
        SamplingParams(max_new_tokens=8, temperature=0.7, top_k=4),
        SamplingParams(max_new_tokens=8, temperature=1.3, top_p=0.8),
        SamplingParams(max_new_tokens=8, temperature=0.9, top_k=6, top_p=0.9),
    ],
)
def test_sampled_logprobs_are_the_processed_distribution(models, arch, fused, params):
    model = models[arch]
    ids, mask = _prompts([5, 2, 6, 1, 3, 6, 4, 2] * 2, seed=1)
    backend = NativeRolloutBackend(model, pad_token_id=PAD, eos_token_id=EOS, fused=fused)
    out = backend.generate(ids, mask, params, generator=torch.Generator().manual_seed(0))
    expected = _teacher_forced_logprobs(model, out, params)
    assert torch.isfinite(expected).all()  # no sampled token was outside the top-k / top-p set
    # a cached decode and one full forward sum in different orders: logits of this init are O(10), so their
    # fp32 noise is ~1e-6 relative, and 1/τ scales it (HF's own backend is off by up to 8e-6 here)
    torch.testing.assert_close(out.rollout_logprobs, expected, atol=1e-5, rtol=1e-5)


def test_sampling_is_reproducible_from_the_generator(models):
    backend = NativeRolloutBackend(models["qwen2"], pad_token_id=PAD, eos_token_id=EOS)
    ids, mask = _prompts([5, 2, 6, 1, 3, 6, 4, 2])
    params = SamplingParams(max_new_tokens=8, temperature=1.0, top_p=0.95)
    first = backend.generate(ids, mask, params, generator=torch.Generator().manual_seed(5))
    again = backend.generate(ids, mask, params, generator=torch.Generator().manual_seed(5))
    other = backend.generate(ids, mask, params, generator=torch.Generator().manual_seed(6))
    _assert_same_rollout(first, again, logprob_atol=0)
    assert not torch.equal(first.completion_ids, other.completion_ids)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_new_tokens=1, temperature=1.0),
        SamplingParams(max_new_tokens=1, temperature=0.8, top_p=0.7),
    ],
)
def test_hf_and_native_sample_the_same_first_token_distribution(models, params):
    """Both backends' empirical first-token frequencies match the exact processed distribution."""
    model, draws = models["qwen2"], 4000
    ids, mask = _prompts([4], seed=3)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask.long()).logits[:, -1]
    exact = sampling_logprobs(logits, params).exp()[0]
    tolerance = 5 * (exact * (1 - exact) / draws).sqrt() + 1e-3  # 5σ of a binomial frequency
    batch = (ids.expand(draws, -1), mask.expand(draws, -1))
    for backend_cls in (HFRolloutBackend, NativeRolloutBackend):
        out = backend_cls(model, pad_token_id=PAD, eos_token_id=EOS).generate(
            *batch, params, generator=torch.Generator().manual_seed(11)
        )
        freq = torch.bincount(out.completion_ids[:, 0], minlength=VOCAB).float() / draws
        assert ((freq - exact).abs() <= tolerance).all(), (backend_cls.__name__, freq, exact)


# ------------------------------------------------------------------ sampler dtype, weights, modes


def test_bfloat16_sampler_and_sync_weights(models):
    policy = _model("qwen2", seed=1)
    backend = NativeRolloutBackend(policy, pad_token_id=PAD, eos_token_id=EOS, sampler_dtype=torch.bfloat16)
    assert backend.separate_sampler and backend.sampler is not policy and backend.fused
    assert next(backend.sampler.parameters()).dtype == torch.bfloat16
    ids, mask = _prompts([5, 2, 6, 3])
    params = SamplingParams(max_new_tokens=6, temperature=1.0)
    out = backend.generate(ids, mask, params, generator=torch.Generator().manual_seed(0))
    # μ is the bf16 sampler's own distribution (bf16 rounding: one ulp of a logit is ~0.03)...
    torch.testing.assert_close(
        out.rollout_logprobs, _teacher_forced_logprobs(backend.sampler, out, params), atol=0.1, rtol=0
    )
    # ...and not the fp32 policy's: the mismatch the sampler dtype exists to create
    assert not torch.allclose(out.rollout_logprobs, _teacher_forced_logprobs(policy, out, params), atol=1e-4)

    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.3)
    stale = next(backend.sampler.parameters()).float()
    assert not torch.allclose(stale, next(policy.parameters()), atol=1e-2)
    backend.sync_weights()
    for dst, src in zip(backend.sampler.parameters(), policy.parameters()):
        assert torch.equal(dst, src.to(torch.bfloat16))
    fresh = NativeRolloutBackend(policy, pad_token_id=PAD, eos_token_id=EOS, sampler_dtype=torch.bfloat16)
    greedy = SamplingParams(max_new_tokens=6, temperature=0.0)
    _assert_same_rollout(
        fresh.generate(ids, mask, greedy), backend.generate(ids, mask, greedy), logprob_atol=0
    )


def test_same_dtype_sampler_is_the_policy(models):
    backend = NativeRolloutBackend(
        models["qwen2"], pad_token_id=PAD, eos_token_id=EOS, sampler_dtype=torch.float32
    )
    assert backend.sampler is models["qwen2"] and not backend.separate_sampler
    backend.sync_weights()  # a no-op, must not fail


def test_training_mode_is_restored(models):
    model = _model("qwen2")
    model.train()
    NativeRolloutBackend(model, pad_token_id=PAD, eos_token_id=EOS).generate(
        *_prompts([3, 2]), SamplingParams(max_new_tokens=3, temperature=0.0)
    )
    assert model.training


def test_fused_path_selection(models):
    assert NativeRolloutBackend(models["qwen2"], pad_token_id=PAD, eos_token_id=EOS).fused
    assert not NativeRolloutBackend(models["qwen2_moe"], pad_token_id=PAD, eos_token_id=EOS).fused
    with pytest.raises(ValueError, match="fused decoding needs"):
        NativeRolloutBackend(models["qwen2_moe"], pad_token_id=PAD, eos_token_id=EOS, fused=True)
    hooked = _model("qwen2")
    hooked.model.layers[0].mlp.register_forward_hook(lambda module, args, output: None)
    assert not NativeRolloutBackend(hooked, pad_token_id=PAD, eos_token_id=EOS).fused  # hooks must run
    eager = build_tiny_model(
        tiny_model_config("qwen2", vocab_size=VOCAB, hidden_size=32, num_layers=1, num_heads=2),
        attn_implementation="eager",
    )
    eager_backend = NativeRolloutBackend(eager, pad_token_id=PAD, eos_token_id=EOS)
    assert not eager_backend.fused and not eager_backend._own_mask
    ids, mask = _prompts([4, 2, 5])
    params = SamplingParams(max_new_tokens=5, temperature=0.0)
    hf = HFRolloutBackend(eager, pad_token_id=PAD, eos_token_id=EOS).generate(ids, mask, params)
    _assert_same_rollout(hf, eager_backend.generate(ids, mask, params))  # masks built by transformers


def test_compile_off_cuda_warns_and_decodes_eagerly(models):
    ids, mask = _prompts([4, 2, 5])
    params = SamplingParams(max_new_tokens=5, temperature=0.0)
    compiled = NativeRolloutBackend(models["qwen2"], pad_token_id=PAD, eos_token_id=EOS, compile=True)
    with pytest.warns(UserWarning, match="CUDA only"):
        out = compiled.generate(ids, mask, params)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compiled.generate(ids, mask, params)  # warned once
    eager = NativeRolloutBackend(models["qwen2"], pad_token_id=PAD, eos_token_id=EOS)
    _assert_same_rollout(eager.generate(ids, mask, params), out, logprob_atol=0)


@pytest.mark.parametrize("fused", [True, False])
def test_compiled_path_logic_on_cpu(models, fused):
    """The CUDA-graph path's bookkeeping (bucketed cache length, full-length attention, kept cache reset between
    calls) traced by dynamo with its eager backend: CPU cannot run reduce-overhead, but the logic is the same."""
    ids, mask = _prompts([4, 2, 5])
    params = SamplingParams(max_new_tokens=5, temperature=0.0)
    backend = NativeRolloutBackend(
        models["qwen2"], pad_token_id=PAD, eos_token_id=EOS, fused=fused, cache_bucket=16
    )
    reference = backend.generate(ids, mask, params)
    step = torch.compile(backend._fused_step if fused else backend.sampler, backend="eager", dynamic=False)
    backend._step_fn = lambda device: (step, True)
    first = backend.generate(ids, mask, params)
    kept = backend._kept_cache
    second = backend.generate(ids, mask, params)
    assert backend._kept_cache is kept  # the same buffers, emptied and refilled
    if fused:
        assert kept[0][1][2] == 16  # Tp + N − 1 = 9 slots, rounded up to the bucket
    for out in (first, second):
        _assert_same_rollout(reference, out)


def test_bad_arguments_fail_fast(models):
    with pytest.raises(ValueError, match="max_new_tokens"):
        NativeRolloutBackend(models["qwen2"], pad_token_id=PAD, eos_token_id=EOS).generate(
            *_prompts([3]), SamplingParams(max_new_tokens=0)
        )
    with pytest.raises(ValueError, match="stop_check_every"):
        NativeRolloutBackend(models["qwen2"], pad_token_id=PAD, eos_token_id=EOS, stop_check_every=0)


def test_native_options_are_settable_from_the_config():
    from steadyrl.config import MethodSpec

    tokenizer = build_char_tokenizer(ARITHMETIC_ALPHABET)
    cfg = tiny_model_config("qwen2", vocab_size=len(tokenizer), hidden_size=32, num_layers=1, num_heads=2)
    spec = MethodSpec("native", {"compile": True, "cache_bucket": 64, "fused": False})
    backend = build_backend(spec, build_tiny_model(cfg), tokenizer)
    assert backend.compile and backend.cache_bucket == 64 and not backend.fused


def test_build_backend_registers_native():
    assert "native" in ROLLOUT_BACKENDS
    tokenizer = build_char_tokenizer(ARITHMETIC_ALPHABET)
    cfg = tiny_model_config("qwen2", vocab_size=len(tokenizer), hidden_size=32, num_layers=1, num_heads=2)
    backend = build_backend("native", build_tiny_model(cfg), tokenizer, sampler_dtype=torch.bfloat16)
    assert isinstance(backend, NativeRolloutBackend) and backend.separate_sampler
    assert backend.pad_token_id == tokenizer.pad_token_id and backend.eos_token_id == tokenizer.eos_token_id


# ------------------------------------------------------------------ properties


@settings(deadline=None, max_examples=8)
@given(
    lengths=st.lists(st.integers(1, 6), min_size=1, max_size=5),
    extra_padding=st.integers(1, 3),
    max_new_tokens=st.integers(1, 6),
)
def test_extra_left_padding_changes_nothing(models, lengths, extra_padding, max_new_tokens):
    ids, mask = _prompts(lengths, seed=sum(lengths))
    padded_ids = torch.cat([torch.full((len(lengths), extra_padding), PAD), ids], dim=1)
    padded_mask = torch.cat([torch.zeros((len(lengths), extra_padding), dtype=torch.bool), mask], dim=1)
    backend = NativeRolloutBackend(models["llama"], pad_token_id=PAD, eos_token_id=EOS)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    plain, padded = backend.generate(ids, mask, params), backend.generate(padded_ids, padded_mask, params)
    assert torch.equal(plain.completion_ids, padded.completion_ids)
    assert torch.equal(plain.response_mask, padded.response_mask)
    torch.testing.assert_close(plain.rollout_logprobs, padded.rollout_logprobs, atol=1e-5, rtol=0)


# ------------------------------------------------------------------ CUDA


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fused,compile", [(True, False), (False, False), (True, True), (False, True)])
def test_greedy_equals_hf_backend_on_cuda(fused, compile):
    model = _model("qwen2").cuda()
    ids, mask = _prompts([5, 2, 6, 1, 3, 6, 4, 2])
    ids, mask = ids.cuda(), mask.cuda()
    params = SamplingParams(max_new_tokens=10, temperature=0.0)
    hf = HFRolloutBackend(model, pad_token_id=PAD, eos_token_id=EOS).generate(ids, mask, params)
    backend = NativeRolloutBackend(
        model, pad_token_id=PAD, eos_token_id=EOS, fused=fused, compile=compile, cache_bucket=16
    )
    for _ in range(2):  # the second call reuses the kept cache (and the captured graphs when compiled)
        _assert_same_rollout(hf, backend.generate(ids, mask, params), logprob_atol=1e-4)
    sampled = backend.generate(
        ids,
        mask,
        SamplingParams(max_new_tokens=10, top_p=0.9),
        generator=torch.Generator("cuda").manual_seed(0),
    )
    assert torch.isfinite(sampled.rollout_logprobs).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_moe_routing_is_recorded_eagerly_on_cuda():
    model = _model("qwen2_moe").cuda()
    ids, mask = (t.cuda() for t in _prompts([5, 2, 6, 1]))
    params = SamplingParams(max_new_tokens=6, temperature=0.0)
    hf = HFRolloutBackend(model, pad_token_id=PAD, eos_token_id=EOS).generate(ids, mask, params)
    backend = NativeRolloutBackend(model, pad_token_id=PAD, eos_token_id=EOS, compile=True)
    with pytest.warns(UserWarning, match="recording MoE routing"):
        native = backend.generate(ids, mask, params)
    _assert_same_rollout(hf, native, logprob_atol=1e-4)
    routed = routed_positions_mask(hf.prompt_mask, hf.response_mask)
    assert torch.equal(native.routed_experts[routed], hf.routed_experts[routed])
