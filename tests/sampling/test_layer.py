"""The sampling layer inside the collect stage: defaults unchanged, DAPO's rounds and cap, replay and hints
in place, state that resumes.

    .venv/bin/python -m pytest -q tests/sampling/test_layer.py
"""

from __future__ import annotations

import copy

import torch

from sampling_fakes import fake_collector
from sevens_task import SevensTask
from steadyrl import registry
from steadyrl.models import load_model, load_tokenizer
from steadyrl.ops.sampling import zero_variance_groups
from steadyrl.rollout.base import SamplingParams
from steadyrl.rollout.text import decode_completions, encode_prompts, eos_ids
from steadyrl.runtime.distributed import DistInfo
from steadyrl.runtime.seeding import step_seed
from steadyrl.sampling.groups import HINTED, REPLAYED
from steadyrl.tasks import score_completions
from steadyrl.train.collect import RolloutCollector

DAPO = "sampling.filters=[{name: dynamic_sampling, max_rounds: 3}]"


def test_the_default_layer_draws_generates_and_scores_what_the_collector_always_did(tiny_model_dir):
    tokenizer, model = load_tokenizer(tiny_model_dir), load_model(tiny_model_dir)
    backend = registry.build_backend("hf", model, tokenizer)
    grpo = registry.resolve("advantage", "grpo")
    collector = RolloutCollector(backend, tokenizer, SevensTask(), grpo, params=SamplingParams(max_new_tokens=4),
                                 prompts_per_step=3, group_size=4, info=DistInfo(), seed=1, device=torch.device("cpu"))
    got = collector.collect(step=2)
    # the collect stage before the sampling layer existed, line by line
    prompts = [p for p in SevensTask().sample("train", 3, seed=step_seed(1, 2)) for _ in range(4)]
    ids, mask = encode_prompts(tokenizer, prompts, torch.device("cpu"))
    generator = torch.Generator().manual_seed(step_seed(1, 2, 1))
    rollout = backend.generate(ids, mask, SamplingParams(max_new_tokens=4), generator=generator)
    completions = decode_completions(tokenizer, rollout.completion_ids, rollout.response_mask, eos_ids(tokenizer))
    rewards = score_completions(SevensTask(), prompts, completions)
    adv = grpo(rewards, 4).advantages
    assert got.prompts == prompts and got.completions == completions
    assert torch.equal(got.batch.rollout.completion_ids, rollout.completion_ids)
    assert torch.equal(got.batch.rewards, rewards)
    assert torch.equal(got.batch.advantages[:, 0], torch.where(rollout.response_mask[:, 0], adv, 0.0))
    assert got.metrics["sampling/generated"].item() == 12 and got.metrics["sampling/rounds"].item() == 1


def test_dynamic_sampling_fills_the_batch_with_informative_groups_within_its_cap():
    collector = fake_collector([DAPO], prompts_per_step=4)
    for step in range(1, 6):
        out = collector.collect(step)
        batch, metrics = out.batch, out.metrics
        assert batch.batch_size == 16  # always P·G rows
        rounds = metrics["sampling/rounds"].item()
        assert 1 <= rounds <= 3
        unfilled = int(metrics["sampling/unfilled_groups"].item())
        kept = batch.sample_mask.view(4, 4).all(1)
        assert (~kept).sum().item() == unfilled  # the filler groups are out of the loss
        live = torch.where(batch.sample_mask, batch.rewards, float("nan"))
        assert not (zero_variance_groups(live, 4) & kept).any()  # never a kept group without variance
        # generated: 16 in round 0, then the missing groups (×G) of each later round
        assert metrics["sampling/generated"].item() >= 16 and (rounds > 1) == (metrics["sampling/generated"].item() > 16)
        assert metrics["adv/zero_std_frac"].item() == unfilled / 4


def test_dynamic_sampling_stops_at_its_cap_and_counts_what_it_cost():
    collector = fake_collector(["sampling.filters=[{name: dynamic_sampling, max_rounds: 1}]"], prompts_per_step=4)
    metrics = [collector.collect(s).metrics for s in range(1, 8)]
    assert all(m["sampling/rounds"].item() == 1 and m["sampling/generated"].item() == 16 for m in metrics)
    assert any(m["sampling/unfilled_groups"].item() > 0 for m in metrics)  # a cap of 1 round leaves some short


def test_r3_and_sage_change_rows_in_place():
    collector = fake_collector(["sampling.selector={name: uniform, pool_size: 4}", "sampling.augmenters=[{name: r3_replay}]"])
    origins = []
    for step in range(1, 8):
        collector.backend.sync_weights()  # the fake policy moves: a prompt's group changes from step to step
        groups = collector.layer.collect(step, collector.generate)
        origins.append(groups.origin.clone())
        replayed = groups.origin == REPLAYED
        if replayed.any():  # a replayed row restores variance to its group
            g = int(replayed.nonzero()[0]) // 4
            assert not zero_variance_groups(groups.rewards[g * 4 : g * 4 + 4], 4).item()
    assert any((o == REPLAYED).any() for o in origins)

    sage = fake_collector(["sampling.augmenters=[{name: sage_hints}]"], prompts_per_step=8)
    hinted_any = False
    for step in range(1, 4):
        sage.backend.sync_weights()
        groups = sage.layer.collect(step, sage.generate)
        hinted = (groups.origin == HINTED).view(-1, 4).all(1)
        hinted_any |= bool(hinted.any())
        for g in hinted.nonzero().flatten().tolist():  # regenerated from "a+b=7", scored as "7…"
            assert all(p.text.endswith("=7") for p in groups.row_prompts[g * 4 : g * 4 + 4])
            assert groups.rewards[g * 4 : g * 4 + 4].eq(1.0).all()
        assert sage.layer.metrics()["sampling/generated"].item() == 32 + 4 * int(hinted.sum())
    assert hinted_any


def test_the_layer_state_resumes_the_same_draws():
    overrides = ["sampling.selector={name: vade, pool_size: 12}", "sampling.advantage={name: dcpo}", DAPO,
                 "sampling.augmenters=[{name: r3_replay}]"]
    straight = fake_collector(overrides)
    expected = [straight.collect(step) for step in range(1, 5)]
    first = fake_collector(overrides)
    for step in (1, 2):
        first.collect(step)
    resumed = fake_collector(overrides)
    resumed.layer.load_state_dict(copy.deepcopy(first.layer.state_dict()))
    resumed.backend.version = first.backend.version  # the fake policy's "weights" come back with a checkpoint too
    for step in (3, 4):
        got, want = resumed.collect(step), expected[step - 1]
        assert got.prompts == want.prompts
        assert torch.equal(got.batch.rollout.completion_ids, want.batch.rollout.completion_ids)
        assert torch.equal(got.batch.advantages, want.batch.advantages)
    assert str(resumed.layer.state_dict()) == str(straight.layer.state_dict())
