"""A run with a stateful sampling layer resumes exactly: N straight steps == k steps, a checkpoint, N − k more.

    .venv/bin/python -m pytest -q tests/train/test_sampling_resume.py
"""

from __future__ import annotations

import pytest
import torch

from sevens_task import SevensTask
from steadyrl.report import read_metrics
from steadyrl.train.trainer import Trainer

LAYERS = {
    # posterior + per-prompt history + over-sampling rounds + trajectory store
    "vade_dcpo_dapo_r3": ("sampling.selector={name: vade, pool_size: 12}", "sampling.advantage={name: dcpo}",
                          "sampling.filters=[{name: dynamic_sampling, max_rounds: 2}]",
                          "sampling.augmenters=[{name: r3_replay}]"),
    # quantile tracker + hinted regeneration + a momentum copy of the policy + the IQR filter
    "riskpo_sage_mgrpo": ("sampling.advantage={name: riskpo, bundle_size: 2}", "sampling.augmenters=[{name: sage_hints}]",
                          "sampling.reward_shapers=[{name: majority_vote, momentum: 0.5, momentum_samples: 2}]",
                          "sampling.filters=[{name: iqr_entropy}]"),
}


@pytest.mark.parametrize("layer", list(LAYERS))
def test_resume_with_sampling_state_is_exact(tiny_config, tmp_path, layer):
    def run(out, stop_after=None):
        cfg = tiny_config("optim.steps=4", "checkpoint.every=2", f"run.output_dir={out}", *LAYERS[layer])
        trainer = Trainer(cfg, task=SevensTask())
        trainer.train(stop_after=stop_after)
        return trainer

    straight = run(tmp_path / "straight")
    run(tmp_path / "resumed", stop_after=2)
    resumed = run(tmp_path / "resumed")
    assert resumed.start_step == 2

    def comparable(rows):
        return [{k: v for k, v in r.items() if not k.startswith("perf/") and k != "wall_s"} for r in rows]

    assert comparable(read_metrics(tmp_path / "straight")) == comparable(read_metrics(tmp_path / "resumed"))
    assert str(straight.collector.layer.state_dict()) == str(resumed.collector.layer.state_dict())
    for (name, a), b in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), name
    assert any(r.get("sampling/generated", 0) > 0 for r in read_metrics(tmp_path / "straight"))
