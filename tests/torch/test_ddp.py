"""DDP with gloo on 127.0.0.1, two processes, each rank's loss on its own rows (no ``distributed=``):
exact averaged gradients, one all-reduce per step."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

from gradcache_cli.spawn import spawn
from gradcache_torch import cached_step
from tests.torch.test_features import Tower, info_nce

WORLD = 2


def local_batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + rank)
    return (torch.randn(10, 6, generator=generator, dtype=torch.float64),
            torch.randn(10, 6, generator=generator, dtype=torch.float64))


def worker(rank: int, world: int) -> dict:
    torch.manual_seed(0)
    model = DistributedDataParallel(Tower().double())
    calls = []

    def counting_hook(state, bucket):
        calls.append(1)
        return allreduce_hook(state, bucket)

    model.register_comm_hook(None, counting_hook)
    cached_step(model, local_batch(rank), info_nce, chunk_size=3)
    return {"grads": [p.grad for p in model.parameters()], "calls": len(calls)}


@pytest.mark.slow
def test_ddp_gradients_equal_the_averaged_full_batch_gradients() -> None:
    results = spawn(worker, WORLD, timeout=120)
    torch.manual_seed(0)
    reference = Tower().double()
    for rank in range(WORLD):
        q, p = local_batch(rank)
        (info_nce(reference(q), reference(p)) / WORLD).backward()  # DDP averages over ranks
    for result in results:
        assert result["calls"] == 1, "expected one all-reduce (one bucket) per step"
        for got, want in zip(result["grads"], reference.parameters()):
            torch.testing.assert_close(got, want.grad, rtol=1e-10, atol=1e-12)
