"""A gradient-cached contrastive training loop with Hugging Face Accelerate: bf16, accumulation, DDP.

    python docs/examples/accelerate_train.py --check                             # one process
    python -m torch.distributed.run --nproc_per_node 2 docs/examples/accelerate_train.py --check
    accelerate launch --num_processes 2 docs/examples/accelerate_train.py --check      # on GPUs

(On a CPU-only machine ``accelerate launch --cpu --num_processes 2`` starts one process: its CPU
launcher expects mpirun. ``torchrun`` / ``torch.distributed.run`` starts two gloo ranks.)

The loop is Accelerate's own (``accelerator.accumulate``, ``accelerator.backward``); the one change
from an uncached loop is that the loss comes from ``cached_loss(...)``, which encodes the batch in
chunks without keeping activations. ``accelerator.backward`` divides it by the accumulation steps
and runs backward; that backward is the second, chunked pass, scaled accordingly.

On several processes the loss sees the *global* batch (``distributed=True``): every query is scored
against every rank's passages, and every rank's gradients are those of one process running the
global batch. The uncached loop that does the same gathers the representations with
``torch.distributed.nn.functional.all_gather``, which keeps the gradient path across ranks
(``FullBatch`` below). Data is split as ``accelerator.prepare`` splits it: rank ``r`` takes every
``r``-th batch of ``GLOBAL_BATCH // num_processes`` rows, so one process and several train on the
same global batches.

With ``--check`` the loop runs cached and uncached (SGD, whose update is proportional to the
gradient) and exits non-zero unless both moved every parameter by the same amount; ``--save PATH``
writes the cached run's final parameters (rank 0).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch.utils.data import DataLoader, TensorDataset

from gradcache_torch import cached_loss

GLOBAL_BATCH = 8      # query-passage pairs per micro-batch, over all processes
ACCUMULATION = 2      # micro-batches per optimizer step
STEPS = 2             # optimizer steps (the data is exactly one epoch)
CHUNK_SIZE = 2        # rows per chunk of the cached loss


def make_encoder() -> torch.nn.Module:
    torch.manual_seed(0)       # the same initial weights in every run and on every rank
    return torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 32))


def make_data() -> TensorDataset:
    generator = torch.Generator().manual_seed(1)
    rows = GLOBAL_BATCH * ACCUMULATION * STEPS
    queries = torch.randn(rows, 16, generator=generator)
    return TensorDataset(queries, queries + 0.3 * torch.randn(rows, 16, generator=generator))


def info_nce(q: torch.Tensor, p: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """In-batch negatives: query ``i``'s positive is passage ``i`` (of the global batch)."""
    q, p = F.normalize(q.float(), dim=-1), F.normalize(p.float(), dim=-1)
    return F.cross_entropy(q @ p.T / temperature, torch.arange(len(q), device=q.device))


def gather_with_grad(reps: torch.Tensor) -> torch.Tensor:
    """Every rank's rows in rank order, with the gradient flowing back to each rank's own."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return reps
    with warnings.catch_warnings():   # deprecated in torch 2.13, with no public successor yet
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(torch.distributed.nn.functional.all_gather(reps))


def full_batch_loss(model: Any, queries: torch.Tensor, passages: torch.Tensor) -> torch.Tensor:
    """The uncached loss: the whole local batch through the model at once, gathered if several."""
    return info_nce(gather_with_grad(model(queries)), gather_with_grad(model(passages)))


def train(accelerator: Accelerator, cached: bool, lr: float = 0.5) -> torch.nn.Module:
    """``STEPS`` optimizer steps of ``ACCUMULATION`` micro-batches; returns the unwrapped model."""
    model = make_encoder()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    loader = DataLoader(make_data(), batch_size=GLOBAL_BATCH // accelerator.num_processes)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    model.train()
    for queries, passages in loader:
        with accelerator.accumulate(model):
            if cached:
                loss = cached_loss(model, (queries, passages), info_nce, chunk_size=CHUNK_SIZE,
                                   distributed=accelerator.num_processes > 1)
            else:
                loss = full_batch_loss(model, queries, passages)
            accelerator.backward(loss)           # divides by ACCUMULATION; pass 2 runs here
            optimizer.step()                     # a real step every ACCUMULATION micro-batches
            optimizer.zero_grad()
    return accelerator.unwrap_model(model)


def largest_difference(got: torch.nn.Module, want: torch.nn.Module) -> float:
    """The largest difference of two runs' parameter updates, relative to the second's, tensor by
    tensor (every tensor of this model moves: no floor needed)."""
    start = make_encoder()
    with torch.no_grad():
        return max(float(((a - s) - (b - s)).norm() / (b - s).norm())
                   for a, b, s in zip(got.parameters(), want.parameters(), start.parameters()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with an uncached run")
    parser.add_argument("--fp32", action="store_true", help="no bf16 autocast")
    parser.add_argument("--save", help="write the cached run's parameters here (rank 0)")
    args = parser.parse_args(argv)
    accelerator = Accelerator(cpu=True, mixed_precision="no" if args.fp32 else "bf16",
                              gradient_accumulation_steps=ACCUMULATION)
    model = train(accelerator, cached=True)
    if args.save and accelerator.is_main_process:
        torch.save({name: p.detach() for name, p in model.named_parameters()}, args.save)
    status = 0
    if args.check:
        worst = largest_difference(model, train(accelerator, cached=False))
        tolerance = 1e-4 if args.fp32 else 2e-2    # float32 round-off; a few bf16 rounding steps
        accelerator.print(f"{accelerator.num_processes} process(es): largest relative difference "
                          f"of the updates from an uncached run: {worst:.2e} "
                          f"(tolerance {tolerance:g})")
        status = 0 if worst <= tolerance else 1
    accelerator.end_training()     # tears the process group down when there is one
    return status


if __name__ == "__main__":
    sys.exit(main())
