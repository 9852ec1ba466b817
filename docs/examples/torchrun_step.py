"""A distributed gradient-cached step under torchrun, checked against one process's global batch.

    torchrun --nproc_per_node 2 docs/examples/torchrun_step.py          # any number of processes
    torchrun --nproc_per_node 2 docs/examples/torchrun_step.py --check  # and verify the gradients

Each rank encodes its own queries and passages (ranks hold different numbers of rows) in chunks of
4; the InfoNCE loss sees the global batch, so every query is scored against every rank's passages;
DDP all-reduces once per step. With ``--check``, rank 0 recomputes the step on the whole global
batch in one process and exits non-zero unless the gradients agree to 1e-10 (float64).
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from gradcache_torch import cached_step


def make_encoder() -> torch.nn.Module:
    torch.manual_seed(0)    # the same initial weights on every rank (DDP also broadcasts them)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(),
                               torch.nn.Linear(32, 8)).double()


def rank_batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(rank)
    rows = 6 + 2 * rank      # unequal local batches are fine
    return (torch.randn(rows, 16, generator=generator, dtype=torch.float64),
            torch.randn(rows, 16, generator=generator, dtype=torch.float64))


def info_nce(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(q @ p.T / 0.05, torch.arange(len(q)))


def main() -> int:
    dist.init_process_group("gloo")    # torchrun provides rank, world size and address
    rank, world = dist.get_rank(), dist.get_world_size()
    model = DistributedDataParallel(make_encoder())
    loss = cached_step(model, rank_batch(rank), info_nce, chunk_size=4, distributed=True)
    print(f"rank {rank}/{world}: global loss {loss.item():.6f}")
    status = 0
    if "--check" in sys.argv and rank == 0:
        reference = make_encoder()
        batches = [rank_batch(r) for r in range(world)]
        q, p = (torch.cat([b[i] for b in batches]) for i in (0, 1))
        info_nce(reference(q), reference(p)).backward()
        worst = max(float((got.grad - want.grad).abs().max() / want.grad.abs().max())
                    for got, want in zip(model.parameters(), reference.parameters()))
        print(f"largest relative gradient difference from one process: {worst:.2e}")
        status = 0 if worst <= 1e-10 else 1
    dist.barrier()    # nobody tears the group down while rank 0 is still checking
    dist.destroy_process_group()
    return status


if __name__ == "__main__":
    status = main()
    # Everything is done and flushed. With gloo on CPU, a process whose DDP module's gradient
    # hooks have run can abort in the interpreter's own teardown under load (torch 2.13:
    # "terminate called without an active exception"); leave without that teardown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
