"""Tests for steadyrl.ops.advantages: hand values, loop references (tests/reference.py), properties.

Run: .venv/bin/python -m pytest -q tests/ops/test_advantages.py
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import reference as ref
from steadyrl.ops import advantages as adv
from steadyrl.types import AdvantageResult

NAN = float("nan")
ESTIMATORS = [
    adv.grpo_advantages,
    adv.dr_grpo_advantages,
    adv.rloo_advantages,
    adv.batch_std_advantages,
    adv.mc_grpo_advantages,
    adv.bnpo_advantages,
]
CENTERED = [adv.grpo_advantages, adv.dr_grpo_advantages, adv.rloo_advantages, adv.batch_std_advantages]
SETTINGS = settings(max_examples=40, deadline=None)


def t64(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# ----------------------------------------------------------------------------- hand-computed values


def test_grpo_hand_values():
    # group [1, 0, 1, 1]: mean 0.75; unbiased var = (3·0.25² + 0.75²)/3 = 0.25 -> std 0.5
    # Â = [0.25, −0.75, 0.25, 0.25] / 0.5 = [0.5, −1.5, 0.5, 0.5]
    result = adv.grpo_advantages(t64([1, 0, 1, 1]), 4, eps=0.0)
    torch.testing.assert_close(result.advantages, t64([0.5, -1.5, 0.5, 0.5]))
    assert result.sample_mask.tolist() == [True] * 4


def test_grpo_population_std_hand_values():
    # population std = sqrt(0.75/4) = 0.4330127 -> 0.25/0.4330127 = 0.5773503, −0.75/0.4330127 = −1.7320508
    result = adv.grpo_advantages(t64([1, 0, 1, 1]), 4, eps=0.0, std_unbiased=False)
    torch.testing.assert_close(result.advantages, t64([0.5773503, -1.7320508, 0.5773503, 0.5773503]))


def test_grpo_default_eps_hand_value():
    # default ε = 1e-6: 0.25 / (0.5 + 1e-6) = 0.4999990
    result = adv.grpo_advantages(t64([1, 0, 1, 1]), 4)
    assert result.advantages[0].item() == pytest.approx(0.25 / 0.500001, rel=1e-12)


def test_dr_grpo_hand_values():
    # Â = R − 0.75
    result = adv.dr_grpo_advantages(t64([1, 0, 1, 1]), 4)
    torch.testing.assert_close(result.advantages, t64([0.25, -0.75, 0.25, 0.25]))


def test_rloo_hand_values():
    # i=0: 1 − mean(0, 1, 1) = 1/3 ; i=1: 0 − mean(1, 1, 1) = −1
    result = adv.rloo_advantages(t64([1, 0, 1, 1]), 4)
    torch.testing.assert_close(result.advantages, t64([1 / 3, -1.0, 1 / 3, 1 / 3]))


def test_rloo_nan_member_is_not_in_the_baseline():
    # [1, NaN, 0, 0]: i=0: 1 − mean(0, 0) = 1 ; i=2: 0 − mean(1, 0) = −0.5
    result = adv.rloo_advantages(t64([1, NAN, 0, 0]), 4)
    torch.testing.assert_close(result.advantages, t64([1.0, 0.0, -0.5, -0.5]))
    assert result.sample_mask.tolist() == [True, False, True, True]


def test_batch_std_hand_values():
    # rewards [1,0,1,1 | 2,2,0,0], batch mean 0.875, Σ(R−0.875)² = 3·0.015625 + 3·0.765625 + 2·1.265625 = 4.875
    # unbiased batch std = sqrt(4.875/7) = 0.8345230 ; centred: [.25,−.75,.25,.25 | 1,1,−1,−1]
    result = adv.batch_std_advantages(t64([1, 0, 1, 1, 2, 2, 0, 0]), 4, eps=0.0)
    s = 0.8345230
    expected = t64([0.25 / s, -0.75 / s, 0.25 / s, 0.25 / s, 1 / s, 1 / s, -1 / s, -1 / s])
    torch.testing.assert_close(result.advantages, expected, rtol=1e-6, atol=1e-7)


def test_batch_std_of_centered_hand_values():
    # centred values have mean 0 and Σ² = 3·0.0625 + 0.5625 + 4·1 = 4.75 -> std = sqrt(4.75/7) = 0.8237545
    result = adv.batch_std_advantages(t64([1, 0, 1, 1, 2, 2, 0, 0]), 4, eps=0.0, std_of="centered")
    assert result.advantages[4].item() == pytest.approx(1 / 0.8237545, rel=1e-6)
    with pytest.raises(ValueError, match="std_of"):
        adv.batch_std_advantages(t64([1, 0]), 2, std_of="tokens")


def test_mc_grpo_binary_group_follows_the_official_guard():
    # [1, 0, 0]: median 0, MAD = median(1, 0, 0) = 0 -> scale 0 + 1e-3 -> Â = [1000, 0, 0];
    # one non-zero of n = 3 -> ×3 -> 3000. Pivot = first member equal to the median = index 1.
    result = adv.mc_grpo_advantages(t64([1, 0, 0]), 3)
    torch.testing.assert_close(result.advantages, t64([3000.0, 0.0, 0.0]))
    assert result.sample_mask.tolist() == [True, False, True]
    assert result.metrics["adv/zero_mad_frac"].item() == 1.0


def test_mc_grpo_zero_mad_scale():
    # same group, MAD = 0 -> divide by 1 instead: Â = [1, 0, 0] ×3 -> [3, 0, 0]
    result = adv.mc_grpo_advantages(t64([1, 0, 0]), 3, zero_mad_scale=1.0)
    torch.testing.assert_close(result.advantages, t64([3.0, 0.0, 0.0]))


def test_mc_grpo_continuous_group():
    # [1, 0.5, 0]: median 0.5; |R − m| = [.5, 0, .5] -> MAD 0.5 -> scale 0.501
    # Â = [0.5, 0, −0.5]/0.501 = ±0.998004 ; two non-zero of 3 -> ×1.5 -> ±1.497006
    result = adv.mc_grpo_advantages(t64([1, 0.5, 0]), 3)
    torch.testing.assert_close(result.advantages, t64([1.497006, 0.0, -1.497006]), rtol=1e-6, atol=1e-7)
    assert result.sample_mask.tolist() == [True, False, True]


def test_mc_grpo_even_count_uses_the_lower_median():
    # [0, 1, 2, 3]: lower median 1 (pivot, index 1); |R − 1| = [1, 0, 1, 2] -> lower median 1 -> scale 1.001
    # Â = [−1, 0, 1, 2]/1.001 ; three non-zero of 4 -> ×4/3 -> [−1.3320013, 0, 1.3320013, 2.6640027]
    result = adv.mc_grpo_advantages(t64([0, 1, 2, 3]), 4)
    torch.testing.assert_close(result.advantages, t64([-1.3320013, 0.0, 1.3320013, 2.6640027]), rtol=1e-6, atol=1e-7)
    assert result.sample_mask.tolist() == [True, False, True, True]


def test_mc_grpo_ties_with_the_median_stay_in_the_loss():
    # [0, 1, 1, 1, 5]: median 1; first tie (index 1) is the pivot, indices 2 and 3 stay with Â = 0
    # MAD = median(1, 0, 0, 0, 4) = 0 -> scale 1e-3: Â = [−1000, 0, 0, 0, 4000] ×5/2 -> [−2500, 0, 0, 0, 10000]
    result = adv.mc_grpo_advantages(t64([0, 1, 1, 1, 5]), 5)
    torch.testing.assert_close(result.advantages, t64([-2500.0, 0, 0, 0, 10000.0]))
    assert result.sample_mask.tolist() == [True, False, True, True, True]


def test_mc_grpo_without_rescale():
    # [1, 0.5, 0] without the n/#non-zero factor: ±0.5/0.501 = ±0.998004
    result = adv.mc_grpo_advantages(t64([1, 0.5, 0]), 3, rescale_nonzero=False)
    torch.testing.assert_close(result.advantages, t64([0.998004, 0.0, -0.998004]), rtol=1e-6, atol=1e-7)


def test_bnpo_hand_values():
    # pass rates p = [.25, .5, .75]; p̄ = .5, unbiased var = (.0625 + 0 + .0625)/2 = .0625
    # p̄(1−p̄)/var − 1 = 3 -> a = b = 1.5 -> α = β = 1 + 1.5/3 = 1.5 ; B(1.5, 1.5) = π/8
    # f(.5) = sqrt(.25)/(π/8) = 4/π -> 1/f = π/4 = 0.7853982
    # f(.25) = sqrt(.1875)/(π/8) = 1.1026578 -> 1/f = 0.9068997
    rewards = t64([1, 0, 0, 0, 1, 1, 0, 0, 1, 1, 1, 0])
    result = adv.bnpo_advantages(rewards, 4)
    w1, w2 = 0.9068997, math.pi / 4
    expected = [0.75 * w1, -0.25 * w1, -0.25 * w1, -0.25 * w1]
    expected += [0.5 * w2, 0.5 * w2, -0.5 * w2, -0.5 * w2]
    expected += [0.25 * w1, 0.25 * w1, 0.25 * w1, -0.75 * w1]
    torch.testing.assert_close(result.advantages, t64(expected), rtol=1e-6, atol=1e-7)
    assert result.metrics["bnpo/alpha"].item() == pytest.approx(1.5)
    assert result.metrics["bnpo/beta"].item() == pytest.approx(1.5)


def test_bnpo_rescales_rewards_into_unit_interval():
    # rewards in [−1, 1]: s = (R + 1)/2 turns [1, −1, −1, −1 | ...] into the binary case above
    binary = t64([1, 0, 0, 0, 1, 1, 0, 0, 1, 1, 1, 0])
    result = adv.bnpo_advantages(binary * 2 - 1, 4, reward_min=-1.0, reward_max=1.0)
    torch.testing.assert_close(result.advantages, adv.bnpo_advantages(binary, 4).advantages)
    with pytest.raises(ValueError, match="reward_max"):
        adv.bnpo_advantages(binary, 4, reward_min=1.0, reward_max=1.0)


def test_bnpo_degenerate_fit_is_reinforce_with_baseline():
    # every prompt has pass rate 0.5 -> var = 0 -> α = β = 1, f ≡ 1, Â = s − p = ±0.5
    result = adv.bnpo_advantages(t64([1, 0, 0, 1]), 2)
    torch.testing.assert_close(result.advantages, t64([0.5, -0.5, -0.5, 0.5]))
    assert result.metrics["bnpo/alpha"].item() == 1.0
    # var_floor = 0.25 instead: p̄(1−p̄)/0.25 − 1 = 0 -> a = b = 0 -> α = β = 1, same values
    floored = adv.bnpo_advantages(t64([1, 0, 0, 1]), 2, var_floor=0.25)
    torch.testing.assert_close(floored.advantages, result.advantages)


def test_bnpo_out_of_range_rewards_are_reported_and_stay_finite():
    # [1, −1 | 1.5, .5 | 1, 0] with the default [0, 1] range: −1 and 1.5 are outside (2 of 6).
    # p = [0, 1, .5]: p̄ = .5, var = (.25 + .25 + 0)/2 = .25 -> p̄(1−p̄)/var − 1 = 0 -> α = β = 1, f ≡ 1
    # groups 1 and 2 sit at p = 0 and p = 1 with exponent 0: xlogy gives 0·log 0 = 0 (log would give NaN)
    # Â = s − p = [1, −1 | .5, −.5 | .5, −.5]
    result = adv.bnpo_advantages(t64([1, -1, 1.5, 0.5, 1, 0]), 2)
    torch.testing.assert_close(result.advantages, t64([1, -1, 0.5, -0.5, 0.5, -0.5]))
    assert result.metrics["bnpo/reward_out_of_range_frac"].item() == pytest.approx(1 / 3)


def test_bnpo_inverse_density_is_clamped():
    # p = [.5, .5, .5, 1.1]: p̄ = .65, var = (3·.0225 + .2025)/3 = .09 -> p̄(1−p̄)/var − 1 = 1.5278
    # α = 1 + 1.5278·.65/3 = 1.331, β = 1 + 1.5278·.35/3 = 1.178 (both > 1, so f(0) = f(1) = 0)
    # p = 1.1 is clamped to 1 for the density -> f = 0 -> 1/f = inf -> clamped to 1e6; Â = 1e6 · (s − 1.1)
    rewards = t64([1, 0, 1, 0, 1, 0, 1.2, 1.0])
    result = adv.bnpo_advantages(rewards, 2)
    torch.testing.assert_close(result.advantages[6:], t64([1e5, -1e5]))
    assert result.metrics["bnpo/alpha"].item() == pytest.approx(1 + (0.2275 / 0.09 - 1) * 0.65 / 3)
    capped = adv.bnpo_advantages(rewards, 2, max_inverse_density=10.0)
    torch.testing.assert_close(capped.advantages[6:], t64([1.0, -1.0]))


def test_metrics_hand_values():
    # groups [1, 0 | 2, 2 | NaN, 3]: group 2 all equal, group 3 has one valid member -> zero_std_frac 2/3
    # nan_frac = 1/6 ; dr_grpo Â = [.5, −.5, 0, 0, 0, 0] over the 5 valid: mean 0, abs_max 0.5,
    # population std = sqrt((.25 + .25)/5) = 0.3162278
    result = adv.dr_grpo_advantages(t64([1, 0, 2, 2, NAN, 3]), 2)
    m = result.metrics
    assert m["adv/zero_std_frac"].item() == pytest.approx(2 / 3)
    assert m["reward/nan_frac"].item() == pytest.approx(1 / 6)
    assert m["adv/mean"].item() == pytest.approx(0.0)
    assert m["adv/abs_max"].item() == pytest.approx(0.5)
    assert m["adv/std"].item() == pytest.approx(0.3162278, rel=1e-6)
    assert all(v.dim() == 0 for v in m.values())


# ----------------------------------------------------------------------------- errors and signature


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_batch_not_divisible_by_group_size_names_the_fix(estimator):
    with pytest.raises(ValueError, match="multiple of the group size"):
        estimator(torch.zeros(10), 4)
    with pytest.raises(ValueError, match="1-D"):
        estimator(torch.zeros(2, 4), 4)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_uniform_signature(estimator):
    params = list(inspect.signature(estimator).parameters.values())
    assert [p.name for p in params[:2]] == ["rewards", "group_size"]
    assert all(p.kind is p.KEYWORD_ONLY and p.default is not p.empty for p in params[2:])
    result = estimator(torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0]), 3)
    assert isinstance(result, AdvantageResult)
    assert result.advantages.shape == (6,) and result.sample_mask.dtype == torch.bool
    assert result.advantages.dtype == torch.float32


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_integer_and_half_rewards_are_computed_in_float32(estimator):
    assert estimator(torch.tensor([1, 0, 1, 1]), 2).advantages.dtype == torch.float32
    assert estimator(torch.tensor([1, 0, 1, 1], dtype=torch.bfloat16), 2).advantages.dtype == torch.float32


# ----------------------------------------------------------------------------- loop references


def _random_rewards(gen: torch.Generator, num_prompts: int, group_size: int, kind: str) -> torch.Tensor:
    b = num_prompts * group_size
    if kind == "binary":
        r = torch.randint(0, 2, (b,), generator=gen).double()
    elif kind == "levels":
        r = torch.randint(0, 4, (b,), generator=gen).double() / 3
    else:
        r = torch.randn(b, generator=gen, dtype=torch.float64)
    nan = torch.rand(b, generator=gen) < 0.15
    return torch.where(nan, torch.full_like(r, NAN), r)


CASES = [(seed, kind) for seed in range(6) for kind in ("binary", "levels", "normal")]


@pytest.mark.parametrize(("seed", "kind"), CASES)
def test_group_estimators_match_loop_reference(seed, kind):
    gen = torch.Generator().manual_seed(seed)
    num_prompts, group_size = int(torch.randint(1, 7, (1,), generator=gen)), int(torch.randint(1, 9, (1,), generator=gen))
    rewards = _random_rewards(gen, num_prompts, group_size, kind)
    r = rewards.tolist()
    pairs = [
        (adv.grpo_advantages(rewards, group_size), ref.grpo_advantages(r, group_size)),
        (adv.grpo_advantages(rewards, group_size, eps=1e-4, std_unbiased=False),
         ref.grpo_advantages(r, group_size, eps=1e-4, unbiased=False)),
        (adv.dr_grpo_advantages(rewards, group_size), ref.dr_grpo_advantages(r, group_size)),
        (adv.rloo_advantages(rewards, group_size), ref.rloo_advantages(r, group_size)),
        (adv.batch_std_advantages(rewards, group_size), ref.batch_std_advantages(r, group_size)),
        (adv.batch_std_advantages(rewards, group_size, std_of="centered", std_unbiased=False),
         ref.batch_std_advantages(r, group_size, unbiased=False, std_of="centered")),
    ]
    for result, expected in pairs:
        torch.testing.assert_close(result.advantages, t64(expected), rtol=1e-9, atol=1e-9)
        assert result.sample_mask.tolist() == [not math.isnan(x) for x in r]


@pytest.mark.parametrize(("seed", "kind"), CASES)
def test_mc_grpo_matches_loop_reference(seed, kind):
    gen = torch.Generator().manual_seed(100 + seed)
    num_prompts, group_size = int(torch.randint(1, 7, (1,), generator=gen)), int(torch.randint(2, 10, (1,), generator=gen))
    rewards = _random_rewards(gen, num_prompts, group_size, kind)
    for hp in ({}, {"zero_mad_scale": 1.0}, {"mad_eps": 0.0, "zero_mad_scale": 0.5, "rescale_nonzero": False}):
        result = adv.mc_grpo_advantages(rewards, group_size, **hp)
        expected, keep = ref.mc_grpo_advantages(rewards.tolist(), group_size, **hp)
        torch.testing.assert_close(result.advantages, t64(expected), rtol=1e-9, atol=1e-9)
        assert result.sample_mask.tolist() == keep


@pytest.mark.parametrize(("seed", "kind"), CASES)
def test_bnpo_matches_loop_reference(seed, kind):
    gen = torch.Generator().manual_seed(200 + seed)
    num_prompts, group_size = int(torch.randint(2, 9, (1,), generator=gen)), int(torch.randint(2, 9, (1,), generator=gen))
    rewards = _random_rewards(gen, num_prompts, group_size, kind)
    hp = {"reward_min": -4.0, "reward_max": 4.0} if kind == "normal" else {}
    if torch.isnan(rewards.view(num_prompts, group_size)).all(dim=1).any():
        rewards[::group_size] = 1.0  # every prompt keeps a pass rate, as the reference needs
    result = adv.bnpo_advantages(rewards, group_size, **hp)
    expected, alpha, beta = ref.bnpo_advantages(rewards.tolist(), group_size, **hp)
    torch.testing.assert_close(result.advantages, t64(expected), rtol=1e-7, atol=1e-9)
    assert result.metrics["bnpo/alpha"].item() == pytest.approx(alpha, rel=1e-9)
    assert result.metrics["bnpo/beta"].item() == pytest.approx(beta, rel=1e-9)


# ----------------------------------------------------------------------------- properties

# Rewards on a grid of quarters are exact in binary, so shifting and scaling never merge distinct values.
quarters = st.integers(-40, 40).map(lambda k: k / 4)


@st.composite
def grouped_rewards(draw, min_group: int = 1, nan: bool = False):
    num_prompts = draw(st.integers(1, 5))
    group_size = draw(st.integers(min_group, 7))
    values = draw(st.lists(quarters, min_size=num_prompts * group_size, max_size=num_prompts * group_size))
    if nan:
        holes = draw(st.lists(st.booleans(), min_size=len(values), max_size=len(values)))
        values = [NAN if h else v for v, h in zip(values, holes)]
    return t64(values), group_size


@SETTINGS
@given(data=grouped_rewards(nan=True), estimator=st.sampled_from(CENTERED))
def test_centered_advantages_sum_to_zero_per_group(data, estimator):
    rewards, group_size = data
    result = estimator(rewards, group_size)
    sums = torch.where(result.sample_mask, result.advantages, 0.0).view(-1, group_size).sum(dim=1)
    torch.testing.assert_close(sums, torch.zeros_like(sums), atol=1e-9, rtol=0)


@SETTINGS
@given(
    data=grouped_rewards(nan=True),
    shift=st.integers(-100, 100),
    estimator=st.sampled_from([adv.grpo_advantages, adv.dr_grpo_advantages, adv.rloo_advantages]),
)
def test_shift_invariance(data, shift, estimator):
    rewards, group_size = data
    torch.testing.assert_close(
        estimator(rewards + shift, group_size).advantages, estimator(rewards, group_size).advantages, atol=1e-9, rtol=1e-9
    )


@SETTINGS
@given(data=grouped_rewards(nan=True), scale=st.floats(0.01, 100.0))
def test_grpo_scale_invariance(data, scale):
    rewards, group_size = data
    torch.testing.assert_close(
        adv.grpo_advantages(rewards * scale, group_size, eps=0.0).advantages,
        adv.grpo_advantages(rewards, group_size, eps=0.0).advantages,
        atol=1e-9,
        rtol=1e-9,
    )


@SETTINGS
@given(
    num_prompts=st.integers(1, 4),
    group_size=st.integers(1, 8),
    value=st.floats(-1e3, 1e3, allow_nan=False),
    estimator=st.sampled_from(ESTIMATORS),
)
def test_all_equal_groups_give_exactly_zero(num_prompts, group_size, value, estimator):
    # 0.1-like values are not exact in binary: a mean-based (R − mean)/ε would give noise, not 0.
    rewards = torch.full((num_prompts * group_size,), value, dtype=torch.float64)
    kwargs = {"reward_min": -1e3, "reward_max": 1e3} if estimator is adv.bnpo_advantages else {}
    result = estimator(rewards, group_size, **kwargs)
    assert (result.advantages == 0).all()
    assert result.metrics["adv/zero_std_frac"].item() == 1.0


@SETTINGS
@given(data=st.data(), estimator=st.sampled_from(ESTIMATORS))
def test_nan_rewards_are_zero_and_equal_to_dropping_them(data, estimator):
    num_prompts = data.draw(st.integers(1, 4))
    group_size = data.draw(st.integers(2, 7))
    num_missing = data.draw(st.integers(1, group_size - 1))
    groups, compact = [], []
    for _ in range(num_prompts):
        values = data.draw(st.lists(st.integers(0, 4).map(lambda k: k / 4), min_size=group_size, max_size=group_size))
        holes = set(data.draw(st.permutations(range(group_size)))[:num_missing])
        groups.append([NAN if j in holes else v for j, v in enumerate(values)])
        compact.append([v for j, v in enumerate(values) if j not in holes])
    rewards = t64([v for g in groups for v in g])
    full = estimator(rewards, group_size)
    dropped = estimator(t64([v for g in compact for v in g]), group_size - num_missing)
    missing = torch.isnan(rewards)
    assert (full.advantages[missing] == 0).all()
    assert not full.sample_mask[missing].any()
    torch.testing.assert_close(full.advantages[~missing], dropped.advantages, atol=1e-9, rtol=1e-9)
    assert full.sample_mask[~missing].tolist() == dropped.sample_mask.tolist()


@SETTINGS
@given(data=grouped_rewards(min_group=2), estimator=st.sampled_from(ESTIMATORS))
def test_advantages_are_finite_and_metrics_are_scalars(data, estimator):
    rewards, group_size = data
    kwargs = {"reward_min": -10.0, "reward_max": 10.0} if estimator is adv.bnpo_advantages else {}
    result = estimator(rewards, group_size, **kwargs)
    assert torch.isfinite(result.advantages).all()
    assert all(v.dim() == 0 and torch.isfinite(v) for v in result.metrics.values())


# ----------------------------------------------------------------------------- raw_reward (no baseline)


def test_raw_reward_hand_values():
    # Â = R; a NaN reward gets 0 and leaves the loss; an all-equal group keeps its rewards (no baseline).
    result = adv.raw_reward_advantages(t64([1, 0, NAN, 0.5, 0.5, 0.5]), 3)
    torch.testing.assert_close(result.advantages, t64([1, 0, 0, 0.5, 0.5, 0.5]))
    assert result.sample_mask.tolist() == [True, True, False, True, True, True]
    m = result.metrics
    assert m["adv/zero_std_frac"].item() == 0.5  # the second group
    assert m["adv/mean"].item() == pytest.approx(2.5 / 5)  # over the 5 valid completions


@pytest.mark.parametrize("seed", range(4))
def test_raw_reward_matches_loop_reference(seed):
    rewards = _random_rewards(torch.Generator().manual_seed(seed), 3, 4, "normal")
    result = adv.raw_reward_advantages(rewards, 4)
    for i in range(rewards.numel()):
        missing = math.isnan(rewards[i].item())
        assert result.advantages[i].item() == (0.0 if missing else rewards[i].item())
        assert result.sample_mask[i].item() is (not missing)


def test_raw_reward_signature_and_dtype():
    params = list(inspect.signature(adv.raw_reward_advantages).parameters)
    assert params == ["rewards", "group_size"]
    assert adv.raw_reward_advantages(torch.tensor([1, 0, 1, 1]), 2).advantages.dtype == torch.float32
    with pytest.raises(ValueError, match="multiple of the group size"):
        adv.raw_reward_advantages(torch.zeros(10), 4)
