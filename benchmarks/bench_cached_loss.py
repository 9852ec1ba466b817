"""Step time of ``cached_loss`` + ``backward()`` against ``cached_step`` on the same batch.

The two run the same passes (the core's cached_forward and cached_backward); what ``cached_loss``
adds is an autograd node, the deferred loss-owned gradients and the guards between the halves.
Prints a markdown table of process CPU times (one thread, interleaved repeats, medians) and their
ratio; asserts nothing (shared machines are noisy: only side-by-side ratios mean anything).

    python benchmarks/bench_cached_loss.py [--rows 256] [--chunk 32] [--repeats 9]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from bench_torch import SmallTransformer, batch, info_nce  # noqa: E402 - same model as bench_torch

from gradcache_torch import cached_loss, cached_step


def measure(rows: int, chunk: int, length: int, dim: int, repeats: int) -> dict:
    torch.manual_seed(0)
    model = SmallTransformer(dim)
    temperature = torch.nn.Parameter(torch.tensor(0.05))
    q, p = batch(rows, length)

    def loss_fn(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return info_nce(a, b) * (0.05 / temperature)   # a loss-owned parameter, deferred

    steps = {
        "cached_step": lambda: cached_step(model, (q, p), loss_fn, chunk_size=chunk),
        "cached_loss": lambda: cached_loss(model, (q, p), loss_fn, chunk_size=chunk).backward(),
    }
    for step in steps.values():   # warm up
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():   # interleaved: drift hits both alike
            model.zero_grad(set_to_none=True)
            temperature.grad = None
            start = time.process_time()
            step()
            times[name].append(time.process_time() - start)
    t = {name: statistics.median(values) for name, values in times.items()}
    return {"rows": rows, "chunk": chunk, **t, "ratio": t["cached_loss"] / t["cached_step"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=32)
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(1)
    r = measure(args.rows, args.chunk, args.length, args.dim, args.repeats)
    print("| rows | chunk | cached_step (s) | cached_loss + backward (s) | ratio |")
    print("|---|---|---|---|---|")
    print(f"| {r['rows']} | {r['chunk']} | {r['cached_step']:.3f} | {r['cached_loss']:.3f} | "
          f"{r['ratio']:.3f} |")


if __name__ == "__main__":
    main()
