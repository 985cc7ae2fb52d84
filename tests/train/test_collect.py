"""The collect stage alone: prompts → rollout → reward → advantage, and the metric accumulator.

    .venv/bin/python -m pytest -q tests/train/test_collect.py
"""

from __future__ import annotations

import torch

from sevens_task import SevensTask
from steadyrl import registry
from steadyrl.models import load_model, load_tokenizer
from steadyrl.rollout.base import SamplingParams
from steadyrl.runtime.distributed import DistInfo
from steadyrl.runtime.metrics import MetricAccumulator
from steadyrl.train.collect import RolloutCollector


def _collector(model_dir: str, **kw) -> RolloutCollector:
    tokenizer, model = load_tokenizer(model_dir), load_model(model_dir)
    backend = registry.build_backend("hf", model, tokenizer)
    return RolloutCollector(
        backend, tokenizer, SevensTask(), registry.resolve("advantage", "grpo"),
        params=SamplingParams(max_new_tokens=4), prompts_per_step=3, group_size=4, info=DistInfo(), seed=1,
        device=torch.device("cpu"), **kw,
    )


def test_a_collected_batch_has_whole_groups_rewards_and_masked_advantages(tiny_model_dir):
    collected = _collector(tiny_model_dir).collect(step=1)
    batch = collected.batch
    assert batch.batch_size == 12 and len(collected.prompts) == 12
    assert [p.id for p in collected.prompts[::4]] == [p.id for p in collected.prompts[3::4]]  # groups contiguous
    expected = torch.tensor([SevensTask().reward(p, c) for p, c in zip(collected.prompts, collected.completions)])
    torch.testing.assert_close(batch.rewards, expected.float())
    assert batch.advantages.shape == batch.rollout.completion_ids.shape
    assert torch.equal(batch.advantages[~batch.rollout.response_mask], torch.zeros_like(batch.advantages[~batch.rollout.response_mask]))
    grouped = batch.rewards.view(3, 4)
    adv = batch.advantages[:, 0].view(3, 4)
    torch.testing.assert_close(adv.sum(dim=1), torch.zeros(3), atol=1e-5, rtol=0)  # GRPO: zero-sum groups
    assert torch.equal(adv.argmax(1), grouped.argmax(1)) or bool((grouped.std(1) == 0).any())
    assert {"reward/mean", "adv/zero_std_frac", "rollout/len_mean", "rollout/truncated_frac"} <= set(collected.metrics)


def test_the_same_step_draws_the_same_batch_and_truncated_samples_can_be_left_out(tiny_model_dir):
    a, b = _collector(tiny_model_dir).collect(2), _collector(tiny_model_dir).collect(2)
    assert torch.equal(a.batch.rollout.completion_ids, b.batch.rollout.completion_ids)  # seeded by the step
    masked = _collector(tiny_model_dir, mask_truncated=True).collect(2).batch
    assert torch.equal(masked.sample_mask, a.batch.sample_mask & ~a.batch.rollout.truncated)


def test_metric_accumulator_weights_means_and_reduces_extremes():
    acc = MetricAccumulator()
    acc.add({"x/mean": torch.tensor(1.0), "x/val_max": torch.tensor(2.0), "x/val_min": torch.tensor(5.0)}, 3.0)
    acc.add({"x/mean": torch.tensor(4.0), "x/val_max": torch.tensor(-1.0), "x/val_min": torch.tensor(0.5)}, 1.0)
    # token-weighted mean (1·3 + 4·1) / 4 = 1.75; max of maxes, min of mins
    assert acc.compute() == {"x/mean": 1.75, "x/val_max": 2.0, "x/val_min": 0.5}
