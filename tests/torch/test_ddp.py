"""DDP with gloo on 127.0.0.1, two processes, each rank's loss on its own rows (no ``distributed=``):
exact averaged gradients, one all-reduce per step -- the step's own average after the ranks' one
agreement by default (accumulated into DDP's bucket views with ``gradient_as_bucket_view``), DDP's
reducer where a comm hook is registered, none under ``no_sync``. The failure cases are in
``test_distributed_failures.py``."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

from gradcache_cli.spawn import spawn
from gradcache_torch import cached_step
from tests.torch.test_distributed import counting
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
    out = {"grads": [p.grad for p in model.parameters()], "calls": len(calls)}

    # no comm hook: DDP's hooks bypassed, one agreement, then the step's own average, added into
    # the very .grad objects (views of DDP's flat buckets)
    torch.manual_seed(0)
    viewed = DistributedDataParallel(Tower().double(), gradient_as_bucket_view=True)
    viewed(torch.zeros(1, 6, dtype=torch.float64)).sum().backward()   # DDP makes the views
    for parameter in viewed.parameters():
        parameter.grad.zero_()
    held = [p.grad for p in viewed.parameters()]
    with counting(dist, "all_reduce") as reduces:
        cached_step(viewed, local_batch(rank), info_nce, chunk_size=3)
    out["viewed"] = [p.grad.clone() for p in viewed.parameters()]
    out["viewed_same_objects"] = all(p.grad is g for p, g in zip(viewed.parameters(), held))
    out["viewed_reduces"] = len(reduces)

    # under no_sync nothing is averaged (gradient accumulation), as with DDP
    torch.manual_seed(0)
    accumulating = DistributedDataParallel(Tower().double())
    with counting(dist, "all_reduce") as reduces, accumulating.no_sync():
        cached_step(accumulating, local_batch(rank), info_nce, chunk_size=3)
    out["no_sync"] = [p.grad.clone() for p in accumulating.parameters()]
    out["no_sync_reduces"] = len(reduces)
    return out


@pytest.mark.slow
def test_ddp_gradients_equal_the_averaged_full_batch_gradients() -> None:
    results = spawn(worker, WORLD, timeout=120)
    torch.manual_seed(0)
    reference = Tower().double()
    for rank in range(WORLD):
        q, p = local_batch(rank)
        (info_nce(reference(q), reference(p)) / WORLD).backward()  # DDP averages over ranks
    for rank, result in enumerate(results):
        assert result["calls"] == 1, "expected one all-reduce (one bucket) per step"
        for got, want in zip(result["grads"], reference.parameters()):
            torch.testing.assert_close(got, want.grad, rtol=1e-10, atol=1e-12)
        assert result["viewed_reduces"] == 1, "expected one all-reduce (one bucket) per step"
        assert result["viewed_same_objects"]
        for got, want in zip(result["viewed"], reference.parameters(), strict=True):
            torch.testing.assert_close(got, want.grad, rtol=1e-10, atol=1e-12)
        assert result["no_sync_reduces"] == 0
        torch.manual_seed(0)
        alone = Tower().double()
        q, p = local_batch(rank)
        info_nce(alone(q), alone(p)).backward()
        for got, want in zip(result["no_sync"], alone.parameters(), strict=True):
            torch.testing.assert_close(got, want.grad, rtol=1e-10, atol=1e-12)
