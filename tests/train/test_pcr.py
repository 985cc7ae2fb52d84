"""Tests for steadyrl.stabilisers.pcr (PCR / PCGrad / fixed-α combiners) and steadyrl.stabilisers.retention, plus e2e
runs of configs/pcr.yaml, pcgrad.yaml and grpo_kl.yaml on the tiny model.

Run: .venv/bin/python -m pytest -q tests/train/test_pcr.py
"""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

from resume_check import assert_resume_is_exact
from sevens_task import SevensTask
from steadyrl import registry
from steadyrl.config import ConfigError, MethodSpec
from steadyrl.config_load import load_config
from steadyrl.models import load_model, load_tokenizer
from steadyrl.ops import gradients as G
from steadyrl.report import read_metrics
from steadyrl.rollout.base import SamplingParams
from steadyrl.stabilisers.combiners import SumCombiner
from steadyrl.stabilisers.pcr import PCGradCombiner, PCRCombiner, SoftProjectionCombiner
from steadyrl.stabilisers.retention import RetentionLoss, retention_metrics
from steadyrl.tasks import ArithmeticTask
from steadyrl.tasks.demonstrations import demonstration_batch
from steadyrl.train.trainer import Trainer
from steadyrl.types import RolloutBatch

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core box they stall (30x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- a tiny model with an MLP


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(4, 6), nn.Linear(6, 4)

    def forward(self, h):
        return self.down(torch.tanh(self.up(h)))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn, self.mlp = nn.Linear(4, 4, bias=False), MLP()

    def forward(self, h):
        h = h + self.attn(h)
        return h + self.mlp(h)


class TinyNet(nn.Module):
    """Tracked blocks under modules=mlp: block.mlp.up, block.mlp.down; untracked: embed, block.attn, head."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed, self.block, self.head = nn.Linear(3, 4), Block(), nn.Linear(4, 2)
        self.double()

    def forward(self, x):
        return self.head(self.block(torch.tanh(self.embed(x))))


def micro_terms(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    out = model(x)
    policy = (out[:, 0] * target).mean() + 0.1 * out.pow(2).mean()
    # stability partly opposes plasticity, so some blocks conflict and some do not
    kl = -0.5 * policy + 0.3 * (out - target.unsqueeze(1)).pow(2).mean()
    return {"policy": policy, "kl": kl}


def make_batches(seed: int, count: int):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(2, 3, generator=gen, dtype=torch.float64), torch.randn(2, generator=gen, dtype=torch.float64))
        for _ in range(count)
    ]


def run_combiner(combiner, model, batches):
    params = list(model.parameters())
    model.zero_grad(set_to_none=True)
    combiner.begin(params)
    for x, target in batches:
        combiner.backward(micro_terms(model, x, target))
    metrics = combiner.finalize(params)
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}, metrics


def collected_gradients(model, batches):
    """Per micro-batch (g_pla_j, g_sta_j) as {name: tensor}, collected explicitly with autograd.grad."""
    names, params = zip(*model.named_parameters())
    samples = []
    for x, target in batches:
        terms = micro_terms(model, x, target)
        g_pla = torch.autograd.grad(terms["policy"], params, retain_graph=True)
        g_sta = torch.autograd.grad(terms["kl"], params)
        samples.append((dict(zip(names, g_pla)), dict(zip(names, g_sta))))
    return samples


def reference_combination(model, batches, *, method: str, modules: str = "mlp", alpha=None, add_stability=True):
    """The pure-math result (methods.md §2 implementable reading) on flat per-module gradients."""
    samples = collected_gradients(model, batches)
    count = len(samples)
    names = [n for n, _ in model.named_parameters()]
    owner = {n: n.rpartition(".")[0] for n in names}
    tracked = OrderedDict()
    for n in names:
        if modules == "all" or "mlp" in owner[n].split("."):
            tracked.setdefault(owner[n], []).append(n)
    grads = {n: sum(gp[n] + gs[n] for gp, gs in samples) for n in names}  # plain sum for untracked
    stats = {"alpha": [], "dot": [], "sq_pla": [], "sq_sta": [], "final_dot": [], "final_sq": []}
    for members in tracked.values():
        flat_p = torch.stack([torch.cat([gp[n].reshape(-1) for n in members]) for gp, _ in samples])  # (J, D)
        flat_s = torch.stack([torch.cat([gs[n].reshape(-1) for n in members]) for _, gs in samples])
        mu_p, mu_s = flat_p.mean(0), flat_s.mean(0)
        if method == "pcgrad":
            p1, p2 = G.pcgrad_project(mu_p, mu_s)
            final = count * (p1 + p2)
        else:
            if alpha is None:
                var_p = G.trace_variance(flat_p.sum(0), (flat_p * flat_p).sum(), count)
                var_s = G.trace_variance(flat_s.sum(0), (flat_s * flat_s).sum(), count)
                block_alpha = G.pcr_alpha(var_p, var_s)
            else:
                block_alpha = torch.tensor(alpha, dtype=torch.float64)
            g = G.pcr_soft_projection(mu_p, mu_s, block_alpha)
            final = count * (g + mu_s) if add_stability else count * g
            stats["alpha"].append(block_alpha)
        stats["dot"].append(G.inner_product(mu_p, mu_s))
        stats["sq_pla"].append(G.inner_product(mu_p, mu_p))
        stats["sq_sta"].append(G.inner_product(mu_s, mu_s))
        stats["final_dot"].append(G.inner_product(final / count, mu_s))
        stats["final_sq"].append(G.inner_product(final / count, final / count))
        offset = 0
        for n in members:
            size = grads[n].numel()
            grads[n] = final[offset : offset + size].view_as(grads[n])
            offset += size
    return grads, {k: torch.stack(v) for k, v in stats.items() if v}


def cosine(dot, sq_a, sq_b) -> float:
    return (dot / math.sqrt(sq_a * sq_b)).item()


def assert_grads_close(actual, expected):
    assert actual.keys() == expected.keys()
    for name in actual:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-10, atol=1e-12, msg=name)


# ----------------------------------------------------------------------------- hand-computed combiner example


class HandNet(nn.Module):
    """mlp.proj.weight w ∈ R² (tracked) and a root parameter u (untracked); the terms are linear in both."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Module()
        self.mlp.proj = nn.Linear(2, 1, bias=False).double()
        self.u = nn.Parameter(torch.zeros(1, dtype=torch.float64))


def hand_run(combiner):
    # ∇_w policy_j = a_j, ∇_w kl_j = b_j ;  ∇_u policy_j = p_j, ∇_u kl_j = q_j
    a, b = [(2.0, 1.0), (0.0, 1.0)], [(-1.0, 1.0), (-1.0, -1.0)]
    p, q = [1.0, 2.0], [3.0, -1.0]
    net = HandNet()
    params = list(net.parameters())
    combiner.model = net
    combiner.begin(params)
    w = net.mlp.proj.weight[0]
    for j in range(2):
        policy = (w * torch.tensor(a[j], dtype=torch.float64)).sum() + p[j] * net.u.sum()
        kl = (w * torch.tensor(b[j], dtype=torch.float64)).sum() + q[j] * net.u.sum()
        combiner.backward({"policy": policy, "kl": kl})
    metrics = combiner.finalize(params)
    return net.mlp.proj.weight.grad[0].tolist(), net.u.grad.tolist(), {k: v.item() for k, v in metrics.items()}


def test_pcr_hand_computed():
    # μ_pla = (1,1), S_pla = (2,2), Q_pla = 5 + 1 = 6 -> σ²_pla = (6 − 8/2)/1 = 2
    # μ_sta = (−1,0), S_sta = (−2,0), Q_sta = 2 + 2 = 4 -> σ²_sta = (4 − 4/2)/1 = 2 -> α = 2/4 = 0.5
    # c = ⟨μ_pla, μ_sta⟩ = −1 < 0, ‖μ_sta‖² = 1: g = (1,1) − 0.5·(−1)·(−1,0) = (0.5, 1)
    # grad_w = J·(g + μ_sta) = 2·(−0.5, 1) = (−1, 2) ; grad_u = Σ p + Σ q = 3 + 2 = 5 (untracked: plain sum)
    grad_w, grad_u, m = hand_run(PCRCombiner())
    assert grad_w == pytest.approx([-1.0, 2.0]) and grad_u == [5.0]
    assert m["pcr/alpha_mean"] == m["pcr/alpha_min"] == m["pcr/alpha_max"] == pytest.approx(0.5)
    assert m["pcr/conflict_frac"] == 1.0 and m["pcr/samples"] == 2.0
    # cos(μ_pla, μ_sta) = −1/(√2·1) = −0.70711 ; cos(grad, μ_sta) = ⟨(−1,2),(−1,0)⟩/(√5·1) = 1/√5 = 0.44721
    assert m["pcr/cos_pla_sta"] == pytest.approx(-1 / math.sqrt(2)) == m["pcr/cos_pla_sta_min"]
    assert m["pcr/cos_final_sta"] == pytest.approx(1 / math.sqrt(5))
    # add_stability=False: grad_w = J·g = (1, 2)
    grad_w, _, _ = hand_run(PCRCombiner(add_stability=False))
    assert grad_w == pytest.approx([1.0, 2.0])


def test_pcgrad_and_fixed_alpha_hand_computed():
    # PCGrad on sums: S_pla' = (2,2) − (⟨S_p,S_s⟩ = −4)/(‖S_s‖² = 4)·(−2,0) = (0,2)
    #                 S_sta' = (−2,0) − (−4/8)·(2,2) = (−1,1) ;  grad_w = (−1, 3)
    grad_w, grad_u, m = hand_run(PCGradCombiner())
    assert grad_w == pytest.approx([-1.0, 3.0]) and grad_u == [5.0]
    assert "pcr/alpha_mean" not in m and m["pcr/conflict_frac"] == 1.0
    # fixed α = 0.2: g = (1,1) − 0.2·(−1)·(−1,0) = (0.8, 1); grad_w = 2·((0.8,1) + (−1,0)) = (−0.4, 2)
    grad_w, _, m = hand_run(SoftProjectionCombiner(alpha=0.2))
    assert grad_w == pytest.approx([-0.4, 2.0]) and m["pcr/alpha_mean"] == pytest.approx(0.2)
    # fixed α = 0 is the plain sum S_pla + S_sta = (2,2) + (−2,0) = (0, 2)
    grad_w, _, _ = hand_run(SoftProjectionCombiner(alpha=0.0))
    assert grad_w == pytest.approx([0.0, 2.0])


# ----------------------------------------------------------------------------- combiner == pure math on collected grads


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("modules", ["mlp", "all"])
@pytest.mark.parametrize("add_stability", [True, False])
def test_pcr_reproduces_pure_math_on_collected_gradients(seed, modules, add_stability):
    batches = make_batches(seed, count=5)
    expected, stats = reference_combination(
        TinyNet(seed), batches, method="pcr", modules=modules, add_stability=add_stability
    )
    model = TinyNet(seed)
    grads, m = run_combiner(PCRCombiner(model=model, modules=modules, add_stability=add_stability), model, batches)
    assert_grads_close(grads, expected)
    assert m["pcr/alpha_mean"].item() == pytest.approx(stats["alpha"].mean().item())
    assert m["pcr/alpha_min"].item() == pytest.approx(stats["alpha"].min().item())
    assert m["pcr/alpha_max"].item() == pytest.approx(stats["alpha"].max().item())
    assert m["pcr/conflict_frac"].item() == pytest.approx((stats["dot"] < 0).double().mean().item())
    assert m["pcr/cos_pla_sta"].item() == pytest.approx(
        cosine(stats["dot"].sum(), stats["sq_pla"].sum(), stats["sq_sta"].sum())
    )
    assert m["pcr/cos_final_sta"].item() == pytest.approx(
        cosine(stats["final_dot"].sum(), stats["final_sq"].sum(), stats["sq_sta"].sum())
    )
    assert m["pcr/samples"].item() == 5.0


def test_the_test_model_has_conflicting_and_agreeing_blocks():
    # guards the test above against a setup where the projection never triggers
    fracs = []
    for seed in range(3):
        model = TinyNet(seed)
        _, m = run_combiner(PCRCombiner(model=model, modules="all"), model, make_batches(seed, 5))
        fracs.append(m["pcr/conflict_frac"].item())
    assert max(fracs) > 0 and min(fracs) < 1


@pytest.mark.parametrize("alpha", [0.2, 0.8])
def test_fixed_alpha_reproduces_pure_math(alpha):
    batches = make_batches(7, count=4)
    expected, _ = reference_combination(TinyNet(7), batches, method="fixed", alpha=alpha, modules="all")
    model = TinyNet(7)
    grads, m = run_combiner(SoftProjectionCombiner(model=model, alpha=alpha, modules="all"), model, batches)
    assert_grads_close(grads, expected)
    assert m["pcr/alpha_min"].item() == m["pcr/alpha_max"].item() == pytest.approx(alpha)


@pytest.mark.parametrize("modules", ["mlp", "all"])
def test_pcgrad_reproduces_pure_math(modules):
    batches = make_batches(11, count=3)
    expected, _ = reference_combination(TinyNet(11), batches, method="pcgrad", modules=modules)
    model = TinyNet(11)
    grads, _ = run_combiner(PCGradCombiner(model=model, modules=modules), model, batches)
    assert_grads_close(grads, expected)


def test_global_block_is_one_projection_of_the_concatenated_gradient():
    batches = make_batches(5, count=3)
    samples = collected_gradients(TinyNet(5), batches)
    names = [n for n, _ in TinyNet(5).named_parameters()]
    flat_p = sum(torch.cat([gp[n].reshape(-1) for n in names]) for gp, _ in samples)
    flat_s = sum(torch.cat([gs[n].reshape(-1) for n in names]) for _, gs in samples)
    p1, p2 = G.pcgrad_project(flat_p, flat_s)
    model = TinyNet(5)
    grads, m = run_combiner(PCGradCombiner(model=model, modules="all", blocks="global"), model, batches)
    torch.testing.assert_close(torch.cat([grads[n].reshape(-1) for n in names]), p1 + p2)
    assert m["pcr/conflict_frac"].item() in (0.0, 1.0)  # one block


def test_sum_and_pcr_with_alpha_zero_agree():
    batches = make_batches(3, count=4)
    model = TinyNet(3)
    plain, _ = run_combiner(SumCombiner(), model, batches)
    model = TinyNet(3)
    zero, _ = run_combiner(SoftProjectionCombiner(model=model, alpha=0.0, modules="all"), model, batches)
    assert_grads_close(zero, plain)
    # PCR with J = 1 sample: both variances are 0 -> α = 0 -> the plain sum
    model = TinyNet(3)
    plain_one, _ = run_combiner(SumCombiner(), model, batches[:1])
    model = TinyNet(3)
    pcr_one, m = run_combiner(PCRCombiner(model=model, modules="all"), model, batches[:1])
    assert_grads_close(pcr_one, plain_one)
    assert m["pcr/alpha_max"].item() == 0.0


class Experts(nn.Module):
    """An MLP with two experts; micro-batch j uses expert j % 2 only (an MoE expert unused by a sample)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.embed = nn.Linear(3, 4)
        self.mlp = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])
        self.head = nn.Linear(4, 2)
        self.double()


def test_pcr_with_parameters_a_sample_does_not_use():
    batches = make_batches(9, count=5)

    def terms(model, j):
        x, target = batches[j]
        out = model.head(model.mlp[j % 2](torch.tanh(model.embed(x))))
        policy = (out[:, 0] * target).mean()
        return {"policy": policy, "kl": -0.5 * policy + 0.3 * (out - target.unsqueeze(1)).pow(2).mean()}

    reference = Experts()
    names, params = zip(*reference.named_parameters())
    samples = []  # unused parameters get zero gradients in the pure-math reading
    for j in range(len(batches)):
        t = terms(reference, j)
        g_pla = torch.autograd.grad(t["policy"], params, retain_graph=True, allow_unused=True)
        g_sta = torch.autograd.grad(t["kl"], params, allow_unused=True)
        zero = lambda g, p: torch.zeros_like(p) if g is None else g  # noqa: E731
        samples.append(([zero(g, p) for g, p in zip(g_pla, params)], [zero(g, p) for g, p in zip(g_sta, params)]))
    count = len(samples)
    expected = {}
    for expert in (0, 1):
        members = [i for i, n in enumerate(names) if n.startswith(f"mlp.{expert}.")]
        flat_p = torch.stack([torch.cat([gp[i].reshape(-1) for i in members]) for gp, _ in samples])
        flat_s = torch.stack([torch.cat([gs[i].reshape(-1) for i in members]) for _, gs in samples])
        var_p = G.trace_variance(flat_p.sum(0), (flat_p * flat_p).sum(), count)
        var_s = G.trace_variance(flat_s.sum(0), (flat_s * flat_s).sum(), count)
        g = G.pcr_soft_projection(flat_p.mean(0), flat_s.mean(0), G.pcr_alpha(var_p, var_s))
        final, offset = count * (g + flat_s.mean(0)), 0
        for i in members:
            expected[names[i]] = final[offset : offset + params[i].numel()].view_as(params[i])
            offset += params[i].numel()
    model = Experts()
    combiner = PCRCombiner(model=model)
    combiner.begin(list(model.parameters()))
    for j in range(len(batches)):
        combiner.backward(terms(model, j))
    combiner.finalize(list(model.parameters()))
    for name, param in model.named_parameters():
        if name in expected:
            torch.testing.assert_close(param.grad, expected[name], rtol=1e-10, atol=1e-12, msg=name)
    assert ((combiner.statistics["alpha"] > 0) & (combiner.statistics["alpha"] < 1)).all()


def test_stability_term_without_gradient_gives_the_policy_gradient():
    model = TinyNet(2)
    x, target = make_batches(2, 1)[0]
    params = list(model.parameters())
    expected = torch.autograd.grad(micro_terms(model, x, target)["policy"], params)
    combiner = PCRCombiner(model=model)
    combiner.begin(params)
    combiner.backward({"policy": micro_terms(model, x, target)["policy"], "kl": torch.zeros((), dtype=torch.float64)})
    m = combiner.finalize(params)
    for p, g in zip(params, expected):
        torch.testing.assert_close(p.grad, g)
    assert m["pcr/cos_pla_sta"].item() == 0.0 and m["pcr/conflict_frac"].item() == 0.0


def test_bf16_parameters_get_bf16_gradients_from_fp32_statistics():
    model = TinyNet(0).to(torch.bfloat16)
    params = list(model.parameters())
    combiner = PCRCombiner(model=model)
    combiner.begin(params)
    for x, target in make_batches(0, 3):
        combiner.backward(micro_terms(model, x.bfloat16(), target.bfloat16()))
    combiner.finalize(params)
    assert all(p.grad.dtype == torch.bfloat16 and torch.isfinite(p.grad).all() for p in params)


def test_errors_a_person_can_act_on():
    model = TinyNet(0)
    combiner = PCRCombiner(model=model)
    combiner.begin(list(model.parameters()))
    x, target = make_batches(0, 1)[0]
    with pytest.raises(ValueError, match="kl.coef > 0 or retention.coef > 0"):
        combiner.backward({"policy": micro_terms(model, x, target)["policy"]})
    with pytest.raises(ConfigError, match="valid: mlp, all"):
        PCRCombiner(model=model, modules="attention")
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        SoftProjectionCombiner(model=model, alpha=1.5)
    no_mlp = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(ConfigError, match="modules=all"):
        PCRCombiner(model=no_mlp).begin(list(no_mlp.parameters()))


def test_registry_builds_the_combiners_with_their_hyperparameters():
    model = TinyNet(0)
    built = registry.build("combiner", MethodSpec("fixed_alpha", {"alpha": 0.8, "modules": "all"}), model=model)
    assert isinstance(built, SoftProjectionCombiner) and built.alpha == 0.8 and built.modules == "all"
    assert isinstance(registry.build("combiner", "pcr", model=model), PCRCombiner)
    assert isinstance(registry.build("combiner", "pcgrad", model=model), PCGradCombiner)
    with pytest.raises(ConfigError, match="alpha"):
        registry.build("combiner", MethodSpec("pcr", {"alpha": 0.5}), model=model)


# ----------------------------------------------------------------------------- retention


@pytest.fixture(scope="module")
def tiny_lm(tiny_model_dir):
    return load_model(tiny_model_dir).double(), load_tokenizer(tiny_model_dir)


@torch.no_grad()
def reference_token_mean_nll(model, ids, mask, labels) -> float:
    """Loop reference: mean over rows i, positions t with a label of −log softmax(logits[i, t−1])[label]."""
    logits = model(input_ids=ids, attention_mask=mask).logits.double()
    total, count = 0.0, 0
    for i in range(ids.shape[0]):
        for t in range(1, ids.shape[1]):
            if labels[i, t] != -100:
                total -= torch.log_softmax(logits[i, t - 1], dim=-1)[labels[i, t]].item()
                count += 1
    return total / count


def test_retention_loss_shares_sum_to_the_token_mean_nll(tiny_lm):
    model, tok = tiny_lm
    task = ArithmeticTask(operations="-")
    loss = RetentionLoss(model, tok, task, batch_size=7, coef=0.3, seed=1, step_fn=lambda: 4)
    shares = [loss(j, 3)["retention"] for j in range(3)]  # 7 rows -> chunks of 3, 2, 2
    loss._draw(4)
    ids, mask, labels = loss._batch
    expected = 0.3 * reference_token_mean_nll(model, ids, mask, labels)
    assert sum(shares).item() == pytest.approx(expected, rel=1e-9)
    # the same as HF's own (fp32) causal-LM loss
    hf_loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss.item()
    assert sum(shares).item() == pytest.approx(0.3 * hf_loss, rel=1e-6)
    assert all(s.requires_grad for s in shares)
    # two ranks split the same batch: their shares sum to the same total
    ranks = [
        RetentionLoss(model, tok, task, batch_size=7, coef=0.3, seed=1, step_fn=lambda: 4, rank=r, world_size=2)
        for r in range(2)
    ]
    assert sum(rk(j, 2)["retention"] for rk in ranks for j in range(2)).item() == pytest.approx(expected, rel=1e-9)


def test_retention_loss_draws_a_new_batch_per_step_and_handles_empty_chunks(tiny_lm):
    model, tok = tiny_lm
    task = ArithmeticTask(operations="-")
    step = {"value": 0}
    loss = RetentionLoss(model, tok, task, batch_size=2, coef=1.0, seed=0, step_fn=lambda: step["value"])
    first = loss(0, 1)["retention"].item()
    assert loss(0, 1)["retention"].item() == first  # same step, same batch
    step["value"] = 1
    assert loss(0, 1)["retention"].item() != first  # next optimizer step, fresh batch
    empty = loss(3, 4)["retention"]  # 2 rows over 4 micro-batches: chunk 3 is empty
    assert empty.item() == 0.0 and not empty.requires_grad
    # the default step counter advances once per optimizer step (after the last micro-batch)
    counted = RetentionLoss(model, tok, task, batch_size=2, coef=1.0, seed=0)
    a = counted(0, 2)["retention"].item() + counted(1, 2)["retention"].item()
    b = counted(0, 2)["retention"].item() + counted(1, 2)["retention"].item()
    assert a != b


class AnswerBackend:
    """A rollout backend stub that answers every prompt correctly (or wrongly)."""

    def __init__(self, tokenizer, answers: dict[str, str], correct: bool = True) -> None:
        self.tok, self.answers, self.correct = tokenizer, answers, correct

    def generate(self, prompt_ids, prompt_mask, params: SamplingParams, generator=None) -> RolloutBatch:
        rows = []
        for ids, mask in zip(prompt_ids.tolist(), prompt_mask.tolist()):
            text = self.tok.decode([t for t, m in zip(ids, mask) if m], skip_special_tokens=True)
            answer = self.answers[text] if self.correct else self.answers[text] + "1"
            rows.append(self.tok(answer, add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id])
        width = max(map(len, rows))
        completion = torch.tensor([r + [self.tok.pad_token_id] * (width - len(r)) for r in rows])
        response_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], dtype=torch.bool)
        return RolloutBatch(
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask,
            completion_ids=completion,
            response_mask=response_mask,
            rollout_logprobs=torch.zeros(completion.shape),
            truncated=torch.zeros(len(rows), dtype=torch.bool),
        )


@pytest.mark.parametrize("correct", [True, False])
def test_retention_metrics(tiny_lm, correct):
    import random

    model, tok = tiny_lm
    task = ArithmeticTask(operations="-", eval_size=10)
    prompts = task.eval_prompts()
    answers = {p.text: p.answer for p in prompts}
    backend = AnswerBackend(tok, answers, correct=correct)
    model.train()
    metrics = retention_metrics(model, tok, task, prompts, backend=backend, batch_size=3)
    # NLL: one forward over all 10 demonstrations, mean over every labelled token (not a mean of batch means)
    ids, mask, labels = demonstration_batch(task, tok, prompts, random.Random(0), "cpu")
    assert metrics["retention/nll"] == pytest.approx(reference_token_mean_nll(model, ids, mask, labels), rel=1e-9)
    assert metrics["retention/accuracy"] == (1.0 if correct else 0.0)
    assert model.training  # the NLL pass runs in eval mode and restores the mode


# ----------------------------------------------------------------------------- e2e: the recipes, 2 steps on the tiny model


def _recipe(name, tiny_model_dir, tmp_path, *extra):
    return load_config(
        CONFIGS / f"{name}.yaml",
        [
            f"model.name_or_path={tiny_model_dir}",
            "rollout.prompts_per_step=4",
            "rollout.group_size=4",
            "rollout.max_new_tokens=4",
            "optim.micro_batch_size=4",  # = group_size, as in the recipes
            "optim.steps=2",
            "optim.lr=1e-2",
            "kl.coef=0.5",
            "eval.every=2",
            "eval.num_prompts=4",
            "eval.pass_k=0",
            "retention.eval_prompts=4",
            "retention.batch_size=4",
            "logging.progress=false",
            "logging.report=false",
            "logging.tensorboard=false",
            "checkpoint.save_final_model=false",
            f"run.output_dir={tmp_path / name}",
            "run.device=cpu",
            *extra,
        ],
    )


def _check_run(cfg, trainer):
    rows = read_metrics(cfg.run.output_dir)
    train_rows = [r for r in rows if "grad/norm" in r]
    assert [r["step"] for r in train_rows] == [1, 2]
    for row in rows:
        for key, value in row.items():
            assert math.isfinite(value), f"step {row['step']}: {key} = {value}"
    evals = [r for r in rows if "retention/nll" in r]
    assert [r["step"] for r in evals] == [0, 2]  # the retention measure runs at every eval
    return train_rows


@pytest.mark.parametrize("recipe", ["pcr", "pcgrad", "grpo_kl"])
def test_recipes_train_two_steps(recipe, tiny_model_dir, tmp_path):
    cfg = _recipe(recipe, tiny_model_dir, tmp_path)
    trainer = Trainer(cfg, task=SevensTask())
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    train_rows = _check_run(cfg, trainer)
    assert any(not torch.equal(b, p) for b, p in zip(before, trainer.model.parameters()))
    pcr_keys = {"pcr/conflict_frac", "pcr/cos_pla_sta", "pcr/cos_final_sta"}
    if recipe == "pcr":
        pcr_keys |= {"pcr/alpha_mean", "pcr/alpha_min", "pcr/alpha_max"}
    if recipe == "grpo_kl":
        assert not any(k.startswith("pcr/") for k in train_rows[-1])
    else:
        assert pcr_keys <= train_rows[-1].keys()
        assert train_rows[-1]["pcr/samples"] == 4.0  # 16 completions / micro-batches of 4


def test_pcr_with_the_retention_loss_as_the_stability_term(tiny_model_dir, tmp_path):
    cfg = _recipe("pcr", tiny_model_dir, tmp_path, "kl.coef=0", "retention.coef=0.5")
    trainer = Trainer(cfg, task=SevensTask())
    trainer.train()
    train_rows = _check_run(cfg, trainer)
    # retention chunks differ per micro-batch, so σ²_sta > 0 and α is strictly inside (0, 1)
    assert 0.0 < train_rows[-1]["pcr/alpha_mean"] < 1.0
    assert train_rows[-1]["pcr/cos_pla_sta"] != 0.0


def test_resume_is_exact_with_pcr_and_the_retention_loss(tiny_model_dir, tmp_path):
    # the retention batch is seeded by the scheduler's step count, which the checkpoint restores
    def config_for(out):
        return _recipe(
            "pcr", tiny_model_dir, tmp_path, "retention.coef=0.5", "optim.steps=3", "checkpoint.every=1",
            "eval.every=0", f"run.output_dir={out}",
        )  # fmt: skip

    assert_resume_is_exact(config_for, tmp_path, stop_after=2)
