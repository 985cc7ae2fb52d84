"""The stability guard: signals on synthetic metric streams, its effects on a small model, and e2e in the trainer."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sevens_task import SevensTask
from steadyrl.config import GuardConfig
from steadyrl.report import read_metrics
from steadyrl.stabilisers.guard import StabilityGuard, relative_slope, scale_learning_rate
from steadyrl.train.trainer import Trainer


def healthy(rng: random.Random, **over) -> dict[str, float]:
    """A noisy but stable step: reward 0.6 ± 0.08, entropy 0.2 ± 0.03, grad norm 1 ± 0.4."""
    row = {
        "reward/mean": 0.6 + rng.uniform(-0.08, 0.08),
        "policy/entropy": 0.2 + rng.uniform(-0.03, 0.03),
        "grad/norm": 1.0 + rng.uniform(-0.4, 0.4),
        "policy/loss": rng.uniform(-0.1, 0.1),
        "train/skipped_steps": 0.0,
        "mismatch/is_ess": 0.97 + rng.uniform(-0.01, 0.01),
        "mismatch/kl_k3": 1e-4 * (1 + rng.uniform(-0.5, 0.5)),
    }
    row.update(over)
    return row


def stream(guard: StabilityGuard, rows: list[dict[str, float]], start: int = 1) -> list[str]:
    """Feed rows as steps start, start+1, ...; return the action kinds (decisions only, no model)."""
    kinds = []
    for i, row in enumerate(rows):
        action = guard.observe(start + i, row)
        if action.kind == "snapshot":  # what apply does for a snapshot, without a model
            guard.snapshots = [*guard.snapshots, object()][-guard.cfg.keep_snapshots :]
            guard.healthy_since_snapshot = 0
        elif action.kind == "rollback":
            guard.rollbacks += 1
            guard.cooldown_until = action.step + guard.cfg.cooldown + 1
            guard.history = {k: [] for k in guard.history}
            guard.rewards = []
        kinds.append(action.kind)
    return kinds


# ----------------------------------------------------------------------------- pure helpers


def test_relative_slope_by_hand():
    # [1, 2, 3]: slope 1, spans n − 1 = 2 steps, mean 2 → 1·2/2 = 1.0
    assert relative_slope([1.0, 2.0, 3.0]) == pytest.approx(1.0)
    # [0.4, 0.3, 0.2, 0.1]: slope −0.1 over 3 steps = −0.3, mean 0.25 → −1.2
    assert relative_slope([0.4, 0.3, 0.2, 0.1]) == pytest.approx(-1.2)
    # [3, 0, 0]: slope −1.5 over 2 steps = −3, mean 1 → −3 (a crash to exactly zero still measures)
    assert relative_slope([3.0, 0.0, 0.0]) == pytest.approx(-3.0)
    assert relative_slope([0.5]) == 0.0


@pytest.mark.parametrize("seed", range(5))
def test_relative_slope_matches_polyfit(seed):
    rng = np.random.default_rng(seed)
    values = list(rng.uniform(0.1, 1.0, size=int(rng.integers(2, 12))))
    slope = np.polyfit(np.arange(len(values)), values, 1)[0]
    assert relative_slope(values) == pytest.approx(slope * (len(values) - 1) / np.mean(values), rel=1e-9)


@given(st.lists(st.floats(0.01, 10.0), min_size=2, max_size=12), st.floats(0.1, 10.0))
@settings(deadline=None, max_examples=50)
def test_relative_slope_is_scale_free(values, scale):
    assert relative_slope([v * scale for v in values]) == pytest.approx(relative_slope(values), rel=1e-6, abs=1e-9)


def test_scale_learning_rate_persists_through_the_schedule():
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / 4))  # warm-up 1/4, 2/4, ...
    step = lambda: (opt.step(), sched.step())  # noqa: E731 - no gradients: only the schedule moves
    step()  # lr = 1e-2 · 2/4 = 5e-3
    scale_learning_rate(opt, sched, 0.5)
    assert opt.param_groups[0]["lr"] == pytest.approx(2.5e-3)  # 5e-3 · 0.5
    step()  # base 5e-3 · 3/4
    assert opt.param_groups[0]["lr"] == pytest.approx(3.75e-3)
    step()
    step()  # past warm-up: base 5e-3 · 1
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-3)


# ----------------------------------------------------------------------------- signals on synthetic streams


def test_noisy_stable_stream_never_fires():
    rng = random.Random(0)
    guard = StabilityGuard(GuardConfig())
    kinds = stream(guard, [healthy(rng) for _ in range(200)])
    assert "rollback" not in kinds and "alarm" not in kinds
    assert kinds.count("snapshot") == 1 + (200 - 1) // 5  # the first healthy step, then every 5th


@pytest.mark.parametrize(
    "bad, reason",
    [
        ({"grad/norm": 12.0}, "grad_spike"),  # 12 > 5 × median ≈ 1
        ({"reward/mean": math.nan}, "nonfinite reward/mean"),
        ({"policy/loss": math.inf}, "nonfinite policy/loss"),
        ({"train/skipped_steps": 1.0}, "skipped"),
        ({"mismatch/is_ess": 0.3}, "ess_drop"),  # 0.3 < 0.5 × 0.97
        ({"mismatch/kl_k3": 5e-3}, "kl_spike"),  # 5e-3 > max(10 × 1e-4, 1e-3)
    ],
)
def test_a_single_bad_step_fires(bad, reason):
    rng = random.Random(1)
    guard = StabilityGuard(GuardConfig())
    stream(guard, [healthy(rng) for _ in range(20)])
    action = guard.observe(21, healthy(rng, **bad))
    assert action.kind == "rollback"
    assert any(r.startswith(reason) for r in action.reasons), action.reasons


def test_reward_drop_fires_against_the_best_window_mean():
    guard = StabilityGuard(GuardConfig(reward_window=3, reward_drop=0.2))
    rng = random.Random(2)
    stream(guard, [healthy(rng, **{"reward/mean": r}) for r in (0.6, 0.7, 0.8, 0.7)])
    assert guard.best_reward == pytest.approx(2.2 / 3)  # max(mean(.6, .7, .8) = .7, mean(.7, .8, .7) = .7333)
    # the window (0.8, 0.7, x) must fall below 0.7333 − 0.2 = 0.5333: x < 0.1 fires, x = 0.2 does not
    assert guard.observe(5, healthy(rng, **{"reward/mean": 0.2})).kind != "rollback"


def test_reward_drop_hand_values():
    guard = StabilityGuard(GuardConfig(reward_window=2, reward_drop=0.2))
    rng = random.Random(3)
    stream(guard, [healthy(rng, **{"reward/mean": r}) for r in (0.6, 0.8)])
    assert guard.best_reward == pytest.approx(0.7)  # mean(0.6, 0.8)
    fired, seen = guard.signals(healthy(rng, **{"reward/mean": 0.1}))
    assert seen["reward_mean"] == pytest.approx(0.45)  # mean(0.8, 0.1); 0.45 < 0.7 − 0.2 = 0.5 → fires
    assert any(r.startswith("reward_drop") for r in fired)
    fired, _ = guard.signals(healthy(rng, **{"reward/mean": 0.3}))
    assert not any(r.startswith("reward_drop") for r in fired)  # mean(0.8, 0.3) = 0.55 ≥ 0.5


def test_entropy_crash_fires_and_slow_decline_does_not():
    rng = random.Random(4)
    guard = StabilityGuard(GuardConfig(window=8, entropy_fall=0.8))
    slow = [healthy(rng, **{"policy/entropy": 0.25 - 0.001 * i}) for i in range(40)]  # −3 % per window
    assert "rollback" not in stream(guard, slow)
    crash = [healthy(rng, **{"policy/entropy": 0.21 - 0.025 * i}) for i in range(1, 8)]  # 0.185 → 0.035
    kinds = stream(guard, crash, start=41)
    assert "rollback" in kinds
    assert guard.rollbacks == 1


def test_entropy_falling_while_the_reward_sets_new_highs_is_convergence():
    rng = random.Random(8)
    guard = StabilityGuard(GuardConfig(window=8, entropy_fall=0.8))
    stream(guard, [healthy(rng) for _ in range(10)])
    # entropy 0.185 → 0.035 as before, but the reward climbs 0.7 → 0.94: every window mean is a new best
    sharpening = [healthy(rng, **{"policy/entropy": 0.21 - 0.025 * i, "reward/mean": 0.66 + 0.04 * i}) for i in range(1, 8)]
    assert "rollback" not in stream(guard, sharpening, start=11)


def test_entropy_blow_up_fires():
    rng = random.Random(5)
    guard = StabilityGuard(GuardConfig(window=6, entropy_rise=1.0))
    stream(guard, [healthy(rng) for _ in range(10)])
    rising = [healthy(rng, **{"policy/entropy": 0.2 * 1.4**i}) for i in range(1, 7)]
    assert "rollback" in stream(guard, rising, start=11)


def test_cooldown_and_max_rollbacks():
    rng = random.Random(6)
    cfg = GuardConfig(cooldown=5, max_rollbacks=2, min_history=2)
    guard = StabilityGuard(cfg)
    stream(guard, [healthy(rng) for _ in range(10)])
    spike = {"grad/norm": 50.0}
    assert guard.observe(11, healthy(rng, **spike)).kind == "rollback"
    guard.rollbacks, guard.cooldown_until, guard.history = 1, 11 + cfg.cooldown + 1, {k: [] for k in guard.history}
    # steps 12..16 are the cooldown: a spike there is ignored, a NaN is not
    assert guard.observe(12, healthy(rng, **spike)).kind == "none"
    assert guard.observe(13, healthy(rng, **{"reward/mean": math.nan})).kind == "rollback"
    guard.rollbacks = 2
    for step in range(14, 25):
        guard.observe(step, healthy(rng))
    # out of the cooldown with max_rollbacks reached: an alarm, not a rollback
    action = guard.observe(25, healthy(rng, **spike))
    assert action.kind == "alarm" and guard.alarms == 1


def test_no_snapshot_yet_gives_an_alarm():
    guard = StabilityGuard(GuardConfig())
    assert guard.observe(1, {"reward/mean": math.nan}).kind == "alarm"


# ----------------------------------------------------------------------------- effects on a model


class _Updater:
    """The guard's view of the updater: stateful (a counter stands for filter state) and a trust-region lever."""

    def __init__(self):
        self.filter_state = 0
        self.trust_region_scale = 1.0

    def state_dict(self):
        return {"filter_state": self.filter_state}

    def load_state_dict(self, state):
        self.filter_state = state["filter_state"]

    def set_trust_region_scale(self, scale):
        self.trust_region_scale = scale


def _state(model, opt, sched, updater):
    state = {"model": model, "optimizer": opt, "updater": updater}
    return state if sched is None else {**state, "scheduler": sched}


def test_rollback_restores_the_snapshot_and_cuts_the_lr(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
    updater = _Updater()
    guard = StabilityGuard(GuardConfig(keep_snapshots=2, lr_factor=0.5, clip_factor=0.5), log_path=tmp_path / "g.jsonl")
    guard.bind(_state(model, opt, sched, updater), snapshot=False)

    def train_step():
        opt.zero_grad()
        model(torch.randn(4, 3)).pow(2).sum().backward()
        opt.step()
        sched.step()

    guard.apply(guard.observe(1, {"reward/mean": 0.5}))  # first healthy step: snapshot
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    saved_exp_avg = opt.state_dict()["state"][0]["exp_avg"].clone() if opt.state else None
    train_step()
    updater.filter_state = 7
    guard.apply(guard.observe(2, {"reward/mean": 0.5}))
    train_step()
    train_step()
    assert not torch.equal(model.weight, saved["weight"])
    action = guard.observe(3, {"reward/mean": 0.5, "grad/norm": math.nan})
    assert action.kind == "rollback"
    guard.apply(action)
    assert updater.filter_state == 0  # the updater's state is restored with the weights
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k])
    assert sched.last_epoch == 0  # three scheduler steps since the snapshot, rewound with the weights
    assert saved_exp_avg is None and not opt.state  # the snapshot was taken before any optimizer step
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-3) and sched.base_lrs == [pytest.approx(5e-3)]
    assert updater.trust_region_scale == 0.5
    assert guard.metrics() == {"guard/rollbacks": 1.0, "guard/alarms": 0.0, "guard/lr_scale": 0.5, "guard/clip_scale": 0.5}
    events = [json.loads(line) for line in (tmp_path / "g.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["snapshot", "rollback"]
    assert events[1]["restored_step"] == 1 and events[1]["reasons"] == ["nonfinite grad/norm"]


def test_the_first_healthy_step_after_the_cooldown_snapshots(tmp_path):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    guard = StabilityGuard(GuardConfig(cooldown=3, snapshot_every=5))
    guard.bind(_state(model, opt, None, _Updater()))  # snapshot of step 0
    rng = random.Random(9)
    guard.apply(guard.observe(1, healthy(rng)))
    guard.apply(guard.observe(2, healthy(rng, **{"reward/mean": math.nan})))  # rollback to 0, cooldown 3..5
    assert guard.rollbacks == 1 and [s.step for s in guard.snapshots] == [0]
    kinds = []
    for step in range(3, 8):
        action = guard.observe(step, healthy(rng))
        guard.apply(action)
        kinds.append(action.kind)
    assert kinds == ["none", "none", "none", "snapshot", "none"]  # steps 3-5 cool down, step 6 snapshots
    assert [s.step for s in guard.snapshots] == [0, 6]


def test_state_dict_round_trip_through_torch_save(tmp_path):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    guard = StabilityGuard(GuardConfig())
    guard.bind(_state(model, opt, None, _Updater()), snapshot=False)
    rng = random.Random(7)
    for step in range(1, 12):
        guard.apply(guard.observe(step, healthy(rng)))
    guard.clip_scale, guard.rollbacks = 0.25, 2
    torch.save(guard.state_dict(), tmp_path / "g.pt")
    other = StabilityGuard(GuardConfig())
    other.load_state_dict(torch.load(tmp_path / "g.pt", weights_only=True))
    assert other.state_dict()["history"] == guard.state_dict()["history"]
    assert other.rollbacks == 2 and other.best_reward == guard.best_reward
    assert [s.step for s in other.snapshots] == [s.step for s in guard.snapshots]
    assert torch.equal(other.snapshots[0].state["model"]["weight"], guard.snapshots[0].state["model"]["weight"])
    updater2 = _Updater()
    other.bind(_state(model, opt, None, updater2))  # a restored clip_scale is re-applied to the loss
    assert updater2.trust_region_scale == 0.25


# ----------------------------------------------------------------------------- e2e in the trainer

_GUARD = (  # short windows: the absurd LR freezes the tiny policy (entropy 3.1 → 0) in one step
    "guard.window=2",
    "guard.min_history=1",
    "guard.snapshot_every=2",
    "guard.grad_spike=3.0",
    "guard.cooldown=1",
    "guard.max_rollbacks=2",
)


def test_guarded_run_with_an_absurd_lr_rolls_back_and_stays_finite(tiny_config):
    cfg = tiny_config("optim.steps=8", "optim.lr=30.0", "optim.grad_clip=0", *_GUARD)
    trainer = Trainer(cfg, task=SevensTask())
    trainer.train()
    rows = read_metrics(cfg.run.output_dir)
    assert rows[-1]["guard/rollbacks"] >= 1
    assert rows[-1]["guard/lr_scale"] == pytest.approx(cfg.guard.lr_factor ** rows[-1]["guard/rollbacks"])
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(30.0 * rows[-1]["guard/lr_scale"])
    for p in trainer.model.parameters():
        assert torch.isfinite(p).all()
    events = [json.loads(line) for line in (trainer.run_dir / "guard.jsonl").read_text().splitlines()]
    rollbacks = [e for e in events if e["event"] == "rollback"]
    assert rollbacks and all(e["reasons"] and e["restored_step"] < e["step"] for e in rollbacks)


def test_guarded_resume_is_exact(tiny_config, tmp_path):
    def run(out, stop_after=None):
        cfg = tiny_config("optim.steps=8", "optim.lr=30.0", "optim.grad_clip=0", "checkpoint.every=4",
                          f"run.output_dir={out}", *_GUARD)
        trainer = Trainer(cfg, task=SevensTask())
        trainer.train(stop_after=stop_after)
        return trainer

    straight = run(tmp_path / "straight")
    run(tmp_path / "resumed", stop_after=4)
    resumed = run(tmp_path / "resumed")
    assert resumed.start_step == 4

    def comparable(rows):  # NaN != NaN: compare reprs
        return [{k: repr(v) for k, v in r.items() if not k.startswith("perf/") and k != "wall_s"} for r in rows]

    straight_rows = comparable(read_metrics(tmp_path / "straight"))
    assert float(straight_rows[-1]["guard/rollbacks"]) >= 1
    assert straight_rows == comparable(read_metrics(tmp_path / "resumed"))
    assert (tmp_path / "straight" / "guard.jsonl").read_text() == (tmp_path / "resumed" / "guard.jsonl").read_text()
    for a, b in zip(straight.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
