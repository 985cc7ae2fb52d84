"""MoE Routing Replay (models/routing.py): recording, replay, gate weights, agreement (arXiv 2512.01374 §5)."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from steadyrl.config import ConfigError
from steadyrl.models import build_tiny_model, tiny_model_config
from steadyrl.models.loading import enable_activation_checkpointing
from steadyrl.models.routing import (
    RoutingRecorder,
    RoutingReplayer,
    UnsupportedMoEError,
    check_routing_replay,
    replay_routing_weights,
    routed_positions_mask,
    routing_agreement,
    supported_moe_layers,
)
from steadyrl.rollout.base import position_ids_from_mask

VOCAB = 24
ARCHS = ("qwen2_moe", "qwen3_moe")


def moe_model(arch: str, seed: int = 0, **extra) -> nn.Module:
    cfg = tiny_model_config(arch, vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=2, **extra)
    return build_tiny_model(cfg, seed=seed).eval()


def tokens(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def record(model: nn.Module, ids: torch.Tensor, **kw) -> torch.Tensor:
    with RoutingRecorder(model) as recorder:
        model(input_ids=ids, **kw)
    return recorder.routed_experts(ids.shape[0])


def random_routing(batch: int, seq: int, layers: int, k: int, experts: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randperm(experts, generator=g)[:k] for _ in range(batch * seq * layers)]
    return torch.stack(rows).reshape(batch, seq, layers, k)


def log_probs(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(model(input_ids=ids).logits.float(), dim=-1)


# ----------------------------------------------------------------------------- supported classes


@pytest.mark.parametrize("arch,router_cls", [("qwen2_moe", "Qwen2MoeTopKRouter"), ("qwen3_moe", "Qwen3MoeTopKRouter")])
def test_supported_moe_layers_are_the_routers_in_depth_order(arch, router_cls):
    model = moe_model(arch)
    routers = supported_moe_layers(model)
    assert [type(r).__name__ for r in routers] == [router_cls, router_cls]
    assert routers[0] is model.model.layers[0].mlp.gate and routers[1] is model.model.layers[1].mlp.gate


def test_dense_model_has_no_routers_and_records_none():
    dense = build_tiny_model(tiny_model_config("qwen2", vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=2))
    assert supported_moe_layers(dense) == []
    assert record(dense, tokens(2, 5)) is None
    assert check_routing_replay(dense, "none") is False
    with pytest.raises(ConfigError, match="routing_replay=none"):
        check_routing_replay(dense, "R3")
    with pytest.raises(ConfigError, match="routing_replay=none"):
        RoutingReplayer(dense, None)


class _LegacyQwen2MoeSparseMoeBlock(nn.Module):
    """transformers 4.x layout: the gate is a plain nn.Linear and top-k happens inside the block."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(8, 4, bias=False)
        self.experts = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))


def test_unsupported_moe_blocks_raise_naming_the_supported_classes():
    legacy = nn.Sequential(nn.Linear(8, 8), _LegacyQwen2MoeSparseMoeBlock())
    with pytest.raises(UnsupportedMoEError, match="Qwen2MoeSparseMoeBlock with Qwen2MoeTopKRouter.*transformers >= 5"):
        supported_moe_layers(legacy)
    assert supported_moe_layers(legacy, strict=False) == []
    cfg = AutoConfig.for_model(
        "mixtral", vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
    )  # fmt: skip
    mixtral = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(UnsupportedMoEError, match="MixtralSparseMoeBlock with MixtralTopKRouter.*Qwen3MoeTopKRouter"):
        check_routing_replay(mixtral, "R2")
    assert check_routing_replay(mixtral, "none") is False  # trains without routing metrics
    with pytest.raises(ConfigError, match="valid: none, R2, R3"):
        check_routing_replay(moe_model("qwen2_moe"), "R4")


def test_check_warns_when_the_paper_rule_differs_from_the_router():
    with pytest.warns(UserWarning, match="norm_topk_prob=False"):
        assert check_routing_replay(moe_model("qwen2_moe"), "R2") is True
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_routing_replay(moe_model("qwen2_moe", norm_topk_prob=True), "R3") is True
        assert check_routing_replay(moe_model("qwen2_moe"), "R3", weight_rule="router") is True


# ----------------------------------------------------------------------------- recording


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_records_prompt_and_completion_routing_like_a_teacher_forced_forward(arch):
    model = moe_model(arch)
    batch, prompt_len, new = 4, 5, 6
    ids = tokens(batch, prompt_len, seed=1)
    prompt_mask = torch.ones_like(ids, dtype=torch.bool)
    prompt_mask[0, :2] = False  # left padding
    ids[0, :2] = 0
    torch.manual_seed(0)
    with RoutingRecorder(model) as recorder:
        out = model.generate(
            input_ids=ids, attention_mask=prompt_mask.long(), max_new_tokens=new, do_sample=True,
            pad_token_id=0, eos_token_id=None,
        )  # fmt: skip
    total = out.shape[1]
    assert total == prompt_len + new
    routed = recorder.routed_experts(batch, total)
    assert routed.shape == (batch, prompt_len + new, 2, 2) and routed.dtype == torch.long
    assert (routed[:, -1] == -1).all()  # the last sampled token is never fed back to the sampler
    assert ((routed[:, :-1] >= 0) & (routed[:, :-1] < 4)).all()
    # Prefill (B·Tp tokens) then one token per step: Tp + T - 1 routed positions per layer.
    assert [c.shape[0] for c in recorder.calls[0]] == [batch * prompt_len] + [batch] * (new - 1)

    attn = torch.cat([prompt_mask, torch.ones(batch, new, dtype=torch.bool)], dim=1)
    forced = record(model, out, attention_mask=attn.long(), position_ids=position_ids_from_mask(attn))
    mask = routed_positions_mask(prompt_mask, torch.ones(batch, new, dtype=torch.bool))
    agreement = routing_agreement(routed, forced, mask)
    assert agreement["routing/agreement"] == 1.0 and agreement["routing/agreement_all_layers"] == 1.0


def test_recorder_pads_to_seq_len_and_rejects_too_short():
    model = moe_model("qwen2_moe")
    with RoutingRecorder(model) as recorder:
        model(input_ids=tokens(2, 3))
        model(input_ids=tokens(2, 1))
    assert recorder.routed_experts(2).shape == (2, 4, 2, 2)
    padded = recorder.routed_experts(2, 6)
    assert padded.shape == (2, 6, 2, 2) and (padded[:, 4:] == -1).all()
    with pytest.raises(ValueError, match="seq_len"):
        recorder.routed_experts(2, 3)
    model(input_ids=tokens(2, 3))  # after the context: not recorded
    assert recorder.routed_experts(2).shape[1] == 4


# ----------------------------------------------------------------------------- replay


@pytest.mark.parametrize("arch", ARCHS)
def test_replay_forces_foreign_routing_and_trains_the_router(arch):
    model = moe_model(arch, seed=0).train()
    ids = tokens(3, 7, seed=2)
    foreign = record(moe_model(arch, seed=1), ids)
    plain = record(model, ids)
    everywhere = torch.ones(3, 7, dtype=torch.bool)
    assert routing_agreement(foreign, plain, everywhere)["routing/agreement"] < 0.9  # the perturbation is real
    with RoutingReplayer(model, foreign), RoutingRecorder(model) as recorder:
        loss = -log_probs(model, ids).mean()
        loss.backward()
    replayed = recorder.routed_experts(3)
    assert torch.equal(replayed, foreign)
    for router in supported_moe_layers(model):
        assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
    # Random expert sets too, any order within k.
    model.zero_grad()
    arbitrary = random_routing(3, 7, 2, 2, 4, seed=3)
    with RoutingReplayer(model, arbitrary), RoutingRecorder(model) as recorder:
        model(input_ids=ids)
    assert torch.equal(recorder.routed_experts(3), arbitrary)


@pytest.mark.parametrize("rule", ["restricted_softmax", "router"])
@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_the_experts_receive_the_formula_weights_of_the_recorded_indices(rule, norm_topk_prob):
    model = moe_model("qwen3_moe", norm_topk_prob=norm_topk_prob)
    ids = tokens(2, 5, seed=4)
    routed = random_routing(2, 5, 2, 2, 4, seed=5)
    seen: list[tuple] = []
    hooks = [
        layer.mlp.gate.register_forward_hook(lambda m, a, out: seen.append(("logits", out[0].detach())))
        for layer in model.model.layers
    ] + [
        layer.mlp.experts.register_forward_pre_hook(lambda m, args: seen.append(("experts", args[1], args[2].detach())))
        for layer in model.model.layers
    ]
    with RoutingReplayer(model, routed, rule=rule):
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    logits = [s[1] for s in seen if s[0] == "logits"]
    experts = [s[1:] for s in seen if s[0] == "experts"]
    for layer, (s, (indices, weights)) in enumerate(zip(logits, experts)):
        assert torch.equal(indices, routed[:, :, layer].reshape(-1, 2))
        for n in range(s.shape[0]):
            z = [math.exp(v) for v in s[n].double().tolist()]
            chosen = [z[i] for i in indices[n].tolist()]
            if rule == "restricted_softmax" or norm_topk_prob:
                expected = [c / sum(chosen) for c in chosen]  # g_i = exp(s_i) / Σ_{j∈I} exp(s_j)
            else:
                expected = [c / sum(z) for c in chosen]  # softmax over all E, gathered
            torch.testing.assert_close(weights[n].double(), torch.tensor(expected, dtype=torch.float64), atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_replaying_the_models_own_routing(arch):
    ids = tokens(3, 6, seed=6)
    for norm_topk_prob in (False, True):
        model = moe_model(arch, norm_topk_prob=norm_topk_prob)
        own = record(model, ids)
        reference = log_probs(model, ids)
        with RoutingReplayer(model, own, rule="router"):  # the router's own rule: bit-identical
            assert torch.equal(log_probs(model, ids), reference)
        with RoutingReplayer(model, None, rule="router"):
            assert torch.equal(log_probs(model, ids), reference)
        with RoutingReplayer(model, own):  # the paper's restricted softmax
            paper = log_probs(model, ids)
        if norm_topk_prob:  # the two rules coincide up to rounding
            torch.testing.assert_close(paper, reference, atol=1e-5, rtol=0)
        else:  # renormalising the top-k weights changes the model: documented, not a bug
            assert (paper - reference).abs().max() > 1e-4


def test_invalid_recorded_rows_fall_back_to_the_routers_own_choice():
    model = moe_model("qwen2_moe")
    ids = tokens(2, 5, seed=7)
    own = record(model, ids)
    foreign = random_routing(2, 5, 2, 2, 4, seed=8)
    partial = foreign.clone()
    partial[:, -1] = -1  # unrecorded last position
    partial[0, 1, 0, 1] = 4  # out of range (E = 4): the whole row is invalid
    with RoutingReplayer(model, partial), RoutingRecorder(model) as recorder:
        model(input_ids=ids)
    got = recorder.routed_experts(2)
    assert torch.equal(got[:, -1], own[:, -1])
    assert torch.equal(got[0, 1, 0], own[0, 1, 0])
    assert torch.equal(got[:, :-1, 1], foreign[:, :-1, 1])


def test_replayer_shape_errors():
    model = moe_model("qwen2_moe")
    with pytest.raises(ValueError, match=r"\(B, S, L=2, k=2\)"):
        RoutingReplayer(model, torch.zeros(2, 5, 3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="weight rule"):
        RoutingReplayer(model, None, rule="softmax")
    with RoutingReplayer(model, torch.zeros(2, 5, 2, 2, dtype=torch.long)), pytest.raises(ValueError, match="B·S"):
        model(input_ids=tokens(2, 4))


def test_replay_under_activation_checkpointing_gives_the_plain_gradient():
    ids = tokens(2, 6, seed=9)
    routed = random_routing(2, 6, 2, 2, 4, seed=10)
    grads = []
    for checkpointing in (False, True):
        model = moe_model("qwen3_moe").train()
        if checkpointing:
            enable_activation_checkpointing(model)
        with RoutingReplayer(model, routed):
            loss = -log_probs(model, ids).mean()
            loss.backward()  # the checkpointed routers run again here, still replaying
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    for plain, checkpointed in zip(*grads):
        torch.testing.assert_close(checkpointed, plain, atol=1e-6, rtol=1e-5)


def test_a_bf16_sampler_routes_differently_and_r3_replay_closes_the_routing_gap():
    model = moe_model("qwen2_moe", seed=2)
    sampler = copy.deepcopy(model).to(torch.bfloat16)
    ids = tokens(32, 32, seed=11)
    sampler_routing = record(sampler, ids)
    everywhere = torch.ones(32, 32, dtype=torch.bool)
    assert routing_agreement(sampler_routing, record(model, ids), everywhere)["routing/agreement"] < 1.0
    sampler_logp = log_probs(sampler, ids)
    plain_gap = (log_probs(model, ids) - sampler_logp).abs().mean()
    with RoutingReplayer(model, sampler_routing, rule="router"), RoutingRecorder(model) as recorder:
        replay_gap = (log_probs(model, ids) - sampler_logp).abs().mean()
    assert routing_agreement(sampler_routing, recorder.routed_experts(32), everywhere)["routing/agreement"] == 1.0
    assert replay_gap < plain_gap


# ----------------------------------------------------------------------------- replay_routing_weights


def test_replay_routing_weights_hand_values():
    s = torch.tensor([[0.0, math.log(3.0), 2.0, -1.0]], requires_grad=True)
    chosen = torch.tensor([[1, 0]])
    # restricted: exp(s) over {1, 0} = [3, 1] -> [3/4, 1/4]
    torch.testing.assert_close(replay_routing_weights(s, chosen), torch.tensor([[0.75, 0.25]]))
    # router, no renormalisation: [3, 1] / (1 + 3 + e² + e⁻¹) = [3, 1] / 11.7567
    z = 1 + 3 + math.exp(2) + math.exp(-1)
    torch.testing.assert_close(
        replay_routing_weights(s, chosen, rule="router", norm_topk_prob=False), torch.tensor([[3 / z, 1 / z]])
    )
    torch.testing.assert_close(replay_routing_weights(s, chosen, rule="router"), torch.tensor([[0.75, 0.25]]))
    # d g_1 / d s: only the recorded experts' logits get gradient (softmax Jacobian restricted to I)
    replay_routing_weights(s, chosen)[0, 0].backward()
    # ∂g₁/∂s₁ = g₁(1−g₁) = 3/16, ∂g₁/∂s₀ = −g₁g₀ = −3/16, others 0
    torch.testing.assert_close(s.grad, torch.tensor([[-3 / 16, 3 / 16, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="valid: restricted_softmax, router"):
        replay_routing_weights(s, chosen, rule="topk")


def _weights_reference(logits, indices, rule, norm_topk_prob):
    out = torch.zeros(indices.shape, dtype=torch.float64)
    for n in range(logits.shape[0]):
        z_all = sum(math.exp(v) for v in logits[n].tolist())
        z_chosen = sum(math.exp(logits[n, j].item()) for j in indices[n].tolist())
        for i, e in enumerate(indices[n].tolist()):
            num = math.exp(logits[n, e].item())
            renormalise = rule == "restricted_softmax" or norm_topk_prob
            out[n, i] = num / (z_chosen if renormalise else z_all)
    return out


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("rule,norm", [("restricted_softmax", False), ("router", False), ("router", True)])
def test_replay_routing_weights_match_the_loop_reference(seed, rule, norm):
    g = torch.Generator().manual_seed(seed)
    n, e = int(torch.randint(1, 9, (1,), generator=g)), int(torch.randint(2, 9, (1,), generator=g))
    k = int(torch.randint(1, e + 1, (1,), generator=g))
    logits = torch.randn(n, e, generator=g) * 3
    indices = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(n)])
    got = replay_routing_weights(logits, indices, rule=rule, norm_topk_prob=norm)
    torch.testing.assert_close(got.double(), _weights_reference(logits, indices, rule, norm), atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------- agreement and positions


def test_routing_agreement_hand_values():
    a = torch.tensor([[[[0, 1], [2, 3]], [[0, 1], [2, 3]], [[1, 2], [0, 3]]]])  # (B=1, S=3, L=2, k=2)
    b = torch.tensor([[[[1, 0], [2, 3]], [[0, 1], [2, 1]], [[9, 9], [9, 9]]]])
    mask = torch.tensor([[True, True, False]])
    # token 0: {0,1}={1,0}, {2,3}={2,3} -> 2/2 ; token 1: 1 of 2 layers ; token 2 masked
    # agreement = (2 + 1) / 4 = 0.75 ; all layers: token 0 only -> 1/2
    m = routing_agreement(a, b, mask)
    torch.testing.assert_close(m["routing/agreement"], torch.tensor(0.75))
    torch.testing.assert_close(m["routing/agreement_all_layers"], torch.tensor(0.5))
    assert routing_agreement(a, b, torch.zeros(1, 3, dtype=torch.bool))["routing/agreement"] == 0.0


def _agreement_reference(a, b, mask):
    pairs = agree_pairs = tokens_ = agree_tokens = 0
    for i in range(a.shape[0]):
        for t in range(a.shape[1]):
            if not mask[i, t]:
                continue
            tokens_ += 1
            all_layers = True
            for layer in range(a.shape[2]):
                pairs += 1
                same = set(a[i, t, layer].tolist()) == set(b[i, t, layer].tolist())
                agree_pairs += same
                all_layers &= same
            agree_tokens += all_layers
    return agree_pairs / max(pairs, 1), agree_tokens / max(tokens_, 1)


@pytest.mark.parametrize("seed", range(5))
def test_routing_agreement_matches_the_loop_reference(seed):
    g = torch.Generator().manual_seed(seed)
    b_, s, layers, e = (int(torch.randint(1, 5, (1,), generator=g)) for _ in range(4))
    e += 2
    k = int(torch.randint(1, e, (1,), generator=g))
    a = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(b_ * s * layers)]).reshape(b_, s, layers, k)
    flip = torch.rand(b_, s, layers, generator=g) < 0.3
    other = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(b_ * s * layers)]).reshape(b_, s, layers, k)
    bb = torch.where(flip[..., None], other, a.flip(-1))
    mask = torch.rand(b_, s, generator=g) < 0.7
    m = routing_agreement(a, bb, mask)
    pairs, all_layers = _agreement_reference(a, bb, mask)
    assert m["routing/agreement"].item() == pytest.approx(pairs)
    assert m["routing/agreement_all_layers"].item() == pytest.approx(all_layers)


@settings(deadline=None, max_examples=30)
@given(seed=st.integers(0, 10_000), garbage=st.integers(-5, 50))
def test_routing_agreement_ignores_masked_garbage_and_order_within_k(seed, garbage):
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, 6, (3, 4, 2, 2), generator=g)
    b = torch.randint(0, 6, (3, 4, 2, 2), generator=g)
    mask = torch.rand(3, 4, generator=g) < 0.5
    base = routing_agreement(a, b, mask)
    b_garbage = torch.where(mask[..., None, None], b, torch.full_like(b, garbage))
    for x, y in ((a, b_garbage), (b, a), (a.flip(-1), b)):
        m = routing_agreement(x, y, mask)
        for name in base:
            assert torch.equal(m[name], base[name])


def test_routed_positions_mask_hand_value_and_loop_reference():
    prompt = torch.tensor([[False, True, True], [True, True, True]])
    response = torch.tensor([[True, True, True, False], [True, True, True, True]])
    # completion j counts as an input when j+1 is counted; the last position never does
    expected = torch.tensor([[False, True, True, True, True, False, False], [True, True, True, True, True, True, False]])
    assert torch.equal(routed_positions_mask(prompt, response), expected)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        p = torch.rand(3, 4, generator=g) < 0.8
        r = torch.rand(3, 5, generator=g) < 0.8
        got = routed_positions_mask(p, r)
        for i in range(3):
            for t in range(9):
                want = bool(p[i, t]) if t < 4 else (t - 4 + 1 < 5 and bool(r[i, t - 4 + 1]))
                assert bool(got[i, t]) == want
