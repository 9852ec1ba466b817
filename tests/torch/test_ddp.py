"""DDP with gloo on 127.0.0.1, two processes: exact averaged gradients, one all-reduce per step."""

from __future__ import annotations

import os
import socket
import tempfile
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

from gradcache_torch import cached_step
from tests.torch.test_features import Tower, info_nce

WORLD = 2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def local_batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + rank)
    return (torch.randn(10, 6, generator=generator, dtype=torch.float64),
            torch.randn(10, 6, generator=generator, dtype=torch.float64))


def worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        torch.manual_seed(0)
        model = DistributedDataParallel(Tower().double())
        calls = []

        def counting_hook(state, bucket):
            calls.append(1)
            return allreduce_hook(state, bucket)

        model.register_comm_hook(None, counting_hook)
        cached_step(model, local_batch(rank), info_nce, chunk_size=3)
        torch.save({"grads": [p.grad for p in model.parameters()], "calls": len(calls)},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_gradients_equal_the_averaged_full_batch_gradients() -> None:
    with tempfile.TemporaryDirectory() as out_dir:
        context = mp.spawn(worker, args=(free_port(), out_dir), nprocs=WORLD, join=False)
        assert context.join(timeout=120) or context.join(timeout=60), "workers did not finish"
        results = [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(WORLD)]
    torch.manual_seed(0)
    reference = Tower().double()
    for rank in range(WORLD):
        q, p = local_batch(rank)
        (info_nce(reference(q), reference(p)) / WORLD).backward()  # DDP averages over ranks
    for result in results:
        assert result["calls"] == 1, "expected one all-reduce (one bucket) per step"
        for got, want in zip(result["grads"], reference.parameters()):
            torch.testing.assert_close(got, want.grad, rtol=1e-10, atol=1e-12)
