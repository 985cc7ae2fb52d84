"""Each sampling-layer component on hand-built groups: selectors, filters, augmenters, shapers, the stores.

    .venv/bin/python -m pytest -q tests/sampling/test_components.py
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reference_sampling import dcpo_reference
from sampling_fakes import SevenTask, char_tokenizer
from steadyrl.ops.sampling import zero_variance_groups
from steadyrl.runtime.seeding import step_seed
from steadyrl.sampling.augmenters import R3Replay, SageHints
from steadyrl.sampling.filters import DynamicSampling, IqrEntropyFilter
from steadyrl.sampling.groups import HINTED, POLICY, REPLAYED, Groups
from steadyrl.sampling.selectors import UniformSelector, VadeSelector
from steadyrl.sampling.shapers import MajorityVote, OverlongPenalty
from steadyrl.sampling.store import PromptStore, TrajectoryBuffer
from steadyrl.tasks import ArithmeticTask, Prompt
from steadyrl.types import RolloutBatch

T = torch.tensor
TOK = char_tokenizer()


def make_groups(texts: list[str], rewards: list[float], g: int, completions: list[str] | None = None,
                logprobs: list[float] | None = None) -> Groups:
    prompts = [Prompt(id=t, text=t + "=", answer="77") for t in texts]
    rows = [p for p in prompts for _ in range(g)]
    completions = completions or [str(int(r)) if r == r else "x" for r in rewards]
    ids = [TOK(c)["input_ids"] + [TOK.eos_token_id] for c in completions]
    width = max(len(x) for x in ids)
    cids = torch.zeros((len(ids), width), dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.bool)
    for k, x in enumerate(ids):
        cids[k, : len(x)], mask[k, : len(x)] = T(x), True
    lp = torch.where(mask, T(logprobs or [-0.5] * len(ids))[:, None], 0.0)
    pids = torch.ones((len(ids), 3), dtype=torch.long)
    rollout = RolloutBatch(pids, torch.ones_like(pids, dtype=torch.bool), cids, mask, lp, torch.zeros(len(ids), dtype=torch.bool))
    r = T(rewards)
    return Groups(prompts, g, rollout, rows, completions, r.clone(), r.clone(), torch.ones(len(rows), dtype=torch.bool),
                  torch.zeros(len(rows), dtype=torch.int8))


class FakeLayer:
    """What augmenters and shapers call on the layer: generation answers with fixed text."""

    pad_token_id = TOK.pad_token_id

    def __init__(self, answer_for=lambda prompt: "1") -> None:
        self.answer_for, self.calls = answer_for, []

    def generate_rows(self, step, salt, rows, per_group=None, backend=None):
        self.calls.append((salt, [p.text for p in rows], backend))
        texts = [self.answer_for(p) for p in rows]
        g = make_groups([p.id for p in rows], [0.0] * len(rows), 1, completions=texts)
        return g.rollout, texts

    def score(self, prompts, completions):
        return T([SevenTask().reward(p, c) for p, c in zip(prompts, completions, strict=True)])

    def decode(self, ids, mask):
        return [TOK.decode([t for t, m in zip(r, k) if m and t != TOK.eos_token_id]) for r, k in zip(ids.tolist(), mask.tolist())]

    def shape(self, step, groups):
        return groups


# ----------------------------------------------------------------------------- selectors


def test_uniform_is_the_draw_steadyrl_always_made_and_a_pool_makes_prompts_recur():
    task = ArithmeticTask(max_digits=2)
    fresh = UniformSelector(task, seed=3)
    assert fresh.select(5, 4, 0) == task.sample("train", 4, seed=step_seed(3, 5))
    assert fresh.select(5, 4, 1) != fresh.select(5, 4, 0)  # a refill round draws other prompts
    pooled = UniformSelector(task, seed=3, pool_size=6)
    drawn = {p.id for step in range(1, 20) for p in pooled.select(step, 4, 0)}
    assert drawn <= {p.id for p in pooled.pool} and len(pooled.pool) <= 6


def test_vade_picks_the_prompts_whose_thompson_draw_is_most_informative():
    task = SevenTask()
    vade = VadeSelector(task, seed=0, pool_size=40, decay_step=1.0, decay_seen=1.0)
    # make three prompts near-certain (α or β huge) and one exactly uncertain: the draw decides
    vade.alpha[:] = 200.0
    vade.alpha[7], vade.beta[7] = 500.0, 500.0
    chosen = vade.select(1, 1, 0)
    assert chosen == [vade.pool[7]]  # p̃ ≈ .5 has the largest p(1 − p); the others are ≈ 200/201
    assert vade.select(1, 1, 1) != chosen  # a later round of the same step takes the next best
    again = VadeSelector(task, seed=0, pool_size=40)
    assert [p.id for p in again.select(4, 5, 0)] == [p.id for p in VadeSelector(task, seed=0, pool_size=40).select(4, 5, 0)]


@settings(max_examples=30, deadline=None)
@given(steps=st.lists(st.lists(st.sampled_from([0.0, 1.0]), min_size=4, max_size=4), min_size=1, max_size=6))
def test_vade_posterior_is_the_closed_form_beta_update_without_decay(steps):
    vade = VadeSelector(SevenTask(), seed=0, pool_size=10, prior_alpha=1.0, prior_beta=2.0, decay_step=1.0, decay_seen=1.0)
    prompt = vade.pool[0]
    for rewards in steps:
        vade.observe(1, [prompt], T(rewards))
    successes = sum(sum(r) for r in steps)
    assert vade.alpha[0].item() == pytest.approx(1.0 + successes)
    assert vade.beta[0].item() == pytest.approx(2.0 + 4 * len(steps) - successes)
    assert vade.alpha[1].item() == 1.0 and vade.beta[1].item() == 2.0  # unobserved arms keep the prior


def test_vade_two_scale_decay_by_hand():
    vade = VadeSelector(SevenTask(), seed=0, pool_size=4, decay_step=0.5, decay_seen=0.5)
    p = vade.pool[0]
    vade.observe(1, [p], T([1.0, 1, 1, 0]))  # step decay of the prior is a no-op; then Beta(1+3, 1+1) = (4, 2)
    assert (vade.alpha[0].item(), vade.beta[0].item()) == (4.0, 2.0)
    vade.observe(2, [p], T([0.0, 0, 0, 0]))
    # step: 1 + .5·3 = 2.5, 1 + .5·1 = 1.5; seen: 1 + .5·1.5 = 1.75, 1 + .5·.5 = 1.25; then + (0, 4)
    assert (vade.alpha[0].item(), vade.beta[0].item()) == (1.75, 5.25)
    state = vade.state_dict()
    fresh = VadeSelector(SevenTask(), seed=0, pool_size=4)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.alpha, vade.alpha) and torch.equal(fresh.beta, vade.beta)


# ----------------------------------------------------------------------------- filters


@settings(max_examples=60, deadline=None)
@given(rewards=st.lists(st.sampled_from([0.0, 0.5, 1.0, float("nan")]), min_size=12, max_size=12))
def test_dynamic_sampling_never_keeps_a_group_without_reward_variance(rewards):
    groups = make_groups(["a", "b", "c"], rewards, 4)
    keep = DynamicSampling().keep(groups)
    kept_values = torch.where(keep, groups.task_rewards, float("nan"))
    alive = keep.view(3, 4).any(1)
    assert not (zero_variance_groups(kept_values, 4) & alive).any()
    assert torch.equal(keep.view(3, 4), alive[:, None].expand(3, 4))  # whole groups only
    assert torch.equal(alive, ~zero_variance_groups(groups.task_rewards, 4))


def test_dynamic_sampling_can_test_the_shaped_reward():
    groups = make_groups(["a"], [1.0, 1, 1, 1], 4)
    groups.rewards = T([1.0, 1, 1, 0.5])  # an overlong penalty made the group informative
    assert not DynamicSampling().keep(groups).any()
    assert DynamicSampling(on="reward").keep(groups).all()


def test_iqr_entropy_drops_the_low_entropy_outlier_of_a_group():
    # per-row entropy = −logprob = [.5, .5, .6, .01]: Q1 = .3775, Q3 = .525 → fence .156 → .01 goes
    groups = make_groups(["a"], [1.0, 0, 1, 0], 4, logprobs=[-0.5, -0.5, -0.6, -0.01])
    assert IqrEntropyFilter().keep(groups).tolist() == [True, True, True, False]
    with pytest.raises(ValueError, match="scope must be"):
        IqrEntropyFilter(scope="prompt")


# ----------------------------------------------------------------------------- augmenters


def test_r3_replays_a_stored_trajectory_with_the_other_reward_into_an_all_equal_group():
    r3 = R3Replay(replay_per_group=1, per_prompt=2)
    step1 = make_groups(["a", "b"], [1.0, 0, 0, 0, 0, 0, 0, 0], 4, completions=["7", "1", "2", "3", "4", "5", "6", "8"])
    r3.observe(1, step1)  # a: one 1.0 and one 0.0 stored; b: one 0.0
    assert [t["reward"] for t in r3.buffer.items["a"]] == [1.0, 0.0] and len(r3.buffer.items["b"]) == 1
    step2 = make_groups(["a", "b"], [0.0] * 8, 4, completions=list("01234568"))
    out = r3.augment(2, step2, FakeLayer())
    # a: the last row is now the stored correct trajectory "7"; b has nothing with another reward
    assert out.rewards.tolist() == [0, 0, 0, 1, 0, 0, 0, 0]
    assert out.origin.tolist() == [POLICY] * 3 + [REPLAYED] + [POLICY] * 4
    assert out.completions[3] == "7" and out.rollout.completion_ids[3, 0].item() == TOK("7")["input_ids"][0]
    assert out.row_prompts[3] == step2.row_prompts[3]
    assert r3.metrics()["r3/replayed_groups"].item() == 0.5
    r3.observe(2, out)  # replayed rows are not stored again
    assert [t["step"] for t in r3.buffer.items["a"]] == [1, 2]


def test_trajectory_buffer_evicts_oldest_trajectories_and_least_recent_prompts():
    buf = TrajectoryBuffer(per_prompt=2, max_prompts=2)
    for k, pid in enumerate(["a", "a", "a", "b", "c"]):
        buf.add(pid, {"reward": float(k)})
    assert list(buf.items) == ["b", "c"] and len(buf) == 2  # a was updated least recently
    buf2 = TrajectoryBuffer(per_prompt=2)
    for k in range(3):
        buf2.add("a", {"reward": float(k)})
    assert [t["reward"] for t in buf2.items["a"]] == [1.0, 2.0]
    assert [t["reward"] for t in buf2.candidates("a", 2.0)] == [1.0]
    fresh = TrajectoryBuffer()
    fresh.load_state_dict(buf2.state_dict())
    assert fresh.items == buf2.items


def test_sage_regenerates_unrewarded_groups_with_a_longer_hint_until_rewarded():
    # the fake policy answers "7" only when the prompt already ends in "77" (a level-2 hint would, but level 2
    # of answer "77" would reveal all of it, so only level 1 exists): group "a" stays unrewarded, "b" is fine
    layer = FakeLayer(answer_for=lambda p: "0")
    groups = make_groups(["a", "b"], [0.0, 0, 1, 0], 2)
    out = SageHints(levels=3).augment(1, groups, layer)
    assert [c[0] for c in layer.calls] == [400_010]  # one level-1 round (level 2 would reveal the whole answer)
    assert layer.calls[0][1] == ["a=7", "a=7"]  # the hint is the answer's first character
    # scored as hint + completion = "70": contains a 7, so the hinted group is rewarded
    assert out.rewards[:2].tolist() == [1.0, 1.0] and out.origin[:2].tolist() == [HINTED, HINTED]
    assert out.completions[0] == "70" and out.row_prompts[0].text == "a=7" and out.prompts[0].text == "a="
    assert out.rewards[2:].tolist() == [1.0, 0.0] and out.origin[2:].tolist() == [POLICY, POLICY]
    assert SageHints().metrics() == {} and SageHints.hint(Prompt("x", "x=", "123"), 2) == "12"
    assert SageHints.hint(Prompt("x", "x=", "123"), 3) is None


# ----------------------------------------------------------------------------- shapers and the store


def test_overlong_penalty_shapes_rewards_not_task_rewards():
    groups = make_groups(["a"], [1.0, 1, 0, 0], 4, completions=["1", "123", "12", "1234"])  # lengths 2, 4, 3, 5 (EOS)
    out = OverlongPenalty(buffer_len=2, max_new_tokens=5).shape(1, groups, None)
    # free up to 3 tokens: 4 → −.5, 5 → −1
    assert out.rewards.tolist() == [1.0, 0.5, 0.0, -1.0] and out.task_rewards.tolist() == [1.0, 1, 0, 0]


def test_majority_vote_labels_by_the_policy_and_momentum_answers_and_never_reads_the_gold():
    from steadyrl.models import build_tiny_model, tiny_model_config

    model = build_tiny_model(tiny_model_config("qwen2", vocab_size=len(TOK), hidden_size=16, num_layers=1, num_heads=2), seed=0)
    task = ArithmeticTask(max_digits=1)
    vote = MajorityVote(model, TOK, task, "hf", momentum=0.5, momentum_samples=2)
    layer = FakeLayer(answer_for=lambda p: "5")
    # group a: policy says 5, 5, 3, 9; momentum says 5, 5 → label "5" (4/6 ≥ .5); group b: 1, 2, 3, 4 + 5, 5 → "5"
    # is only 2/6 < .5: no label, reward 0.  The gold answer ("77" here) is never used.
    groups = make_groups(["a", "b"], [9.0] * 8, 4, completions=["5", "5", "3", "9", "1", "2", "3", "4"])
    out = vote.shape(1, groups, layer)
    assert out.rewards.tolist() == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert layer.calls[0][0] == 500_009 and layer.calls[0][2] is vote.backend and len(layer.calls[0][1]) == 4
    assert vote.metrics()["mgrpo/labelled_frac"].item() == 0.5 and vote.metrics()["mgrpo/label_accuracy"].item() == 0.0
    # EMA: nothing at the first step; at the next step θ_k ← .5 θ_k + .5 θ_q
    before = [p.detach().clone() for p in vote.model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    vote.shape(1, groups, layer)  # the same step again: no update
    assert all(torch.equal(a, b) for a, b in zip(before, vote.model.parameters()))
    vote.shape(2, groups, layer)
    for b, k, q in zip(before, vote.model.parameters(), model.parameters()):
        torch.testing.assert_close(k, 0.5 * b + 0.5 * q)
    state = vote.state_dict()
    other = MajorityVote(model, TOK, task, "hf", momentum_samples=0)
    other.load_state_dict(state)
    assert other.last_step == 2 and all(torch.equal(a, b) for a, b in zip(other.model.parameters(), vote.model.parameters()))


@settings(max_examples=30, deadline=None)
@given(steps=st.lists(st.lists(st.sampled_from([0.0, 0.5, 1.0]), min_size=6, max_size=6), min_size=1, max_size=4))
def test_prompt_store_accumulates_dcpo_statistics_like_the_official_code(steps):
    store = PromptStore()
    prompts = [Prompt("p", "p=", "1"), Prompt("q", "q=", "1")]
    history = [(0.0, 0.0, 0), (0.0, 0.0, 0)]
    for k, rewards in enumerate(steps):
        store.update(k, prompts, T(rewards), 3)
        _, history = dcpo_reference([rewards[:3], rewards[3:]], history)
    mean, std, times = store.stats(prompts)
    torch.testing.assert_close(mean, T([h[0] for h in history]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(std, T([h[1] for h in history]), rtol=1e-5, atol=1e-6)
    assert times.tolist() == [len(steps)] * 2
    assert store.pass_history(prompts[0]) == pytest.approx([sum(r[:3]) / 3 for r in steps][-8:])


def test_prompt_store_is_bounded_and_round_trips():
    store = PromptStore(capacity=2)
    for k, pid in enumerate(["a", "b", "a", "c"]):
        store.update(k, [Prompt(pid, pid, "1")], T([1.0, 0.0]), 2)
    assert list(store.records) == ["a", "c"]  # b was seen least recently
    store.update(5, [Prompt("d", "d", "1")], T([float("nan"), float("nan")]), 2)
    assert "d" not in store.records  # a step without a scorable reward says nothing about the prompt
    fresh = PromptStore(capacity=2)
    fresh.load_state_dict(store.state_dict())
    assert fresh.records == store.records
