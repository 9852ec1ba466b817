"""Measures distributed cached steps on torch.distributed (gloo, 127.0.0.1): bytes, time, loss memory.

Prints markdown tables; asserts nothing. For a fixed *global* batch of ``B`` queries and ``B``
passages of width ``d`` split over 1, 2 and 4 processes (one thread each):

* ``bytes``: what the step's representation collectives moved (the global tensors of every
  all-gather and reduce-scatter, from ``TorchCollective.bytes_communicated``) against the floor of
  any exact distributed contrastive step, ``2·B·d`` numbers: every rank must see every passage (one
  all-gather) and every passage's gradient must reach its owner (one reduce-scatter) -- or, for a
  loss computed whole on every rank, the queries are gathered instead of scattering gradients.
  The parameter gradients' all-reduce (DDP, once per step) is the model's size and listed apart.
* ``time``: median step time at W processes over the single-process step on the same global
  batch, and the slowest rank's CPU time over the single process's (the work each rank does: the
  encoder's share falls as 1/W, a loss computed whole on every rank does not). On this 2-core
  machine 4 processes share 2 cores, so wall-clock at W = 4 shows the overhead, not a speed-up.
* ``loss memory``: peak resident growth of the loss's value and gradient alone, per rank, for
  ``across_ranks(info_nce)`` (own queries against every passage) and for the dense loss on the
  gathered global batch, against the single-process tiled loss.

    python benchmarks/bench_distributed.py [--rows 4096] [--dim 128] [--steps 5] [--memory-rows 32768]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout

from gradcache_cli import memory  # noqa: E402
from gradcache_cli.spawn import spawn  # noqa: E402
from gradcache_torch import TorchCollective, cached_step  # noqa: E402

IN_DIM = 64


def encoder(dim: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(IN_DIM, 256), torch.nn.GELU(), torch.nn.Linear(256, dim))


def dense_info_nce(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(q @ p.T / 0.05, torch.arange(len(q)))


def local_rows(rows: int, world: int, rank: int) -> int:
    return rows // world + (1 if rank < rows % world else 0)


def step_run(rank: int, world: int, rows: int, dim: int, steps: int, loss_kind: str) -> dict:
    n = local_rows(rows, world, rank)
    generator = torch.Generator().manual_seed(rank)
    q, p = torch.randn(n, IN_DIM, generator=generator), torch.randn(n, IN_DIM, generator=generator)
    model = DistributedDataParallel(encoder(dim)) if world > 1 else encoder(dim)
    loss_fn = dense_info_nce
    if loss_kind == "tiled":
        from gradcache_torch.losses import across_ranks, info_nce
        loss_fn = across_ranks(info_nce, temperature=0.05)
    times, cpu, moved = [], [], 0
    for index in range(steps + 1):
        collective = TorchCollective()   # at 1 process too: across_ranks needs a distributed step
        own = getattr(loss_fn, "collective", None)   # across_ranks communicates on its own
        own_before = own.bytes_communicated if own is not None else 0
        dist.barrier()
        start, start_cpu = time.perf_counter(), time.process_time()
        cached_step(model, (q, p), loss_fn, chunk_size=256, distributed=collective)
        elapsed, elapsed_cpu = time.perf_counter() - start, time.process_time() - start_cpu
        model.zero_grad(set_to_none=True)
        if index:   # the first step warms up kernels and DDP's buckets
            times.append(elapsed)
            cpu.append(elapsed_cpu)
            own = getattr(loss_fn, "collective", None)
            moved = collective.bytes_communicated + \
                (own.bytes_communicated - own_before if own is not None else 0)
    return {"seconds": statistics.median(times), "cpu": statistics.median(cpu), "bytes": moved,
            "params": sum(t.numel() * t.element_size() for t in model.parameters())}


def loss_memory_run(rank: int, world: int, rows: int, dim: int, form: str) -> int:
    from gradcache_torch.losses import across_ranks, info_nce

    n = local_rows(rows, world, rank)
    warm = torch.randn(64, dim, requires_grad=True)
    info_nce(warm, warm).backward()
    del warm
    if form == "tiled-across-ranks":
        fn = across_ranks(info_nce, temperature=0.05)
        x = torch.randn(n, dim, requires_grad=True)
        y = torch.randn(n, dim, requires_grad=True)
        dist.barrier()
        before = memory.baseline() - 2 * n * dim * 4   # count the inputs, as the single-process one does
        fn(x, y).backward()
    else:   # the dense loss on the gathered global batch, as a loss without gathers_itself gets it
        x = torch.randn(rows, dim, requires_grad=True)
        y = torch.randn(rows, dim, requires_grad=True)
        before = memory.baseline() - 2 * rows * dim * 4
        dense_info_nce(x, y).backward()
    return memory.peak_rss_bytes() - before


def single_loss_memory(rows: int, dim: int) -> int:
    from gradcache_torch.losses import info_nce

    warm = torch.randn(64, dim, requires_grad=True)
    info_nce(warm, warm).backward()
    del warm
    before = memory.baseline()
    x = torch.randn(rows, dim, requires_grad=True)
    y = torch.randn(rows, dim, requires_grad=True)
    info_nce(x, y).backward()
    return memory.peak_rss_bytes() - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096, help="global batch B")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--losses", nargs="+", default=["dense", "tiled"], choices=["dense", "tiled"])
    parser.add_argument("--worlds", nargs="+", type=int, default=[2, 4],
                        help="process counts compared with one process (the smoke test runs 2)")
    parser.add_argument("--no-memory", action="store_true", help="skip the loss-memory table")
    parser.add_argument("--memory-rows", type=int, default=32768,
                        help="global batch of the loss-memory table (the dense loss only up to 8192)")
    args = parser.parse_args()
    rows, dim = args.rows, args.dim
    floor = 2 * rows * dim * 4
    print(f"# Distributed cached steps: global B = {rows}, d = {dim}, float32, gloo on 127.0.0.1\n")
    print("| loss | processes | bytes moved / 2·B·d floor | DDP gradient bytes | "
          "step time / 1 process | CPU time per rank / 1 process |")
    print("|---|---|---|---|---|---|")
    for kind in args.losses:
        base = base_cpu = None
        for world in (1, *args.worlds):
            results = spawn(step_run, world, rows, dim, args.steps, kind, timeout=900)
            seconds = max(r["seconds"] for r in results)
            cpu = max(r["cpu"] for r in results)
            base, base_cpu = base or seconds, base_cpu or cpu
            moved = max(r["bytes"] for r in results)
            name = "dense, gathered" if kind == "dense" else "across_ranks(info_nce)"
            ratio = f"{moved / floor:.3f}" if world > 1 else "-"
            grads = f"{results[0]['params'] / 2**20:.2f} MiB" if world > 1 else "-"
            print(f"| {name} | {world} | {ratio} | {grads} | {seconds / base:.2f} | {cpu / base_cpu:.2f} |")
    print()
    if args.no_memory:
        return
    rows = args.memory_rows
    single = spawn(single_loss_memory_run, 1, rows, dim, timeout=600)[0]
    print(f"## Loss memory per rank, B = {rows} (value and gradient, inputs included; "
          f"single-process tiled loss: {single / 2**20:.1f} MiB, floor 4·B·d: "
          f"{4 * rows * dim * 4 / 2**20:.1f} MiB)\n")
    print("| processes | across_ranks(info_nce) per rank / single | dense on gathered batch / single |")
    print("|---|---|---|")
    for world in args.worlds:
        tiled = max(spawn(loss_memory_run, world, rows, dim, "tiled-across-ranks", timeout=600))
        dense = "-"
        if rows <= 8192:
            dense = f"{max(spawn(loss_memory_run, world, rows, dim, 'dense', timeout=600)) / single:.2f}"
        print(f"| {world} | {tiled / single:.2f} | {dense} |")


def single_loss_memory_run(rank: int, world: int, rows: int, dim: int) -> int:
    return single_loss_memory(rows, dim)


if __name__ == "__main__":
    main()
