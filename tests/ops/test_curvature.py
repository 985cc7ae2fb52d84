"""ops.curvature (CAPO, arXiv 2510.00819, methods.md §4): hand values, loop references written from the
formulas with explicit per-token gradients, autograd brute force, and masked-garbage / padding properties.

    .venv/bin/python -m pytest -q tests/ops/test_curvature.py
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from steadyrl.ops import curvature as cv

LR = 0.1
SETTINGS = settings(max_examples=15, deadline=None)
LN3 = math.log(3.0)


def hand_example():
    """V = 3, H = 2, K = 2, one sequence of two tokens (B = 1, T = 2), no bias.

    W = [[ln3, 0], [0, ln3], [-1, -1]]
    token 1: h = (1, 0), z = (ln3, 0, -1): top-2 ids (0, 1), π = (3/4, 1/4); sampled id 0 -> v = (1/4, -1/4)
    token 2: h = (0, 1), z = (0, ln3, -1): top-2 ids (1, 0), π = (3/4, 1/4); sampled id 2, outside the
             top-2 -> e_a = 0, v = -π = (-3/4, -1/4)
    Â = (2, -1), η = 0.1
    """
    weight = torch.tensor([[LN3, 0.0], [0.0, LN3], [-1.0, -1.0]])
    hidden = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    token_ids = torch.tensor([[0, 2]])
    advantages = torch.tensor([[2.0, -1.0]])
    return hidden, weight, token_ids, advantages


# ----------------------------------------------------------------------------- hand-computed values


def test_topk_policy_hand_values():
    hidden, weight, token_ids, _ = hand_example()
    topk = cv.topk_policy(hidden, weight, token_ids, top_k=2)
    assert topk.ids.tolist() == [[[0, 1], [1, 0]]]
    torch.testing.assert_close(topk.probs, torch.tensor([[[0.75, 0.25], [0.75, 0.25]]]))
    torch.testing.assert_close(topk.direction, torch.tensor([[[0.25, -0.25], [-0.75, -0.25]]]))
    assert topk.sampled_in_topk.tolist() == [[True, False]]


def test_sgd_token_scores_hand_values():
    hidden, weight, token_ids, advantages = hand_example()
    topk = cv.topk_policy(hidden, weight, token_ids, top_k=2)
    scores = cv.token_curvature_scores(hidden, topk, advantages, LR, optimizer_model="sgd")
    # token 1: δz = Â‖h‖²v = (1/2, -1/2); s = v·δz = 1/4; δzᵀFδz = Σπδz² − (π·δz)² = 1/4 − 1/16 = 3/16
    #          H = 2 (1/16 − 3/16) = −1/4; m_F = ½·0.01·1/16 = 3.125e-4; m_H = 0.1·2·(1/4) + 0.005·(−1/4) = 0.04875
    # token 2: δz = −v = (3/4, 1/4); s = −5/8; Σπδz² = 7/16, π·δz = 5/8 -> δzᵀFδz = 7/16 − 25/64 = 3/64
    #          H = −(25/64 − 3/64) = −11/32; m_F = 0.005·25/64 = 1.953125e-3; m_H = 0.1·(−1)(−5/8) − 0.005·11/32 = 0.06078125
    torch.testing.assert_close(scores.fisher, torch.tensor([[3.125e-4, 1.953125e-3]]))
    torch.testing.assert_close(scores.hessian, torch.tensor([[0.04875, 0.06078125]]))


def test_adam_token_scores_with_zero_moment_rows_hand_values():
    hidden, weight, token_ids, advantages = hand_example()
    topk = cv.topk_policy(hidden, weight, token_ids, top_k=2)
    # Ids 0 and 1 have (zero) state, so Adam applies: at t = 1, u = g / (|g| + ε) ≈ sign(g) element-wise.
    moments = cv.AdamMoments(torch.tensor([0, 1, -1]), torch.zeros(2, 2), torch.zeros(2, 2), step=0)
    scores = cv.token_curvature_scores(hidden, topk, advantages, LR, optimizer_model="adam", moments=moments)
    # token 1: g = 2·(1/4, −1/4) ⊗ (1, 0) = [[1/2, 0], [−1/2, 0]] -> u = [[1, 0], [−1, 0]]; δz = (1, −1)
    #          s = 1/4 + 1/4 = 1/2; δzᵀFδz = 1 − (1/2)² = 3/4; H = 2 (1/4 − 3/4) = −1
    #          m_F = 0.005·1/4 = 1.25e-3; m_H = 0.1·2·(1/2) + 0.005·(−1) = 0.095
    # token 2: g = −(−3/4, −1/4) ⊗ (0, 1) -> u = [[0, 1], [0, 1]]; δz = (1, 1); s = −1; δzᵀFδz = 1 − 1 = 0
    #          H = −1·(1 − 0) = −1; m_F = 0.005; m_H = 0.1·(−1)(−1) + 0.005·(−1) = 0.095
    torch.testing.assert_close(scores.fisher, torch.tensor([[1.25e-3, 5e-3]]), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(scores.hessian, torch.tensor([[0.095, 0.095]]), rtol=1e-6, atol=1e-9)
    # Without any state the code falls back to u = g: the sgd scores.
    empty = cv.AdamMoments(torch.full((3,), -1), torch.zeros(0, 2), torch.zeros(0, 2), step=0)
    fallback = cv.token_curvature_scores(hidden, topk, advantages, LR, optimizer_model="adam", moments=empty)
    torch.testing.assert_close(fallback.fisher, torch.tensor([[3.125e-4, 1.953125e-3]]))


def test_adam_direction_hand_value():
    # m' = 0.9·0.1 + 0.1·0.2 = 0.11, m̂ = 0.11 / (1 − 0.9²) = 0.578947
    # v' = 0.999·0.01 + 0.001·0.04 = 0.01003, v̂ = 0.01003 / (1 − 0.999²) = 5.017509, √v̂ = 2.239980
    # u = 0.578947 / (2.239980 + 1e-8) = 0.258461
    u = cv.adam_direction(torch.tensor([0.2]), torch.tensor([0.1]), torch.tensor([0.01]), step=1)
    assert u.item() == pytest.approx(0.258461, rel=1e-5)


def test_adam_moment_update_hand_value():
    # m = 0.9·0.1 + 0.1·0.2 = 0.11; v = 0.999·0.01 + 0.001·0.04 = 0.01003
    m, v = cv.adam_moment_update(torch.tensor([0.1]), torch.tensor([0.01]), torch.tensor([0.2]))
    assert m.item() == pytest.approx(0.11) and v.item() == pytest.approx(0.01003)


def test_sequence_and_global_scores_hand_values():
    hidden, weight, token_ids, advantages = hand_example()
    topk = cv.topk_policy(hidden, weight, token_ids, top_k=2)
    mask = torch.tensor([[True, True]])
    # Mean gradient row per id over the (t, k) holding it:
    #   id 0: token 1 slot 0: Âv = 1/2 -> (1/2, 0); token 2 slot 1: Âv = 1/4 -> (0, 1/4)  => ḡ0 = (1/4, 1/8)
    #   id 1: token 1 slot 1: Âv = −1/2 -> (−1/2, 0); token 2 slot 0: Âv = 3/4 -> (0, 3/4) => ḡ1 = (−1/4, 3/8)
    # sgd: ū = ḡ, Σ⟨ḡ, ū⟩ = 5/64 + 13/64 = 9/32
    # token 1: δz = (ḡ0·h1, ḡ1·h1) = (1/4, −1/4), s = 1/8, δzᵀFδz = 1/16 − 1/64 = 3/64, H = 2(1/64 − 3/64) = −1/16
    # token 2: δz = (ḡ1·h2, ḡ0·h2) = (3/8, 1/8), s = −5/16, δzᵀFδz = 7/64 − 25/256 = 3/256, H = −22/256
    # m_F = ½η² (1/64 + 25/256)/2 = 0.005·29/512 = 2.83203125e-4
    # m_H = 0.1·9/32 + 0.005·(−1/16 − 11/128)/2 = 0.028125 − 0.00037109375 = 0.02775390625
    for level, shape in (("sequence", (1,)), ("global", ())):
        scores = cv.group_curvature_scores(
            hidden, topk, advantages, mask, LR, level=level, optimizer_model="sgd", lm_head_weight=weight
        )
        assert scores.fisher.shape == shape
        torch.testing.assert_close(scores.fisher, torch.full(shape, 2.83203125e-4))
        torch.testing.assert_close(scores.hessian, torch.full(shape, 0.02775390625))


def test_vocab_gradient_sums_hand_values():
    hidden, weight, token_ids, advantages = hand_example()
    topk = cv.topk_policy(hidden, weight, token_ids, top_k=2)
    sums, counts = cv.vocab_gradient_sums(hidden, topk, advantages, torch.tensor([[True, True]]), 3)
    # id 0: (1/2, 0) + (0, 1/4); id 1: (−1/2, 0) + (0, 3/4); id 2: in no top-K
    torch.testing.assert_close(sums, torch.tensor([[0.5, 0.25], [-0.5, 0.75], [0.0, 0.0]]))
    assert counts.tolist() == [2.0, 2.0, 0.0]
    # Only token 1 kept: id 0 gets (1/2, 0), id 1 gets (−1/2, 0).
    sums, counts = cv.vocab_gradient_sums(hidden, topk, advantages, torch.tensor([[True, False]]), 3)
    torch.testing.assert_close(sums, torch.tensor([[0.5, 0.0], [-0.5, 0.0], [0.0, 0.0]]))
    assert counts.tolist() == [1.0, 1.0, 0.0]


def test_curvature_keep_hand_values():
    fisher = torch.tensor([0.5e-4, 2e-4, 0.5e-4, 0.5e-4, float("nan")])
    hessian = torch.tensor([0.005, 0.005, -0.005, 0.02, 0.0])
    keep_f, keep_h = cv.curvature_keep(fisher, hessian, fisher_tau=1e-4, hessian_tau=0.01)
    assert keep_f.tolist() == [True, False, True, True, False]  # m_F < τ_F; NaN is rejected
    assert keep_h.tolist() == [True, True, True, False, True]  # −τ_H < m_H < τ_H
    _, keep_h = cv.curvature_keep(fisher, hessian, fisher_tau=1e-4, hessian_tau=0.01, hessian_symmetric=False)
    assert keep_h.tolist() == [True, True, False, False, True]  # 0 ≤ m_H < τ_H
    keep_f, keep_h = cv.curvature_keep(fisher, hessian, fisher_tau=0.0, hessian_tau=0.0)
    assert keep_f.all() and keep_h.all()  # τ = 0 switches the criterion off


# ----------------------------------------------------------------------------- loop references


def ref_topk(hidden, weight, bias, token_ids, k):
    batch, length, _ = hidden.shape
    ids = torch.zeros(batch, length, k, dtype=torch.long)
    probs = torch.zeros(batch, length, k, dtype=torch.float64)
    direction = torch.zeros(batch, length, k, dtype=torch.float64)
    for b in range(batch):
        for t in range(length):
            logits = [
                float(weight[j].double() @ hidden[b, t].double() + (bias[j] if bias is not None else 0.0))
                for j in range(weight.shape[0])
            ]
            order = sorted(range(len(logits)), key=lambda j: -logits[j])[:k]
            norm = sum(math.exp(logits[j]) for j in order)
            for slot, j in enumerate(order):
                ids[b, t, slot] = j
                probs[b, t, slot] = math.exp(logits[j]) / norm
                direction[b, t, slot] = float(j == token_ids[b, t]) - probs[b, t, slot]
    return ids, probs, direction


def ref_direction(grad, ids, kind, state, step, weight, wd, betas=(0.9, 0.999), eps=1e-8):
    """u_t from explicit rows; ``state`` is {id: (m, v)} or None."""
    if kind == "sgd":
        return grad
    update = grad.clone()
    if state:
        t = step + 1
        for slot in range(grad.shape[0]):
            j = int(ids[slot])
            m, v = state.get(
                j,
                (torch.zeros(grad.shape[1], dtype=grad.dtype), torch.zeros(grad.shape[1], dtype=grad.dtype)),
            )
            for c in range(grad.shape[1]):
                m1 = (betas[0] * m[c] + (1 - betas[0]) * grad[slot, c]) / (1 - betas[0] ** t)
                v1 = (betas[1] * v[c] + (1 - betas[1]) * grad[slot, c] ** 2) / (1 - betas[1] ** t)
                update[slot, c] = m1 / (math.sqrt(v1) + eps)
    if kind == "adamw":
        update = update - wd * weight[ids].double()
    return update


def ref_scores_from_update(delta, probs, v, adv, lr, grad_dot):
    s = float(v @ delta)
    fisher_matrix = torch.diag(probs) - torch.outer(probs, probs)
    hess = adv * (s * s - float(delta @ fisher_matrix @ delta))
    return 0.5 * lr * lr * s * s, lr * grad_dot + 0.5 * lr * lr * hess, s, hess


def ref_token_scores(hidden, ids, probs, direction, adv, lr, kind, state, step, weight, wd):
    batch, length, _ = hidden.shape
    fisher = torch.zeros(batch, length, dtype=torch.float64)
    hessian = torch.zeros(batch, length, dtype=torch.float64)
    for b in range(batch):
        for t in range(length):
            h = hidden[b, t].double()
            grad = float(adv[b, t]) * torch.outer(direction[b, t], h)  # g_t = Â v ⊗ h, (K, H)
            update = ref_direction(grad, ids[b, t], kind, state, step, weight, wd)
            delta = update @ h
            fisher[b, t], hessian[b, t], _, _ = ref_scores_from_update(
                delta, probs[b, t], direction[b, t], float(adv[b, t]), lr, float((grad * update).sum())
            )
    return fisher, hessian


def ref_group_scores(hidden, ids, probs, direction, adv, mask, lr, kind, state, step, weight, wd, level):
    """The official code's sentence / global path with dicts: mean gradient per id, its update, scores."""
    batch, length, _ = hidden.shape
    groups = [[(b, t) for t in range(length) if mask[b, t]] for b in range(batch)]
    if level == "global":
        groups = [[bt for g in groups for bt in g]]
    fisher_out, hessian_out = [], []
    for tokens in groups:
        sums, counts = {}, {}
        for b, t in tokens:
            for slot in range(ids.shape[-1]):
                j = int(ids[b, t, slot])
                row = float(adv[b, t]) * float(direction[b, t, slot]) * hidden[b, t].double()
                sums[j] = sums.get(j, 0) + row
                counts[j] = counts.get(j, 0) + 1
        keys = sorted(sums)
        mean = {j: sums[j] / counts[j] for j in keys}
        upd = {}
        for j in keys:
            upd[j] = ref_direction(mean[j].unsqueeze(0), torch.tensor([j]), kind, state, step, weight, wd)[0]
        grad_dot = sum(float(mean[j] @ upd[j]) for j in keys)
        per_seq = {}
        for b, t in tokens:
            h = hidden[b, t].double()
            delta = torch.stack([upd[int(j)] @ h for j in ids[b, t]])
            _, _, s, hess = ref_scores_from_update(
                delta, probs[b, t], direction[b, t], float(adv[b, t]), lr, 0.0
            )
            per_seq.setdefault(b, []).append((s * s, hess))
        seq_f = [sum(x[0] for x in v) / len(v) for v in per_seq.values()]
        seq_h = [sum(x[1] for x in v) / len(v) for v in per_seq.values()]
        if not seq_f:
            seq_f, seq_h = [0.0], [0.0]
        fisher_out.append(0.5 * lr * lr * sum(seq_f) / len(seq_f))
        hessian_out.append(lr * grad_dot + 0.5 * lr * lr * sum(seq_h) / len(seq_h))
    return torch.tensor(fisher_out, dtype=torch.float64), torch.tensor(hessian_out, dtype=torch.float64)


def random_case(seed, batch=2, length=3, width=4, vocab=9, k=4, state_rows=5):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, length, width, generator=gen, dtype=torch.float64)
    weight = torch.randn(vocab, width, generator=gen, dtype=torch.float64)
    bias = torch.randn(vocab, generator=gen, dtype=torch.float64)
    token_ids = torch.randint(0, vocab, (batch, length), generator=gen)
    advantages = torch.randn(batch, length, generator=gen, dtype=torch.float64)
    mask = torch.rand(batch, length, generator=gen) < 0.8
    mask[:, 0] = True
    state_ids = torch.randperm(vocab, generator=gen)[:state_rows]
    row_of = torch.full((vocab,), -1, dtype=torch.long)
    row_of[state_ids] = torch.arange(state_rows)
    exp_avg = 0.1 * torch.randn(state_rows, width, generator=gen, dtype=torch.float64)
    exp_avg_sq = 0.01 * torch.rand(state_rows, width, generator=gen, dtype=torch.float64)
    moments = cv.AdamMoments(row_of, exp_avg, exp_avg_sq, step=3)
    state = {int(j): (exp_avg[row_of[j]], exp_avg_sq[row_of[j]]) for j in state_ids}
    return hidden, weight, bias, token_ids, advantages, mask, moments, state, k


KINDS = [("sgd", 0.0), ("adam", 0.0), ("adamw", 0.05)]


@pytest.mark.parametrize("seed", range(3))
def test_topk_policy_matches_loop_reference(seed):
    hidden, weight, bias, token_ids, *_, k = random_case(seed)
    topk = cv.topk_policy(hidden, weight, token_ids, top_k=k, lm_head_bias=bias, chunk_size=2)
    ids, probs, direction = ref_topk(hidden, weight, bias, token_ids, k)
    assert torch.equal(topk.ids, ids)
    torch.testing.assert_close(topk.probs.double(), probs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(topk.direction.double(), direction, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(("kind", "wd"), KINDS)
def test_token_scores_match_loop_reference(seed, kind, wd):
    hidden, weight, bias, token_ids, advantages, _, moments, state, k = random_case(seed)
    topk = cv.topk_policy(hidden, weight, token_ids, top_k=k, lm_head_bias=bias)
    scores = cv.token_curvature_scores(
        hidden,
        topk,
        advantages,
        LR,
        optimizer_model=kind,
        moments=moments,
        lm_head_weight=weight,
        weight_decay=wd,
        chunk_size=4,
    )
    fisher, hessian = ref_token_scores(
        hidden,
        topk.ids,
        topk.probs.double(),
        topk.direction.double(),
        advantages,
        LR,
        kind,
        state,
        3,
        weight,
        wd,
    )
    torch.testing.assert_close(scores.fisher.double(), fisher, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(scores.hessian.double(), hessian, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(("kind", "wd"), KINDS)
@pytest.mark.parametrize("level", ["sequence", "global"])
def test_group_scores_match_loop_reference(seed, kind, wd, level):
    hidden, weight, bias, token_ids, advantages, mask, moments, state, k = random_case(seed)
    topk = cv.topk_policy(hidden, weight, token_ids, top_k=k, lm_head_bias=bias)
    scores = cv.group_curvature_scores(
        hidden,
        topk,
        advantages,
        mask,
        LR,
        level=level,
        optimizer_model=kind,
        moments=moments,
        lm_head_weight=weight,
        weight_decay=wd,
        chunk_size=2,
    )
    fisher, hessian = ref_group_scores(
        hidden,
        topk.ids,
        topk.probs.double(),
        topk.direction.double(),
        advantages,
        mask,
        LR,
        kind,
        state,
        3,
        weight,
        wd,
        level,
    )
    torch.testing.assert_close(scores.fisher.double().reshape(-1), fisher, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(scores.hessian.double().reshape(-1), hessian, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("seed", range(3))
def test_vocab_gradient_sums_match_loop_reference(seed):
    hidden, weight, bias, token_ids, advantages, mask, *_, k = random_case(seed)
    topk = cv.topk_policy(hidden, weight, token_ids, top_k=k, lm_head_bias=bias)
    sums, counts = cv.vocab_gradient_sums(hidden, topk, advantages, mask, weight.shape[0], chunk_size=2)
    ref_sums = torch.zeros(weight.shape, dtype=torch.float64)
    ref_counts = torch.zeros(weight.shape[0], dtype=torch.float64)
    for b in range(hidden.shape[0]):
        for t in range(hidden.shape[1]):
            if not mask[b, t]:
                continue
            for slot in range(k):
                j = int(topk.ids[b, t, slot])
                ref_sums[j] += float(advantages[b, t]) * float(topk.direction[b, t, slot]) * hidden[b, t]
                ref_counts[j] += 1
    torch.testing.assert_close(sums.double(), ref_sums, rtol=1e-5, atol=1e-6)
    assert torch.equal(counts.double(), ref_counts)


# ----------------------------------------------------------------------------- autograd brute force


@pytest.mark.parametrize(("kind", "wd"), KINDS)
def test_token_scores_equal_autograd_brute_force_on_a_linear_head(kind, wd):
    """g_t = ∇_{W_topK} Â (z_a·[a ∈ top-K] − logsumexp z_topK) by autograd on an nn.Linear head; U_t, δz_t,
    F_t and the scores built explicitly from it."""
    torch.manual_seed(0)
    width, vocab, k = 5, 12, 4
    head = torch.nn.Linear(width, vocab).double()
    hidden = torch.randn(2, 3, width, dtype=torch.float64)
    token_ids = torch.randint(0, vocab, (2, 3))
    advantages = torch.randn(2, 3, dtype=torch.float64)
    *_, moments, state, _ = random_case(7, width=width, vocab=vocab, state_rows=8)
    topk = cv.topk_policy(hidden, head.weight.detach(), token_ids, top_k=k, lm_head_bias=head.bias.detach())
    scores = cv.token_curvature_scores(
        hidden,
        topk,
        advantages,
        LR,
        optimizer_model=kind,
        moments=moments,
        lm_head_weight=head.weight.detach(),
        weight_decay=wd,
    )
    for b in range(2):
        for t in range(3):
            ids = topk.ids[b, t]
            rows = head.weight.detach()[ids].clone().requires_grad_(True)
            logits = rows @ hidden[b, t] + head.bias.detach()[ids]
            objective = advantages[b, t] * (logits[ids == token_ids[b, t]].sum() - torch.logsumexp(logits, 0))
            (grad,) = torch.autograd.grad(objective, rows)
            update = ref_direction(grad, ids, kind, state, 3, head.weight.detach(), wd)
            delta = update @ hidden[b, t]
            probs = torch.softmax(logits.detach(), 0)
            v = (ids == token_ids[b, t]).double() - probs
            fisher, hessian, _, _ = ref_scores_from_update(
                delta, probs, v, float(advantages[b, t]), LR, float((grad * update).sum())
            )
            assert scores.fisher[b, t].item() == pytest.approx(fisher, rel=1e-4, abs=1e-10)
            assert scores.hessian[b, t].item() == pytest.approx(hessian, rel=1e-4, abs=1e-10)


def test_scores_are_differentiable_and_chunking_keeps_the_gradient():
    hidden, weight, bias, token_ids, advantages, _, moments, _, k = random_case(1)
    grads = []
    for chunk in (1, 100):
        h = hidden.clone().requires_grad_(True)
        topk = cv.topk_policy(h, weight, token_ids, top_k=k, lm_head_bias=bias)
        scores = cv.token_curvature_scores(
            h, topk, advantages, LR, optimizer_model="adam", moments=moments, chunk_size=chunk
        )
        (scores.fisher.sum() + scores.hessian.sum()).backward()
        grads.append(h.grad)
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1])


# ----------------------------------------------------------------------------- properties


@SETTINGS
@given(seed=st.integers(0, 10_000), kind=st.sampled_from(["sgd", "adam", "adamw"]), pad=st.integers(1, 3))
def test_masked_garbage_and_appended_padding_change_nothing(seed, kind, pad):
    hidden, weight, bias, token_ids, advantages, mask, moments, _, k = random_case(seed)
    kwargs = {"optimizer_model": kind, "moments": moments, "lm_head_weight": weight, "weight_decay": 0.05}
    topk = cv.topk_policy(hidden, weight, token_ids, top_k=k, lm_head_bias=bias)
    token = cv.token_curvature_scores(hidden, topk, advantages, LR, mask=mask, **kwargs)
    groups = {
        lvl: cv.group_curvature_scores(hidden, topk, advantages, mask, LR, level=lvl, **kwargs)
        for lvl in ("sequence", "global")
    }
    # NaN advantages and hidden states at masked positions, plus `pad` masked columns of NaN.
    batch, _, width = hidden.shape
    nan_h = torch.where(mask.unsqueeze(-1), hidden, float("nan"))
    nan_a = torch.where(mask, advantages, float("nan"))
    hidden2 = torch.cat([nan_h, torch.full((batch, pad, width), float("nan"), dtype=hidden.dtype)], 1)
    adv2 = torch.cat([nan_a, torch.full((batch, pad), float("nan"), dtype=advantages.dtype)], 1)
    ids2 = torch.cat([token_ids, torch.zeros(batch, pad, dtype=torch.long)], 1)
    mask2 = torch.cat([mask, torch.zeros(batch, pad, dtype=torch.bool)], 1)
    topk2 = cv.topk_policy(hidden2, weight, ids2, top_k=k, lm_head_bias=bias)
    token2 = cv.token_curvature_scores(hidden2, topk2, adv2, LR, mask=mask2, **kwargs)
    for a, b in zip(token, token2):
        torch.testing.assert_close(a[mask], b[:, : mask.shape[1]][mask])
    for lvl, scores in groups.items():
        again = cv.group_curvature_scores(hidden2, topk2, adv2, mask2, LR, level=lvl, **kwargs)
        torch.testing.assert_close(scores.fisher, again.fisher)
        torch.testing.assert_close(scores.hessian, again.hessian)


@SETTINGS
@given(seed=st.integers(0, 10_000), chunk=st.integers(1, 7), kind=st.sampled_from(["sgd", "adam", "adamw"]))
def test_chunk_size_changes_nothing(seed, chunk, kind):
    hidden, weight, bias, token_ids, advantages, mask, moments, _, k = random_case(seed)
    kwargs = {"optimizer_model": kind, "moments": moments, "lm_head_weight": weight, "weight_decay": 0.05}
    topk = cv.topk_policy(hidden, weight, token_ids, top_k=k, lm_head_bias=bias, chunk_size=chunk)
    assert torch.equal(topk.ids, cv.topk_policy(hidden, weight, token_ids, top_k=k, lm_head_bias=bias).ids)
    for fn in (
        lambda c: cv.token_curvature_scores(hidden, topk, advantages, LR, chunk_size=c, **kwargs),
        lambda c: cv.group_curvature_scores(
            hidden, topk, advantages, mask, LR, level="sequence", chunk_size=c, **kwargs
        ),
    ):
        small, large = fn(chunk), fn(1000)
        torch.testing.assert_close(small.fisher, large.fisher)
        torch.testing.assert_close(small.hessian, large.hessian)


@SETTINGS
@given(seed=st.integers(0, 10_000))
def test_fisher_score_is_nonnegative_and_scales_with_lr_squared(seed):
    hidden, weight, bias, token_ids, advantages, _, moments, _, k = random_case(seed)
    topk = cv.topk_policy(hidden, weight, token_ids, top_k=k, lm_head_bias=bias)
    a = cv.token_curvature_scores(hidden, topk, advantages, 0.1, optimizer_model="adam", moments=moments)
    b = cv.token_curvature_scores(hidden, topk, advantages, 0.2, optimizer_model="adam", moments=moments)
    assert (a.fisher >= 0).all()
    torch.testing.assert_close(b.fisher, 4 * a.fisher)


def test_errors_name_the_fix():
    hidden, weight, token_ids, advantages = hand_example()
    topk = cv.topk_policy(hidden, weight, token_ids, top_k=2)
    with pytest.raises(ValueError, match="optimizer_model"):
        cv.token_curvature_scores(hidden, topk, advantages, LR, optimizer_model="lion")
    with pytest.raises(ValueError, match="lm_head_weight"):
        cv.token_curvature_scores(hidden, topk, advantages, LR, optimizer_model="adamw", weight_decay=0.1)
    with pytest.raises(ValueError, match="level"):
        cv.group_curvature_scores(
            hidden,
            topk,
            advantages,
            torch.ones(1, 2, dtype=torch.bool),
            LR,
            level="batch",
            lm_head_weight=weight,
        )
