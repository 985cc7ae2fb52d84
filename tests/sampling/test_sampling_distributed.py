"""The sampling layer on 2 processes (gloo) takes exactly the decisions it takes on 1.

    .venv/bin/python -m pytest -q tests/sampling/test_sampling_distributed.py

Generation is the deterministic ``FakeBackend`` (a completion depends on the prompt and the step, not on the
rank or the generator), so one process and two generate the same rows and every difference would come from
the layer: the prompts it selects, the groups it drops and refills, the rows it replays or regenerates, the
advantages, its state.  Three configurations cover both paths: every rank holding every row (a refilling
filter or an augmenter) and each rank keeping its own rows (only the advantage's inputs gathered).
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from sampling_fakes import fake_collector
from steadyrl.runtime.distributed import DistInfo

WORLD_SIZE, STEPS, TIMEOUT_S = 2, 4, 240
CASES = {
    "vade_dapo_r3_dcpo": ["sampling.selector={name: vade, pool_size: 16}", "sampling.advantage={name: dcpo}",
                          "sampling.filters=[{name: dynamic_sampling, max_rounds: 3}]", "sampling.augmenters=[{name: r3_replay}]"],
    "pool_iqr_overlong_riskpo": ["sampling.selector={name: uniform, pool_size: 16}", "sampling.filters=[{name: iqr_entropy}]",
                                 "sampling.reward_shapers=[{name: overlong_penalty, buffer_len: 2}]",
                                 "sampling.advantage={name: riskpo, bundle_size: 2}"],
    "sage_copo": ["sampling.augmenters=[{name: sage_hints}]", "sampling.advantage={name: copo}"],
}
METRICS = ("sampling/generated", "sampling/rounds", "sampling/zero_var_generated_frac", "adv/zero_std_frac", "reward/mean")


def _run(case: str, info: DistInfo) -> dict:
    collector = fake_collector(CASES[case], info=info, prompts_per_step=4)
    steps = []
    for step in range(1, STEPS + 1):
        out = collector.collect(step)
        b = out.batch
        mask = b.rollout.response_mask
        steps.append({
            "tokens": [row[m].tolist() for row, m in zip(b.rollout.completion_ids, mask)],
            "prompts": [p.text for p in out.prompts],
            "advantages": torch.where(mask.any(1), b.advantages[:, 0], 0.0),
            "sample_mask": b.sample_mask.clone(),
            "metrics": {k: float(out.metrics[k]) for k in METRICS if k in out.metrics},
        })
    return {"steps": steps, "state": str(collector.layer.state_dict())}


def _worker(rank: int, port: int, work: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")
    info = DistInfo(rank, WORLD_SIZE, rank)
    torch.save({case: _run(case, info) for case in CASES}, Path(work) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    assert int(os.environ.get("WORLD_SIZE", "1")) == 1
    work = tmp_path_factory.mktemp("sampling-distributed")
    single = {case: _run(case, DistInfo()) for case in CASES}
    context = mp.spawn(_worker, args=(_free_port(), str(work)), nprocs=WORLD_SIZE, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {WORLD_SIZE} gloo processes did not finish in {TIMEOUT_S}s")
    return single, [torch.load(work / f"rank{r}.pt", weights_only=False) for r in range(WORLD_SIZE)]


@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_select_filter_augment_and_score_like_one(runs, case):
    single, ranks = runs
    for step, want in enumerate(single[case]["steps"]):
        parts = [r[case]["steps"][step] for r in ranks]
        assert sum((p["prompts"] for p in parts), []) == want["prompts"], step
        assert sum((p["tokens"] for p in parts), []) == want["tokens"], step
        torch.testing.assert_close(torch.cat([p["advantages"] for p in parts]), want["advantages"], rtol=0, atol=1e-6)
        assert torch.equal(torch.cat([p["sample_mask"] for p in parts]), want["sample_mask"]), step
        for p in parts:
            for key, value in want["metrics"].items():
                assert p["metrics"][key] == pytest.approx(value, abs=1e-6), (step, key)
    for r in ranks:
        assert r[case]["state"] == single[case]["state"]  # every rank holds the single process's state


def test_the_comparison_can_fail(runs):
    """Control: the layer's decisions actually vary across steps and cases (the rows are not trivially equal)."""
    single, _ = runs
    generated = [s["metrics"]["sampling/generated"] for s in single["vade_dapo_r3_dcpo"]["steps"]]
    assert max(generated) > 16 or any(s["sample_mask"].logical_not().any() for s in single["vade_dapo_r3_dcpo"]["steps"])
    advantages = [s["advantages"] for s in single["pool_iqr_overlong_riskpo"]["steps"]]
    assert any(a.abs().sum() > 0 for a in advantages)
