"""LoRA under data parallelism on CPU: 2 processes (gloo) move the adapters exactly as 1 process does on the
whole batch, and the frozen base weights not at all (tests/train/test_distributed.py has the method).

Run: .venv/bin/python -m pytest -q tests/train/test_lora_distributed.py
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from extras import requires_extra
from sevens_task import SevensTask
from steadyrl.config_load import load_config
from steadyrl.train.trainer import Trainer

pytestmark = requires_extra("lora", "peft")
WORLD_SIZE = 2
TIMEOUT_S = 240


def _trainer(model_dir: str, out_dir: Path) -> Trainer:
    cfg = load_config(
        None,
        [
            f"model.name_or_path={model_dir}",
            "model.lora={r: 4, alpha: 8, target_modules: [q_proj, v_proj, up_proj]}",
            "kl.coef=0.1",
            "rollout.prompts_per_step=4",
            "rollout.group_size=4",
            "rollout.max_new_tokens=4",
            "optim.steps=1",
            "optim.grad_clip=0",
            "optim.micro_batch_size=3",
            "eval.every=0",
            "logging.progress=false",
            "logging.report=false",
            "logging.tensorboard=false",
            "checkpoint.save_final_model=false",
            f"run.output_dir={out_dir}",
            "run.device=cpu",
        ],
    )
    trainer = Trainer(cfg, task=SevensTask())
    with torch.no_grad():  # B ≠ 0 (the same in every process), so that A has a gradient as well
        g = torch.Generator().manual_seed(0)
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    updater = trainer.updater
    updater.optimizer = torch.optim.SGD(updater.params, lr=0.5)  # the step is −lr·g: the gradient's scale shows
    updater.scheduler = torch.optim.lr_scheduler.LambdaLR(updater.optimizer, lambda step: 1.0)
    return trainer


def _update(trainer: Trainer, batch) -> dict[str, torch.Tensor]:
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.updater.update(batch)
    return {n: p.detach() - before[n] for n, p in trainer.model.named_parameters()}


def _worker(rank: int, port: int, model_dir: str, work: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    work_dir = Path(work)
    batch = torch.load(work_dir / "batch.pt", weights_only=False)
    half = batch.batch_size // WORLD_SIZE
    delta = _update(_trainer(model_dir, work_dir / f"run-{rank}"), batch.select(torch.arange(rank * half, (rank + 1) * half)))
    torch.save(delta, work_dir / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_move_the_adapters_as_one(tiny_model_dir, tmp_path):
    trainer = _trainer(tiny_model_dir, tmp_path / "single")
    batch = trainer.collector.collect(1).batch
    trainer.scorer.score(batch)  # π_ref (adapters disabled), shipped with the batch
    torch.save(batch, tmp_path / "batch.pt")
    single = _update(trainer, batch)
    context = mp.spawn(_worker, args=(_free_port(), tiny_model_dir, str(tmp_path)), nprocs=WORLD_SIZE, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {WORLD_SIZE} gloo processes did not finish in {TIMEOUT_S}s")
    for rank in range(WORLD_SIZE):
        delta = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert delta.keys() == single.keys()
        for name, expected in single.items():
            if "lora_" in name:
                assert expected.abs().sum() > 0, name
                torch.testing.assert_close(delta[name], expected, rtol=1e-4, atol=1e-6, msg=f"rank {rank}: {name}")
            else:
                assert not delta[name].any() and not expected.any(), name
