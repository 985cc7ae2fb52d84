"""A run with a stateful sampling layer resumes exactly: N straight steps == k steps, a checkpoint, N − k more.

    .venv/bin/python -m pytest -q tests/train/test_sampling_resume.py
"""

from __future__ import annotations

import pytest

from resume_check import assert_resume_is_exact
from steadyrl.report import read_metrics

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
    def config_for(out):
        return tiny_config("optim.steps=4", "checkpoint.every=2", f"run.output_dir={out}", *LAYERS[layer])

    straight, resumed = assert_resume_is_exact(config_for, tmp_path, stop_after=2)
    assert str(straight.collector.layer.state_dict()) == str(resumed.collector.layer.state_dict())
    assert any(r.get("sampling/generated", 0) > 0 for r in read_metrics(tmp_path / "straight"))
