"""The layer advantages (config ``sampling.advantage``): what they read from the layer, what state they keep.

    .venv/bin/python -m pytest -q tests/sampling/test_layer_advantages.py
"""

from __future__ import annotations

import torch

from steadyrl.ops.advantages_context import adora_advantages, copo_advantages, dcpo_smooth_advantages
from steadyrl.ops.advantages_risk import quantile_tracker_init, riskpo_advantages
from steadyrl.sampling.advantages import ADORAAdvantage, COPOAdvantage, DCPOAdvantage, RiskPOAdvantage
from steadyrl.sampling.base import AdvantageContext, answer_entropy
from steadyrl.sampling.store import PromptStore
from steadyrl.tasks import Prompt

T = torch.tensor
PROMPTS = [Prompt("p", "p=", "1"), Prompt("q", "q=", "1")]


def _ctx(rewards, store=None, answers=None, lengths=None, step=1):
    rewards = T(rewards)
    return AdvantageContext(step, rewards, 4, PROMPTS, lengths if lengths is not None else torch.full_like(rewards, 3.0),
                            answers, store or PromptStore())


def test_dcpo_reads_the_store_the_layer_keeps():
    store = PromptStore()
    store.update(0, PROMPTS, T([1.0, 0, 0, 0, 1, 1, 0, 0]), 4)
    ctx = _ctx([1.0, 1, 1, 1, 0, 0, 0, 0], store)
    mean, std, times = store.stats(PROMPTS)
    want = dcpo_smooth_advantages(ctx.rewards, 4, old_mean=mean, old_std=std, times=times)
    got = DCPOAdvantage()(ctx)
    assert torch.equal(got.advantages, want.advantages)
    assert (got.advantages != 0).all()  # both groups are all-equal now, yet their history gives them signal
    assert DCPOAdvantage.needs_store and not DCPOAdvantage.needs_answers


def test_riskpo_tracks_quantiles_across_steps_and_feeds_them_back():
    adv = RiskPOAdvantage(bundle_size=2, lr_q=0.1)
    first = adv(_ctx([1.0, 0, 0, 1, 1, 1, 0, 1]))
    # no tracker yet: the bundle's own quantiles; then the tracker starts at the paper scores' quantiles
    assert torch.equal(first.advantages, riskpo_advantages(T([1.0, 0, 0, 1, 1, 1, 0, 1]), 4, bundle_size=2).advantages)
    papers = T([[2.0, 1.0, 0.0, 2.0]])
    torch.testing.assert_close(adv.q, quantile_tracker_init(papers, adv.levels))
    tracked = (float(adv.q[3]), float(adv.q[17]))  # the levels nearest .2 and .9
    second = adv(_ctx([0.0, 0, 0, 1, 1, 1, 1, 1]))
    want = riskpo_advantages(T([0.0, 0, 0, 1, 1, 1, 1, 1]), 4, bundle_size=2, tracked=tracked)
    assert torch.equal(second.advantages, want.advantages)
    assert second.metrics["riskpo/q_down"].item() == adv.q[3].item()
    state = adv.state_dict()
    fresh = RiskPOAdvantage(bundle_size=2)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.q, adv.q)


def test_adora_and_copo_read_lengths_and_answers_from_the_layer():
    lengths = T([5.0, 3, 3, 2, 2, 4, 4, 4])
    got = ADORAAdvantage(correct_score=0.5, max_length=100)(_ctx([1.0, 0, 0, 1, 1, 0, 0, 0], lengths=lengths))
    want = adora_advantages(T([1.0, 0, 0, 1, 1, 0, 0, 0]), 4, lengths=lengths, correct_score=0.5, max_length=100)
    assert torch.equal(got.advantages, want.advantages)
    answers = ["5", "5", "5", "5", "1", "2", None, "2"]
    got = COPOAdvantage()(_ctx([1.0, 1, 1, 1, 0, 1, 0, 1], answers=answers))
    entropy = answer_entropy(answers, 4)
    torch.testing.assert_close(entropy, T([0.0, 1.5]))  # {2: 2, 1: 1, None: 1} → 1.5 bits
    want = copo_advantages(T([1.0, 1, 1, 1, 0, 1, 0, 1]), 4, answer_entropy=entropy)
    assert torch.equal(got.advantages, want.advantages) and COPOAdvantage.needs_answers
