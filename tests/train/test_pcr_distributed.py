"""Two processes (gloo) split the micro-batches of one step: PCR / PCGrad must see the statistics and write the
gradients of one process that ran them all (S, Q and J are all-reduced before α and the projection).

Run: .venv/bin/python -m pytest -q tests/train/test_pcr_distributed.py
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from steadyrl.stabilisers.pcr import PCGradCombiner, PCRCombiner

WORLD_SIZE = 2
NUM_MICRO = 6
COMBINERS = {
    "pcr_mlp": lambda model, distributed: PCRCombiner(model=model, distributed=distributed),
    "pcr_all": lambda model, distributed: PCRCombiner(model=model, distributed=distributed, modules="all"),
    "pcgrad": lambda model, distributed: PCGradCombiner(model=model, distributed=distributed),
}


class Net(nn.Module):
    """embed and head untracked (plain sum, all-reduced as gradients); mlp.up / mlp.down tracked."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.head = nn.Linear(3, 4), nn.Linear(4, 2)
        self.mlp = nn.Sequential()
        self.mlp.up, self.mlp.down = nn.Linear(4, 5), nn.Linear(5, 4)
        self.double()

    def forward(self, x):
        h = torch.tanh(self.embed(x))
        return self.head(h + self.mlp.down(torch.tanh(self.mlp.up(h))))


def micro_batches():
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(2, 3, generator=gen, dtype=torch.float64), torch.randn(2, generator=gen, dtype=torch.float64))
            for _ in range(NUM_MICRO)]  # fmt: skip


def one_step(name: str, indices: list[int], distributed: bool) -> dict:
    model = Net()
    combiner = COMBINERS[name](model, distributed)
    params = list(model.parameters())
    combiner.begin(params)
    batches = micro_batches()
    for j in indices:
        x, target = batches[j]
        out = model(x)
        policy = (out[:, 0] * target).mean() + 0.1 * out.pow(2).mean()
        kl = -0.5 * policy + 0.3 * (out - target.unsqueeze(1)).pow(2).mean()
        combiner.backward({"policy": policy, "kl": kl})
    metrics = combiner.finalize(params)
    return {
        "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters()},
        "statistics": {k: v.detach().clone() for k, v in combiner.statistics.items()},
        "metrics": {k: v.detach().clone() for k, v in metrics.items()},
    }


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        mine = list(range(rank, NUM_MICRO, WORLD_SIZE))  # rank r runs micro-batches r, r + 2, ...
        results = {name: one_step(name, mine, distributed=True) for name in COMBINERS}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_equal_one_process(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD_SIZE)]
    for name in COMBINERS:
        single = one_step(name, list(range(NUM_MICRO)), distributed=False)
        for result in ranks:
            assert result[name]["statistics"]["samples"].item() == NUM_MICRO  # J counts every rank's samples
            for key, value in single["statistics"].items():
                torch.testing.assert_close(result[name]["statistics"][key], value, rtol=1e-10, atol=1e-14, msg=key)
            for key, value in single["grads"].items():
                torch.testing.assert_close(result[name]["grads"][key], value, rtol=1e-10, atol=1e-14, msg=key)
            for key, value in single["metrics"].items():
                torch.testing.assert_close(result[name]["metrics"][key], value, rtol=1e-10, atol=1e-14, msg=key)
        # projecting per rank and summing the results (what a DDP-style gradient all-reduce after a local
        # combiner would do) is a different gradient: the statistics must be reduced first
        shards = [one_step(name, list(range(r, NUM_MICRO, WORLD_SIZE)), distributed=False) for r in range(WORLD_SIZE)]
        naive = {k: sum(shard["grads"][k] for shard in shards) for k in single["grads"]}
        assert any(not torch.allclose(naive[k], single["grads"][k]) for k in single["grads"])
    alpha = ranks[0]["pcr_mlp"]["statistics"]["alpha"]
    assert ((alpha > 0) & (alpha < 1)).all()
