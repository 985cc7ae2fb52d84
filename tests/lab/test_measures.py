"""The lab's smaller measurements on cases with a known answer: realised KL, rank correlation, Fisher cosine,
roughness, the PCR summary, the guard replay, seed statistics.

Run: .venv/bin/python -m pytest -q tests/lab/test_measures.py
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lab_models import EOS, PAD, tiny_lm
from steadyrl.bench.lab_stats import fmt_ci, mean_ci
from steadyrl.lab.capo_lab import position_logprobs, spearman, summarise_tokens, token_kl
from steadyrl.lab.guard_lab import collapse_onset, first_alarm, replay_map
from steadyrl.lab.lco_lab import fisher_cosine, roughness, target_logprobs
from steadyrl.lab.pcr_lab import summarise_run
from steadyrl.lab.samplers import noisy_head_copy
from steadyrl.rollout.base import left_pad
from steadyrl.types import RolloutBatch


def _batch():
    ids, mask = left_pad([[2, 3], [4, 2, 3]], PAD)
    completion = torch.tensor([[3, 4, EOS], [2, EOS, PAD]])
    response = completion != PAD
    return RolloutBatch(ids, mask, completion, response, torch.zeros(2, 3), torch.zeros(2, dtype=torch.bool))


def test_realised_kl_is_zero_for_a_zero_step_and_positive_otherwise():
    model = tiny_lm(5)
    batch = _batch()
    before = position_logprobs(model, batch)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    model(input_ids=torch.tensor([[2, 3, 4]])).logits.sum().backward()
    optimizer.step()
    assert torch.equal(token_kl(before, position_logprobs(model, batch)), torch.zeros(2, 3))
    moved = copy.deepcopy(model)
    with torch.no_grad():
        moved.get_output_embeddings().weight.add_(0.1)
        moved.get_output_embeddings().weight[3].add_(0.5)
    assert torch.all(token_kl(before, position_logprobs(moved, batch)) > 0)


def test_token_kl_by_hand():
    # π = (½, ½) → (¼, ¾): ½ ln 2 + ½ ln (2/3) = 0.143841
    before = torch.log(torch.tensor([[[0.5, 0.5]]]))
    after = torch.log(torch.tensor([[[0.25, 0.75]]]))
    assert token_kl(before, after).item() == pytest.approx(0.143841, abs=1e-6)


def test_spearman_known_cases():
    x = torch.arange(10.0)
    assert spearman(x, x**3) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)
    assert math.isnan(spearman(x[:2], x[:2]))


def test_summarise_tokens_counts_by_sign_and_bin():
    t = {
        "p": torch.tensor([0.01, 0.3, 0.95, 0.97]), "adv": torch.tensor([1.0, -1.0, -1.0, 1.0]),
        "rejected": torch.tensor([True, True, False, False]),
        "fisher_sampled": torch.tensor([4.0, 1.0, 0.1, 0.2]), "fisher_full": torch.tensor([1.0, 1.0, 1.0, 1.0]),
        "hessian": torch.tensor([1.0, 2.0, 3.0, 4.0]), "kl": torch.tensor([1.0, 2.0, 3.0, 4.0]),
        "change": torch.tensor([1.0, 2.0, 3.0, 4.0]),
    }
    s = summarise_tokens(t)
    assert s["rejected_frac"] == 0.5
    assert s["rejected_rate_adv_pos"] == 0.5 and s["rejected_rate_adv_neg"] == 0.5
    assert s["share_of_rejected_adv_pos"] == 0.5
    assert s["rejected_rate_p0-0.05"] == 1.0 and s["rejected_rate_p0.9-1"] == 0.0
    assert s["fisher_ratio_median_p0-0.05"] == 4.0
    assert s["spearman_hessian_change"] == pytest.approx(1.0)


def test_fisher_cosine_by_hand_and_invariances():
    # π = (½, ½): ⟨a, b⟩_F = ¼ (a₁ − a₂)(b₁ − b₂); a = (1, 0), b = (0, 1) → cosine −1; a constant shift changes nothing
    logp = torch.log(torch.tensor([0.5, 0.5]))
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert fisher_cosine(a, b, logp).item() == pytest.approx(-1.0)
    assert fisher_cosine(a + 3.0, 2 * a - 1.0, logp).item() == pytest.approx(1.0)


def test_target_logprobs_raise_the_sampled_token_only():
    old = torch.log(torch.tensor([[[0.5, 0.25, 0.25]]]))
    q = target_logprobs(old, torch.tensor([[1]]), torch.tensor([[math.log(3.0)]])).exp()
    # shift token 1's logit by ln 3: weights (0.5, 0.75, 0.25) / 1.5
    assert torch.allclose(q, torch.tensor([[[1 / 3, 1 / 2, 1 / 6]]]))


def test_roughness_by_hand():
    assert roughness([1.0, 1.0, 1.0]) == 0.0
    # |2 − 1| and |1 − 2| → mean 1, mean norm 4/3 → 0.75
    assert roughness([1.0, 2.0, 1.0]) == pytest.approx(0.75)
    assert math.isnan(roughness([1.0]))


def test_pcr_summary_of_metric_rows():
    rows = [
        {"step": 0, "eval/accuracy": 0.5, "retention/accuracy": 0.9},
        {"step": 1, "reward/mean": 0.5, "pcr/cos_pla_sta": -0.2, "pcr/conflict_frac": 0.5, "pcr/alpha_mean": 0.9},
        {"step": 2, "reward/mean": 0.6, "pcr/cos_pla_sta": 0.4, "pcr/conflict_frac": 0.0, "pcr/alpha_mean": 0.7},
        {"step": 2, "eval/accuracy": 0.7, "retention/accuracy": 0.8},
    ]
    s = summarise_run(rows)
    assert s["plasticity_gain"] == pytest.approx(0.2) and s["retention_loss"] == pytest.approx(0.1)
    assert s["cos_mean"] == pytest.approx(0.1) and s["conflict_frac_mean"] == 0.25 and s["alpha_mean"] == pytest.approx(0.8)


def test_guard_replay_finds_a_reward_drop_and_stays_quiet_on_a_steady_run():
    steady = [0.5] * 20
    assert first_alarm(steady, [0.3] * 20) == (None, ())
    # 3-step means: best 0.523 at step 4; step 5: 0.373 (not below 0.523 − 0.2); step 6: 0.223 → reward_drop
    crash = [0.5, 0.55, 0.5, 0.52, 0.1, 0.05, 0.0]
    step, reasons = first_alarm(crash, [0.3] * len(crash))
    assert step == 6 and reasons[0].startswith("reward_drop")
    assert collapse_onset([0, 2, 4, 6], [0.5, 0.5, 0.2, 0.0]) == 4  # threshold max(0.25, 0.3) = 0.3


def test_guard_replay_classifies_runs():
    def run(method, reward, acc, collapsed):
        return {"method": method, "lr": 1e-3, "seed": 0, "collapsed": collapsed, "dipped": False,
                "curve": {"eval_steps": [0, 2, 4, 6], "eval_acc": acc, "reward": reward, "entropy": [0.3] * len(reward)}}

    rows = [
        run("grpo", [0.5, 0.55, 0.5, 0.52, 0.1, 0.05, 0.0], [0.5, 0.5, 0.5, 0.0], True),  # alarm 6 (state 5) vs onset 6
        run("grpo", [0.5] * 7, [0.5, 0.5, 0.6, 0.6], False),
        run("grpo_guard", [0.5] * 7, [0.5] * 4, False),  # guarded runs are not replayed
    ]
    out = replay_map(rows)
    assert [r["outcome"] for r in out[:-1]] == ["early", "quiet"]
    assert out[0]["lead"] == 1
    assert out[-1]["false_alarm_rate"] == 0.0 and out[-1]["caught_early"] == 1


def test_noisy_head_moves_only_the_head():
    policy = tiny_lm(5)
    noisy = noisy_head_copy(policy, sigma=1.0, seed=0)
    assert not torch.equal(noisy.get_output_embeddings().weight, policy.get_output_embeddings().weight)
    assert torch.equal(noisy.get_input_embeddings().weight, policy.get_input_embeddings().weight)
    assert noisy_head_copy(policy, sigma=0.0, seed=0).get_output_embeddings().weight.equal(policy.get_output_embeddings().weight)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-100, 100), min_size=2, max_size=12))
def test_mean_ci_contains_the_mean_and_shrinks_to_zero_for_constants(xs):
    mean, half, n = mean_ci(xs)
    assert n == len(xs) and min(xs) - 1e-9 <= mean <= max(xs) + 1e-9 and half >= 0
    assert mean_ci([xs[0]] * len(xs))[1] == pytest.approx(0.0, abs=1e-9)


def test_mean_ci_by_hand():
    mean, half, n = mean_ci([1.0, 2.0, 3.0, float("nan")])
    assert (mean, n) == (2.0, 3) and half == pytest.approx(4.303 / math.sqrt(3))
    assert fmt_ci([]) == "–" and fmt_ci([0.5]) == "0.5"


def test_capo_lab_scores_tokens_exactly_as_the_filter_does(monkeypatch):
    # One RL step of the collapse map's CAPO recipe: the share of tokens the lab's own scoring rejects equals
    # the share the trainer's CapoFilter logged for the same optimizer step (capo/rejected_frac).
    from pathlib import Path

    from steadyrl.lab.capo_lab import CapoSpec, run_capo

    monkeypatch.chdir(Path(__file__).resolve().parents[2])  # configs/stability/ is read from the repo root
    spec = CapoSpec(steps=1, heldout_prompts=4, heldout_samples=1, overrides=("rollout.prompts_per_step=8",))
    rows = [r for r in run_capo(spec, "capo", 3e-3, 0) if r["kind"] == "step"]
    assert len(rows) == 2  # N = 2 optimizer steps
    for row in rows:
        assert row["lab_rejected_frac"] == pytest.approx(row["rejected_frac"], abs=1e-6)
        assert row["heldout_kl_mean"] >= 0
    assert max(r["rejected_frac"] for r in rows) > 0  # the rule did reject something: the comparison can fail
