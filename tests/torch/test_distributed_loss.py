"""``cached_loss`` on two gloo ranks (127.0.0.1): its backward gives what ``cached_step`` gives.

With ``distributed=True`` (DDP, FSDP2, the loss on the global batch) every rank's ``.grad`` after
``(loss / 2).backward()`` is half the gradient of one process running the global batch; with a
DDP model and no ``distributed=``, the DDP module's gradients are averaged inside the backward
once, as DDP averages them; a rank failing inside pass 2 stops every rank with every ``.grad`` as
it was (more failures in ``test_ddp.py``).
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

from gradcache_cli.spawn import spawn
from gradcache_torch import cached_loss
from tests.torch.test_distributed import counting, full, global_reference, local_batch, rows_of
from tests.torch.test_features import Tower, info_nce

pytestmark = pytest.mark.slow

WORLD = 2


def scenarios(rank: int, world: int) -> dict:
    import torch.distributed as dist
    out: dict = {}
    q, p = local_batch(rank)
    chunk = 2 + rank

    torch.manual_seed(0)
    model = DistributedDataParallel(Tower().double())
    temperature = torch.nn.Parameter(torch.tensor(0.2, dtype=torch.float64))
    loss = cached_loss(model, (q, p), lambda a, b: info_nce(a, b, temperature), chunk_size=chunk,
                       distributed=True)
    with counting(dist, "all_reduce") as calls:
        (loss / 2).backward()
    out["ddp"] = (loss.detach(), [t.grad * 2 for t in model.parameters()], temperature.grad * 2,
                  len(calls))

    # DDP without distributed=: each rank's loss on its own rows, averaged over ranks as DDP would
    torch.manual_seed(0)
    local = DistributedDataParallel(Tower().double())
    cached_loss(local, (q, p), info_nce, chunk_size=3).backward()
    out["local"] = [t.grad.clone() for t in local.parameters()]

    # FSDP2
    from torch.distributed.fsdp import fully_shard
    torch.manual_seed(0)
    sharded = Tower().double()
    fully_shard(sharded.a)
    fully_shard(sharded)
    rows = rows_of(rank)
    loss = cached_loss(sharded, (q, p), lambda a, b: info_nce(a, b, 0.2),
                       chunk_size=[-(-rows // 3), -(-2 * rows // 3)], distributed=True)
    (loss * 3).backward()
    out["fsdp"] = [full(t.grad) / 3 for t in sharded.parameters()]

    # the last rank fails in its last pass-2 chunk, inside backward
    class FailsLate(torch.nn.Module):
        def __init__(self, tower, fail):
            super().__init__()
            self.tower, self.fail, self.calls = tower, fail, 0

        def forward(self, x):
            self.calls += 1
            if self.fail and torch.is_grad_enabled() and self.calls == self.fail:
                raise RuntimeError("late failure")
            return self.tower(x)

    torch.manual_seed(0)
    ddp = DistributedDataParallel(Tower().double())
    chunks = -(-len(q) // chunk) + -(-len(p) // chunk)
    late = FailsLate(ddp.module, 2 * chunks if rank == world - 1 else 0)
    for parameter in ddp.parameters():
        parameter.grad = torch.full_like(parameter, 7.0)
    loss = cached_loss([late, late], (q, p), info_nce, chunk_size=chunk, distributed=True)
    try:
        loss.backward()
        out["late"] = "no error"
    except Exception as error:
        out["late"] = f"{type(error).__name__}: {error}"
    out["late_grads_kept"] = all(bool((t.grad == 7).all()) for t in ddp.parameters())
    return out


def test_cached_loss_backward_on_two_ranks() -> None:
    results = spawn(scenarios, WORLD, timeout=240)
    loss, (tower_grads,), temperature_grad = global_reference(WORLD)
    torch.manual_seed(0)
    reference = Tower().double()
    for rank in range(WORLD):
        q, p = local_batch(rank)
        chunk_loss = info_nce(reference(q), reference(p))
        (chunk_loss / WORLD).backward()   # DDP averages the ranks' local losses
    for rank, out in enumerate(results):
        got_loss, got_grads, got_temperature, calls = out["ddp"]
        torch.testing.assert_close(got_loss, loss, rtol=1e-12, atol=0)
        for got, want in zip(got_grads, tower_grads, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got_temperature, temperature_grad, rtol=1e-10, atol=1e-12)
        assert calls == 1, "one all-reduce (one bucket) per backward"
        for got, want in zip(out["local"], reference.parameters(), strict=True):
            torch.testing.assert_close(got, want.grad, rtol=1e-10, atol=1e-12)
        for got, want in zip(out["fsdp"], tower_grads, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        if rank == WORLD - 1:
            assert out["late"] == "RuntimeError: late failure", out["late"]
        else:
            assert "failed (RuntimeError: late failure); every rank stopped (after pass 2)" \
                in out["late"], out["late"]
        assert out["late_grads_kept"]
