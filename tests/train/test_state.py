"""One owner per piece of state: a checkpoint and a guard rollback restore the same training state.

    .venv/bin/python -m pytest -q tests/train/test_state.py
"""

from __future__ import annotations

import torch

from sevens_task import SevensTask
from steadyrl.runtime.checkpoint import latest_checkpoint, load_checkpoint
from steadyrl.stabilisers.guard import GuardAction
from steadyrl.train.trainer import Trainer

# CAPO (adam optimizer model) is the stateful token filter, VADE (posterior) and DCPO (per-prompt store) the
# stateful sampling layer; the guard snapshots every healthy step.
_STATEFUL = (
    "token_filters=[{name: capo, fisher_tau: 0.0, hessian_tau: 0.0}]",
    "sampling.selector={name: vade, pool_size: 8}",
    "sampling.advantage={name: dcpo}",
    "guard.snapshot_every=1",
    "guard.keep_snapshots=1",
    "checkpoint.every=2",
    "checkpoint.keep_last=5",
)


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a.cpu(), b.cpu())
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def test_a_rollback_restores_everything_a_checkpoint_restores(tiny_config):
    cfg = tiny_config("optim.steps=4", *_STATEFUL)
    trainer = Trainer(cfg, task=SevensTask())
    trainer.train(stop_after=2)  # checkpoint of step 2; the guard snapshotted step 2 as well
    guard = trainer.guard
    assert [s.step for s in guard.snapshots] == [2]
    snapshot = guard.snapshots[0].state
    # The snapshot holds exactly the training state a checkpoint restores besides the run's progress ...
    assert set(snapshot) == set(trainer.training_state()) == {"model", "optimizer", "scheduler", "updater", "sampling"}
    assert snapshot["updater"]["token_filters"][0]["exp_avg"] is not None  # CAPO's moments are in it
    assert snapshot["sampling"]["store"]["records"] and snapshot["sampling"]["selector"]["seen"].any()
    # ... and the checkpoint of the same step holds the same values.
    fresh = Trainer(cfg, task=SevensTask())  # resumes from step 2
    for name, obj in fresh.training_state().items():
        assert _equal(obj.state_dict(), snapshot[name]), name

    for step in (3, 4):  # train on, then roll back to the snapshot of step 2
        trainer.rl_step(step)
    assert not _equal(trainer.updater.state_dict(), snapshot["updater"])
    assert not _equal(trainer.collector.layer.state_dict(), snapshot["sampling"])
    guard.apply(GuardAction("rollback", 4, ("test",)))
    for name, obj in trainer.training_state().items():
        state = obj.state_dict()
        if name == "optimizer":  # the rollback then cuts the LR (guard.lr_factor): compare everything else
            for group in state["param_groups"] + snapshot[name]["param_groups"]:
                group.pop("lr"), group.pop("initial_lr", None)
        if name == "scheduler":
            state.pop("base_lrs"), state.pop("_last_lr")
            snapshot[name] = {k: v for k, v in snapshot[name].items() if k not in ("base_lrs", "_last_lr")}
        assert _equal(state, snapshot[name]), name


def test_a_resumed_run_restores_the_updater_and_the_progress(tiny_config):
    cfg = tiny_config("optim.steps=3", *_STATEFUL)
    first = Trainer(cfg, task=SevensTask())
    first.train(stop_after=2)
    first.progress["skipped_steps"] = 5  # a record the checkpoint must carry
    first.save(2)
    resumed = Trainer(cfg, task=SevensTask())
    assert resumed.start_step == 2 and resumed.progress["skipped_steps"] == 5
    assert _equal(resumed.updater.state_dict(), first.updater.state_dict())
    extra = load_checkpoint(latest_checkpoint(cfg.run.output_dir), model=resumed.model, restore_rng=False)["extra"]
    assert set(extra) == {"updater", "sampling", "progress", "guard", "watch"}
