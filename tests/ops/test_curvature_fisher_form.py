"""CAPO's m_F with the sampled-token Fisher (the code's) and the true Fisher (``fisher_form="full"``).

The check is the token's *own* step in the last-layer linear model: with the sgd optimizer model the LM head
moves by η Â v hᵀ, so the logits move by exactly η Â ‖h‖² v and the realised KL(π_old ‖ π_new) can be computed
in closed form and compared with both predictions.

Run: .venv/bin/python -m pytest -q tests/ops/test_curvature_fisher_form.py
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from steadyrl.config import ConfigError
from steadyrl.ops.curvature import group_curvature_scores, token_curvature_scores, topk_policy


def _one_token(logits: list[float], sampled: int, adv: float = 1.0, width: int = 4):
    """Hidden (1,1,H) and a head W (V,H) with W h = logits exactly: h = e_0, W[:, 0] = logits."""
    vocab = len(logits)
    hidden = torch.zeros(1, 1, width)
    hidden[0, 0, 0] = 1.0
    weight = torch.zeros(vocab, width)
    weight[:, 0] = torch.tensor(logits)
    ids = torch.tensor([[sampled]])
    topk = topk_policy(hidden, weight, ids, top_k=vocab)
    return hidden, weight, topk, torch.full((1, 1), adv)


def _realised_kl(logits: list[float], sampled: int, adv: float, lr: float) -> float:
    z = torch.tensor(logits, dtype=torch.float64)
    p = torch.softmax(z, -1)
    v = -p.clone()
    v[sampled] += 1.0
    z_new = z + lr * adv * v  # ‖h‖ = 1: the token's own sgd step on W moves z by η Â v
    return float((p * (torch.log_softmax(z, -1) - torch.log_softmax(z_new, -1))).sum())


@pytest.mark.parametrize("p", [0.04, 0.5, 0.95])
def test_two_token_vocabulary_ratio_is_one_minus_p_over_p(p):
    # V = 2, sampled token 0 with probability p, v = (1−p, −(1−p)), δz = Â‖h‖² v = v (Â = ‖h‖ = 1).
    # true:    δzᵀ F δz = p(1−p) · (2(1−p))² = 4 p (1−p)³
    # sampled: s² = (vᵀ δz)² = (2 (1−p)²)² = 4 (1−p)⁴        → sampled / true = (1−p) / p
    logits = [math.log(p / (1 - p)), 0.0]
    hidden, weight, topk, adv = _one_token(logits, 0)
    lr = 1e-2
    sampled = token_curvature_scores(hidden, topk, adv, lr).fisher.item()
    true = token_curvature_scores(hidden, topk, adv, lr, fisher_form="full").fisher.item()
    assert true == pytest.approx(0.5 * lr**2 * 4 * p * (1 - p) ** 3, rel=1e-4)
    assert sampled == pytest.approx(0.5 * lr**2 * 4 * (1 - p) ** 4, rel=1e-4)
    assert sampled / true == pytest.approx((1 - p) / p, rel=1e-4)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.floats(-4.0, 4.0), min_size=3, max_size=8),
    st.integers(0, 7),
    st.sampled_from([-1.0, 1.0, 2.5]),
)
def test_true_fisher_predicts_the_realised_kl_of_the_tokens_own_step(logits, sampled, adv):
    sampled %= len(logits)
    lr = 1e-3
    hidden, weight, topk, a = _one_token(logits, sampled, adv)
    predicted = token_curvature_scores(hidden, topk, a, lr, fisher_form="full").fisher.item()
    realised = _realised_kl(logits, sampled, adv, lr)
    assert predicted == pytest.approx(realised, rel=1e-2, abs=1e-13)


def test_sampled_form_overpredicts_improbable_and_underpredicts_confident_tokens():
    lr = 1e-3
    for logits, sampled, low, high in (([-3.0, 0.0, 0.0, 0.0], 0, 10.0, 1e3), ([4.0, 0.0, 0.0, 0.0], 0, 0.0, 0.1)):
        hidden, weight, topk, adv = _one_token(logits, sampled)
        ratio = token_curvature_scores(hidden, topk, adv, lr).fisher.item() / _realised_kl(logits, sampled, 1.0, lr)
        assert low < ratio < high


def test_group_levels_accept_the_true_form_and_agree_with_it_for_one_token():
    hidden, weight, topk, adv = _one_token([0.3, -1.0, 0.5], 1)
    mask = torch.ones(1, 1, dtype=torch.bool)
    token = token_curvature_scores(hidden, topk, adv, 1e-2, fisher_form="full").fisher
    seq = group_curvature_scores(
        hidden, topk, adv, mask, 1e-2, level="sequence", lm_head_weight=weight, fisher_form="full"
    ).fisher
    assert seq.item() == pytest.approx(token.item(), rel=1e-5)


def test_unknown_fisher_form_is_rejected():
    hidden, weight, topk, adv = _one_token([0.0, 1.0], 0)
    with pytest.raises(ValueError, match="fisher_form"):
        token_curvature_scores(hidden, topk, adv, 1e-2, fisher_form="exact")
    from steadyrl.stabilisers.capo import CapoFilter

    model = torch.nn.Module()
    model.get_output_embeddings = lambda: torch.nn.Linear(2, 3)
    with pytest.raises(ConfigError, match="fisher_form"):
        CapoFilter(model=model, fisher_form="exact")


def test_capo_filter_passes_the_form_to_its_scores(tiny_model_dir):
    from steadyrl.models import load_model
    from steadyrl.stabilisers.capo import CapoFilter

    model = load_model(tiny_model_dir)
    assert CapoFilter(model=model, fisher_form="full")._model_kwargs(model.lm_head.weight, False)["fisher_form"] == "full"
