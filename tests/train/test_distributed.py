"""Data parallelism on CPU: 2 processes (gloo) give the same update as 1 process on the same batch.

    .venv/bin/python -m pytest -q tests/train/test_distributed.py

One ScoredBatch is collected once by a single-process trainer and saved. The single process updates on the
whole batch; two spawned processes each update on their half of the groups (rank r: rows [r·B/2, (r+1)·B/2)).
Losses are normalised by global counts and SumCombiner sums the gradients over ranks (train/distributed.py),
so the gradient, and hence the parameters after the step, agree to float rounding.

Every case uses optim.mini_batches=1. With N > 1 mini-batches each rank splits *its own* rows into N
contiguous pieces, so the global mini-batch k is {piece k of rank 0} ∪ {piece k of rank 1}, while one process
takes rows [k·B/N, (k+1)·B/N): the optimizer steps see different samples, and the updates differ by design.

SGD without clipping makes the parameter change −lr·g, so any error in the gradient's scale shows up (AdamW's
first step is nearly lr·sign(g) and would hide a wrong normaliser); one case keeps the trainer's own AdamW with
clipping, the configuration people actually run, and compares the gradient norm too.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from sevens_task import SevensTask
from steadyrl.config_load import load_config
from steadyrl.stabilisers.combiners import SumCombiner
from steadyrl.train.trainer import Trainer

WORLD_SIZE = 2
TIMEOUT_S = 240

CASES: dict[str, tuple[tuple[str, ...], bool]] = {
    # name: (overrides, swap in SGD)
    "token_mean": (("aggregation.name=token_mean", "optim.micro_batch_size=3"), True),
    "seq_mean_token_mean_kl": (
        ("aggregation.name=seq_mean_token_mean", "kl.coef=0.1", "kl.estimator=kl_k3", "optim.micro_batch_size=3"),
        True,
    ),
    "constant_norm_tis_adamw": (
        ("aggregation.name=constant_norm", "correction.name=token_tis", "optim.micro_batch_size=2", "optim.grad_clip=0.5"),
        False,
    ),
}


def _config(model_dir: str, out_dir: Path, overrides: tuple[str, ...]):
    base = [
        f"model.name_or_path={model_dir}",
        "rollout.prompts_per_step=4",
        "rollout.group_size=4",
        "rollout.max_new_tokens=4",
        "optim.steps=1",
        "optim.lr=1e-2",
        "optim.grad_clip=0",
        "optim.mini_batches=1",
        "eval.every=0",
        "logging.progress=false",
        "logging.report=false",
        "logging.tensorboard=false",
        "checkpoint.save_final_model=false",
        f"run.output_dir={out_dir}",
        "run.device=cpu",
    ]
    return load_config(None, base + list(overrides))


def _use_sgd(trainer: Trainer, lr: float = 0.5) -> None:
    updater = trainer.updater
    updater.optimizer = torch.optim.SGD(updater.params, lr=lr)
    updater.scheduler = torch.optim.lr_scheduler.LambdaLR(updater.optimizer, lambda step: 1.0)


def _trainer(model_dir: str, out_dir: Path, case: str) -> Trainer:
    return Trainer(_config(model_dir, out_dir, CASES[case][0]), task=SevensTask())


def _update(trainer: Trainer, case: str, batch) -> tuple[dict, dict]:
    if CASES[case][1]:
        _use_sgd(trainer)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    metrics = trainer.updater.update(batch).metrics
    delta = {n: p.detach() - before[n] for n, p in trainer.model.named_parameters()}
    return delta, metrics


def _worker(rank: int, port: int, model_dir: str, work: str) -> None:
    """One rank: join the gloo group through the environment, as torchrun would set it, then update."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    work_dir = Path(work)
    results: dict = {"combiner": _combiner_check(rank)}
    for case in CASES:
        batch = torch.load(work_dir / f"{case}.batch.pt", weights_only=False)
        half = batch.batch_size // WORLD_SIZE
        local = batch.select(torch.arange(rank * half, (rank + 1) * half))
        results[case] = _update(_trainer(model_dir, work_dir / f"run-{case}", case), case, local)
    torch.save(results, work_dir / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def _combiner_check(rank: int) -> dict:
    """SumCombiner(distributed=True) sums .grad over ranks; a parameter unused on one rank takes part as zeros."""
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
    used = torch.nn.Parameter(torch.zeros(2))
    sometimes = torch.nn.Parameter(torch.zeros(1))
    combiner = SumCombiner(distributed=True)
    combiner.begin([used, sometimes])
    if rank == 0:
        combiner.backward({"policy": (used * torch.tensor([1.0, 2.0])).sum()})  # grad [1, 2]; `sometimes` unused
    else:
        combiner.backward({"policy": (used * torch.tensor([10.0, 20.0])).sum() + 5.0 * sometimes.sum()})
    combiner.finalize([used, sometimes])
    return {"used": used.grad.tolist(), "sometimes": sometimes.grad.tolist()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """(single-process {case: (delta, metrics)}, per-rank {case: (delta, metrics), "combiner": ...}, work dir)."""
    assert int(os.environ.get("WORLD_SIZE", "1")) == 1, "the single-process reference must not join a group"
    work = tmp_path_factory.mktemp("distributed")
    single = {}
    for case in CASES:
        trainer = _trainer(tiny_model_dir, work / f"single-{case}", case)
        batch = trainer.collector.collect(1).batch  # sampling leaves the parameters as they were
        trainer.scorer.score(batch)  # π_ref for the KL case, computed once and shipped with the batch
        torch.save(batch, work / f"{case}.batch.pt")
        single[case] = _update(trainer, case, batch)

    context = mp.spawn(_worker, args=(_free_port(), tiny_model_dir, str(work)), nprocs=WORLD_SIZE, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {WORLD_SIZE} gloo processes did not finish in {TIMEOUT_S}s")
    ranks = [torch.load(work / f"rank{r}.pt", weights_only=False) for r in range(WORLD_SIZE)]
    return single, ranks, work


def test_sum_combiner_sums_gradients_over_ranks(runs):
    _, ranks, _ = runs
    for result in ranks:
        assert result["combiner"] == {"used": [11.0, 22.0], "sometimes": [5.0]}  # [1+10, 2+20], 0+5


@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_give_the_same_update_as_one(runs, case):
    single, ranks, _ = runs
    delta_single, metrics_single = single[case]
    for rank, result in enumerate(ranks):
        delta_dist, metrics_dist = result[case]
        assert delta_single.keys() == delta_dist.keys()
        changed = 0
        for name, expected in delta_single.items():
            torch.testing.assert_close(delta_dist[name], expected, rtol=1e-4, atol=1e-6, msg=f"rank {rank}: {name}")
            changed += bool(expected.abs().sum() > 0)
        assert changed == len(delta_single), "the reference update left parameters unchanged"
        # Global metrics agree too: the gradient norm is taken after the sum over ranks.
        for key in ("grad/norm", "policy/loss", "policy/entropy"):
            assert metrics_dist[key] == pytest.approx(metrics_single[key], rel=1e-5, abs=1e-7), (rank, key)
        if "kl" in case:
            assert metrics_dist["kl/ref_k3"] == pytest.approx(metrics_single["kl/ref_k3"], rel=1e-5, abs=1e-8)
            assert metrics_single["kl/ref_k3"] == 0.0  # π_θ = π_ref before the first step; the KL gradient is not 0


def test_halves_alone_do_not_give_the_same_update(runs, tiny_model_dir, tmp_path):
    """Control: one process on half the batch (no group, local counts) differs, so the comparison can fail."""
    single, _, work = runs
    batch = torch.load(work / "token_mean.batch.pt", weights_only=False)
    half = batch.select(torch.arange(batch.batch_size // 2))
    delta_half, _ = _update(_trainer(tiny_model_dir, tmp_path / "half", "token_mean"), "token_mean", half)
    delta_single, _ = single["token_mean"]
    assert any(not torch.allclose(delta_half[n], delta_single[n], rtol=1e-4, atol=1e-6) for n in delta_single)
