"""CapoFilter (CAPO, arXiv 2510.00819, methods.md §4) on a tiny model: scores vs autograd brute force through
the real LM head, masks, soft penalty, the optimizer-model moment update, and 2-step runs of the recipes.

    .venv/bin/python -m pytest -q tests/train/test_capo.py
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from sevens_task import SevensTask
from steadyrl import registry
from steadyrl.config import ConfigError, MethodSpec
from steadyrl.config_load import load_config
from steadyrl.models import build_tiny_model, tiny_model_config
from steadyrl.ops import curvature as cv
from steadyrl.report import read_metrics
from steadyrl.stabilisers.capo import CapoFilter
from steadyrl.train.trainer import Trainer
from steadyrl.types import LossInputs

LR = 0.05
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture(scope="module")
def tiny():
    model = build_tiny_model(
        tiny_model_config("qwen2", vocab_size=23, hidden_size=16, num_layers=1, num_heads=2), seed=0
    )
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, 23, (3, 6), generator=gen)
    with torch.no_grad():
        hidden = model.base_model(input_ids=input_ids).last_hidden_state  # (3, 6, 16)
    token_ids = torch.randint(0, 23, (3, 6), generator=gen)
    advantages = torch.randn(3, 1, generator=gen).expand(3, 6).contiguous()
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[0, 4:] = False
    mask[2, 5] = False
    return model, hidden, token_ids, advantages, mask


def midpoint(values: torch.Tensor, q: float = 0.5) -> float:
    """A threshold halfway between two neighbouring sorted values, so fp32 vs fp64 rounding cannot flip a token."""
    ordered = values.double().flatten().sort().values
    i = max(1, min(len(ordered) - 1, int(q * len(ordered))))
    return float(ordered[i - 1] + ordered[i]) / 2


def loss_inputs(advantages, mask, token_ids):
    zeros = torch.zeros_like(advantages)
    return LossInputs(
        logprobs=zeros, old_logprobs=zeros, advantages=advantages, response_mask=mask, token_ids=token_ids
    )


def random_state(vocab, width, rows, seed=1, step=2):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randperm(vocab, generator=gen)[:rows]
    row_of = torch.full((vocab,), -1, dtype=torch.long)
    row_of[ids] = torch.arange(rows)
    exp_avg = 0.05 * torch.randn(rows, width, generator=gen)
    exp_avg_sq = 0.01 * torch.rand(rows, width, generator=gen)
    return {"step": step, "row_of": row_of, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}


def brute_force_scores(model, hidden, token_ids, advantages, kind, state, weight_decay, top_k):
    """Per token: g_t = ∇_W Â (z_a·[a ∈ top-K] − logsumexp z_topK) by autograd through the model's own LM head
    (tied to the embeddings); U_t by explicit Adam on its K rows; δz_t, F_t and the scores by hand."""
    head = model.get_output_embeddings()
    batch, length, _ = hidden.shape
    fisher = torch.zeros(batch, length, dtype=torch.float64)
    hessian = torch.zeros(batch, length, dtype=torch.float64)
    t_next = state["step"] + 1
    for b in range(batch):
        for t in range(length):
            h = hidden[b, t].detach()
            logits_all = (head.weight @ h).detach()
            ids = logits_all.topk(min(top_k, logits_all.numel())).indices
            head.weight.grad = None
            logits = head.weight[ids] @ h
            objective = advantages[b, t] * (logits[ids == token_ids[b, t]].sum() - torch.logsumexp(logits, 0))
            objective.backward()
            grad = head.weight.grad[ids].double()  # only the K rows are non-zero
            assert torch.count_nonzero(head.weight.grad.abs().sum(-1)) <= len(ids)
            update = grad.clone()
            if kind != "sgd":
                for slot, j in enumerate(ids.tolist()):
                    row = int(state["row_of"][j])
                    m = state["exp_avg"][row].double() if row >= 0 else torch.zeros_like(grad[slot])
                    v = state["exp_avg_sq"][row].double() if row >= 0 else torch.zeros_like(grad[slot])
                    m1 = (0.9 * m + 0.1 * grad[slot]) / (1 - 0.9**t_next)
                    v1 = (0.999 * v + 0.001 * grad[slot] ** 2) / (1 - 0.999**t_next)
                    update[slot] = m1 / (v1.sqrt() + 1e-8)
                if kind == "adamw":
                    update = update - weight_decay * head.weight.detach()[ids].double()
            delta = update @ h.double()
            probs = torch.softmax(logits.detach().double(), 0)
            v_t = (ids == token_ids[b, t]).double() - probs
            s = float(v_t @ delta)
            fisher_matrix = torch.diag(probs) - torch.outer(probs, probs)
            coeff = float(advantages[b, t]) * (s * s - float(delta @ fisher_matrix @ delta))
            fisher[b, t] = 0.5 * LR**2 * s * s
            hessian[b, t] = LR * float((grad * update).sum()) + 0.5 * LR**2 * coeff
    head.weight.grad = None
    return fisher, hessian


@pytest.mark.parametrize(("kind", "weight_decay"), [("sgd", 0.0), ("adam", 0.0), ("adamw", 0.1)])
def test_scores_and_mask_equal_brute_force_on_the_tiny_model(tiny, kind, weight_decay):
    model, hidden, token_ids, advantages, mask = tiny
    top_k = 7
    state = random_state(23, 16, rows=15)
    fisher, hessian = brute_force_scores(
        model, hidden, token_ids, advantages, kind, state, weight_decay, top_k
    )
    head = model.get_output_embeddings()
    moments = cv.AdamMoments(state["row_of"], state["exp_avg"], state["exp_avg_sq"], state["step"])
    topk = cv.topk_policy(hidden, head.weight.detach(), token_ids, top_k=top_k)
    scores = cv.token_curvature_scores(
        hidden, topk, advantages, LR, optimizer_model=kind, moments=moments if kind != "sgd" else None,
        lm_head_weight=head.weight.detach(), weight_decay=weight_decay, chunk_size=5,
    )  # fmt: skip
    torch.testing.assert_close(scores.fisher.double(), fisher, rtol=1e-4, atol=1e-10)
    torch.testing.assert_close(scores.hessian.double(), hessian, rtol=1e-4, atol=1e-10)
    # The filter with thresholds at the brute-force medians rejects exactly the tokens the formulas say.
    fisher_tau = midpoint(fisher[mask])
    hessian_tau = midpoint(hessian[mask].abs())
    capo = CapoFilter(
        model=model, fisher_tau=fisher_tau, hessian_tau=hessian_tau, optimizer_model=kind,
        weight_decay=weight_decay, top_k=top_k,
    )  # fmt: skip
    if kind != "sgd":
        capo.load_state_dict(state)
    keep, weights, _, metrics = capo(loss_inputs(advantages, mask, token_ids), hidden, LR)
    expected = (fisher < fisher_tau) & (hessian.abs() < hessian_tau) & mask
    assert torch.equal(keep, expected)
    assert torch.equal(weights, torch.ones_like(weights))
    rejected = 1 - expected.sum().item() / mask.sum().item()
    assert metrics["capo/rejected_frac"].item() == pytest.approx(rejected)
    assert metrics["capo/fisher_max"].item() == pytest.approx(float(fisher[mask].max()), rel=1e-4)
    assert metrics["capo/fisher_q50"].item() == pytest.approx(float(fisher[mask].quantile(0.5)), rel=1e-4)
    assert metrics["capo/hessian_abs_q90"].item() == pytest.approx(
        float(hessian[mask].abs().quantile(0.9)), rel=1e-4
    )
    assert 0 < rejected < 1


def reference_step_means(calls):
    """Loop reference of the moment update's input: mean over kept (t, k) of Â_t v_t[k] h_t per vocab id."""
    sums, counts = {}, {}
    for hidden, topk, advantages, kept in calls:
        for b in range(hidden.shape[0]):
            for t in range(hidden.shape[1]):
                if not kept[b, t]:
                    continue
                for slot in range(topk.ids.shape[-1]):
                    j = int(topk.ids[b, t, slot])
                    row = float(advantages[b, t]) * float(topk.direction[b, t, slot]) * hidden[b, t].double()
                    sums[j] = sums.get(j, 0) + row
                    counts[j] = counts.get(j, 0) + 1
    return {j: sums[j] / counts[j] for j in sums}


def test_moment_update_from_two_micro_batches_matches_a_loop(tiny):
    model, hidden, token_ids, advantages, mask = tiny
    capo = CapoFilter(model=model, fisher_tau=0.0, hessian_tau=0.05, optimizer_model="adam", top_k=5)
    head = model.get_output_embeddings().weight.detach()
    calls = []
    for rows in (slice(0, 2), slice(2, 3)):  # two micro-batches of one optimizer step
        keep, *_ = capo(loss_inputs(advantages[rows], mask[rows], token_ids[rows]), hidden[rows], LR)
        topk = cv.topk_policy(hidden[rows], head, token_ids[rows], top_k=5)
        calls.append((hidden[rows], topk, advantages[rows], keep))
    assert capo.moments is None  # nothing changes until the optimizer step
    capo.after_step()
    first = reference_step_means(calls)
    moments = capo.moments
    assert moments.step == 1 and moments.exp_avg.shape[0] == len(first)
    for j, g in first.items():  # m = (1 − β₁) g, v = (1 − β₂) g² from zero
        row = int(moments.row_of[j])
        torch.testing.assert_close(moments.exp_avg[row].double(), 0.1 * g, rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(moments.exp_avg_sq[row].double(), 0.001 * g * g, rtol=1e-5, atol=1e-10)
    # Second step on one sequence: touched ids move, the others keep their moments (no decay).
    before = {
        j: (moments.exp_avg[moments.row_of[j]].clone(), moments.exp_avg_sq[moments.row_of[j]].clone())
        for j in first
    }
    keep, *_ = capo(loss_inputs(advantages[:1], mask[:1], token_ids[:1]), hidden[:1], LR)
    second = reference_step_means(
        [(hidden[:1], cv.topk_policy(hidden[:1], head, token_ids[:1], top_k=5), advantages[:1], keep)]
    )
    capo.after_step()
    moments = capo.moments
    assert moments.step == 2
    for j in set(first) | set(second):
        m, v = moments.exp_avg[moments.row_of[j]].double(), moments.exp_avg_sq[moments.row_of[j]].double()
        m0, v0 = (t.double() for t in before.get(j, (torch.zeros(16), torch.zeros(16))))
        if j in second:
            m0, v0 = 0.9 * m0 + 0.1 * second[j], 0.999 * v0 + 0.001 * second[j] ** 2
        torch.testing.assert_close(m, m0, rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(v, v0, rtol=1e-5, atol=1e-10)
    capo.after_step()  # a step without calls changes nothing
    assert capo.moments.step == 2


def test_soft_penalty_replaces_the_mask_and_is_differentiable(tiny):
    model, hidden, token_ids, advantages, mask = tiny
    inputs = loss_inputs(advantages, mask, token_ids)
    capo = CapoFilter(
        model=model, fisher_tau=1e-9, hessian_tau=1e-9, fisher_lambda=2.0, top_k=5, optimizer_model="sgd"
    )
    h = hidden.clone().requires_grad_(True)
    keep, _, penalty, metrics = capo(inputs, h, LR)
    assert metrics["capo/rejected_fisher_frac"].item() == 0.0  # the penalised score no longer masks
    assert metrics["capo/rejected_hessian_frac"].item() > 0.0
    topk = cv.topk_policy(hidden, model.get_output_embeddings().weight.detach(), token_ids, top_k=5)
    expected = 2.0 * cv.token_curvature_scores(hidden, topk, advantages, LR, mask=mask).fisher
    torch.testing.assert_close(penalty.detach(), expected)
    penalty.sum().backward()
    assert h.grad.abs().sum() > 0 and model.get_output_embeddings().weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    official = CapoFilter(model=model, fisher_lambda=2.0, penalty_grad=False, top_k=5, optimizer_model="sgd")
    assert not official(inputs, hidden.clone().requires_grad_(True), LR).penalty.requires_grad  # a constant


def test_sequence_global_and_sequential_levels(tiny):
    model, hidden, token_ids, advantages, mask = tiny
    inputs = loss_inputs(advantages, mask, token_ids)
    kwargs = {"model": model, "top_k": 5, "optimizer_model": "sgd"}
    head = model.get_output_embeddings().weight.detach()
    topk = cv.topk_policy(hidden, head, token_ids, top_k=5)
    seq = cv.group_curvature_scores(hidden, topk, advantages, mask, LR, level="sequence", lm_head_weight=head)
    tau = midpoint(seq.fisher)
    keep, *_ = CapoFilter(fisher_tau=tau, hessian_tau=0.0, level="sequence", **kwargs)(inputs, hidden, LR)
    assert torch.equal(keep, (seq.fisher < tau).unsqueeze(-1) & mask)  # whole sequences
    glob = cv.group_curvature_scores(hidden, topk, advantages, mask, LR, level="global", lm_head_weight=head)
    for tau, kept in ((float(glob.fisher) * 2, True), (float(glob.fisher) / 2, False)):
        keep, *_ = CapoFilter(fisher_tau=tau, hessian_tau=0.0, level="global", **kwargs)(inputs, hidden, LR)
        assert torch.equal(keep, mask & kept)  # the whole batch
    # Sequential without re-scoring is the code's rule: all levels' first-pass masks at once.
    token = cv.token_curvature_scores(hidden, topk, advantages, LR, mask=mask)
    tau = midpoint(token.fisher[mask], 0.8)
    capo = CapoFilter(fisher_tau=tau, hessian_tau=0.0, level="sequential", sequential_rescore=False, **kwargs)
    keep, *_ = capo(inputs, hidden, LR)
    expected = (token.fisher < tau) & (seq.fisher < tau).unsqueeze(-1) & (glob.fisher < tau) & mask
    assert torch.equal(keep, expected)
    rescored, *_ = CapoFilter(fisher_tau=tau, hessian_tau=0.0, level="sequential", **kwargs)(
        inputs, hidden, LR
    )
    assert not (rescored & ~(token.fisher < tau)).any()  # re-scoring never un-masks a token-level rejection


def test_state_dict_round_trip_and_registry_build(tiny):
    model, hidden, token_ids, advantages, mask = tiny
    spec = MethodSpec("capo", {"fisher_tau": 1e-3, "hessian_tau": 1e-2, "betas": [0.9, 0.999], "top_k": 5})
    capo = registry.build("token_filter", spec, model=model, distributed=False)
    assert isinstance(capo, CapoFilter) and capo.needs_hidden
    capo(loss_inputs(advantages, mask, token_ids), hidden, LR)
    capo.after_step()
    clone = CapoFilter(model=model, top_k=5)
    clone.load_state_dict(capo.state_dict())
    assert clone.moments.step == 1 and torch.equal(clone.moments.exp_avg, capo.moments.exp_avg)
    with pytest.raises(ConfigError, match="level"):
        registry.build("token_filter", MethodSpec("capo", {"level": "batch"}), model=model, distributed=False)
    with pytest.raises(ConfigError, match="optimizer_model"):
        CapoFilter(model=model, optimizer_model="lion")
    with pytest.raises(RuntimeError, match="token_ids"):
        capo(loss_inputs(advantages, mask, None), hidden, LR)


# ----------------------------------------------------------------------------- recipes, end to end


@pytest.mark.parametrize("recipe", ["capo", "dr_capo", "reincapo"])
def test_recipe_trains_two_steps_with_finite_metrics_and_a_nontrivial_mask(recipe, tiny_model_dir, tmp_path):
    cfg = load_config(
        CONFIGS / f"{recipe}.yaml",
        [
            f"model.name_or_path={tiny_model_dir}",
            "rollout.prompts_per_step=2",
            "rollout.max_new_tokens=4",
            "optim.steps=2",
            "optim.warmup_steps=0",
            "optim.micro_batch_size=8",
            "eval.every=0",
            "logging.progress=false",
            "logging.report=false",
            "logging.tensorboard=false",
            "checkpoint.save_final_model=false",
            f"run.output_dir={tmp_path / 'run'}",
        ],
    )
    trainer = Trainer(cfg, task=SevensTask())
    trainer.train()
    rows = read_metrics(cfg.run.output_dir)
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        for key, value in row.items():
            assert math.isfinite(value), f"{recipe} step {row['step']}: {key} = {value}"
    rejected = [r["capo/rejected_frac"] for r in rows]
    assert any(0.0 < r < 1.0 for r in rejected), rejected
    # No parameter-change check: at ReinCAPO's τ_F = 1e-5 the tiny model's first steps keep only the tokens
    # whose (raw-reward) advantage is 0, so a zero gradient is the right outcome there.
    capo = trainer.updater.token_filters[0]
    assert isinstance(capo, CapoFilter) and capo.moments.step == 2


def test_the_optimizer_model_takes_the_trainers_adamw_settings_unless_set(tiny_config, tmp_path):
    from sevens_task import SevensTask
    from steadyrl.train.trainer import Trainer

    cfg = tiny_config("optim.betas=[0.8, 0.95]", "optim.eps=1e-6", "optim.weight_decay=0.1", "token_filters=[{name: capo}]")
    (capo,) = Trainer(cfg, task=SevensTask()).updater.token_filters
    assert (capo.beta1, capo.beta2, capo.eps, capo.weight_decay) == (0.8, 0.95, 1e-6, 0.1)
    own = tiny_config("optim.betas=[0.8, 0.95]", "token_filters=[{name: capo, betas: [0.9, 0.999]}]",
                      f"run.output_dir={tmp_path / 'own'}")
    (capo,) = Trainer(own, task=SevensTask()).updater.token_filters
    assert (capo.beta1, capo.beta2) == (0.9, 0.999)  # set on the filter: a different optimizer, modelled on purpose
