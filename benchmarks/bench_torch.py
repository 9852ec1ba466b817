"""Measures the torch adapter: step time and peak memory of a cached step against a full-batch step.

Prints markdown tables; asserts nothing (these machines are shared and noisy, so every figure is a
ratio of measurements taken side by side in one run). Memory is the peak resident set of a fresh
process per configuration (after a warm-up step, with the heap trimmed and the kernel's peak mark
reset), minus its resident set just before the step, read by ``gradcache_cli.memory``. Linux only.

    python benchmarks/bench_torch.py time      # cached / full-batch step CPU time
    python benchmarks/bench_torch.py memory    # peak memory at batch = chunk and 32 x chunk
    python benchmarks/bench_torch.py all
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from gradcache_cli import memory
from gradcache_torch import cached_step

VOCAB = 1000


class SmallTransformer(torch.nn.Module):
    """A small transformer sentence encoder: embeddings, two layers, mean pooling."""

    def __init__(self, dim: int = 128, layers: int = 2, heads: int = 4, dropout: float = 0.1):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, dim)
        layer = torch.nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout, batch_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.embed(ids)).mean(dim=1)


def info_nce(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(q @ p.T / 0.05, torch.arange(len(q)))


def batch(rows: int, length: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randint(0, VOCAB, (rows, length), generator=generator) for _ in range(2))


def full_step(model: torch.nn.Module, q: torch.Tensor, p: torch.Tensor) -> None:
    info_nce(model(q), model(p)).backward()


def time_steps(rows: int, chunk: int, length: int, dim: int, repeats: int) -> dict:
    """Process CPU time of a full-batch step, a cached step, and the two parts a cached step cannot
    avoid (a no-graph forward of every chunk, and a forward + backward of every chunk), interleaved.

    CPU time with one thread is what a shared machine measures reliably; the ``floor`` ratio is what
    any gradient cache costs on this model, ``cached / floor`` is this implementation's overhead.
    """
    torch.manual_seed(0)
    model = SmallTransformer(dim)
    q, p = batch(rows, length)

    def chunks(x: torch.Tensor) -> list[torch.Tensor]:
        return [x[i:i + chunk] for i in range(0, rows, chunk)]

    def no_graph_pass() -> None:
        with torch.no_grad():
            for x in chunks(q) + chunks(p):
                model(x)

    def graph_pass() -> None:
        for x in chunks(q) + chunks(p):
            model(x).sum().backward()

    steps = {
        "full": lambda: full_step(model, q, p),
        "cached": lambda: cached_step(model, (q, p), info_nce, chunk_size=chunk),
        "no_graph_pass": no_graph_pass,
        "graph_pass": graph_pass,
    }
    for step in steps.values():  # warm up allocators and kernels
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():  # interleaved, so drift hits all alike
            model.zero_grad(set_to_none=True)
            start = time.process_time()
            step()
            times[name].append(time.process_time() - start)
    t = {name: statistics.median(values) for name, values in times.items()}
    floor = t["no_graph_pass"] + t["graph_pass"]
    return {"rows": rows, "chunk": chunk, **t, "ratio": t["cached"] / t["full"],
            "floor": floor / t["full"], "overhead": t["cached"] / floor}


def measure_memory_here(mode: str, rows: int, chunk: int, length: int, dim: int) -> dict:
    """Runs in a fresh process: peak RSS growth of one step over the RSS just before it.

    A warm-up step at batch = chunk first pays the one-off costs (kernel workspaces, thread pools)
    so that they do not count as the step's memory.
    """
    torch.manual_seed(0)
    model = SmallTransformer(dim, dropout=0.0)
    step = ((lambda q, p: cached_step(model, (q, p), info_nce, chunk_size=chunk)) if mode == "cached"
            else (lambda q, p: full_step(model, q, p)))
    step(*batch(chunk, length))
    model.zero_grad(set_to_none=True)
    q, p = batch(rows, length)
    before = memory.baseline()
    step(q, p)
    return {"mode": mode, "rows": rows, "chunk": chunk,
            "step_peak": max(0, memory.peak_rss_bytes() - before)}


# freed chunk activations go back to the OS at once, so RSS shows what the step holds (128 KiB: the
# threshold the README's figures were taken with)
FIXED_MMAP = memory.fixed_mmap_env(128 << 10)


def memory_table(chunk: int, length: int, dim: int, env: dict) -> list[dict]:
    results = []
    for mode, rows in [("cached", chunk), ("cached", 32 * chunk), ("full", chunk), ("full", 32 * chunk)]:
        out = subprocess.run(
            [sys.executable, __file__, "_memory", mode, str(rows), str(chunk), str(length), str(dim)],
            capture_output=True, text=True, check=True, env={**os.environ, **env})
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["time", "memory", "all", "_memory"])
    parser.add_argument("args", nargs="*")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 keeps CPU-time figures honest on a shared machine)")
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    if options.what == "_memory":
        mode, rows, chunk, length, dim = options.args
        print(json.dumps(measure_memory_here(mode, int(rows), int(chunk), int(length), int(dim))))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    if options.what in ("time", "all"):
        print("## Step CPU time, cached / full-batch (small transformer, seq 32, d 128, 2 layers, "
              "dropout 0.1; one thread)\n")
        print("| batch | chunk | full (s) | cached (s) | cached / full | floor / full | cached / floor |")
        print("|---|---|---|---|---|---|---|")
        for rows, chunk in [(256, 32), (256, 64), (512, 128), (512, 256)]:
            r = time_steps(rows, chunk, length=32, dim=128, repeats=options.repeats)
            print(f"| {r['rows']} | {r['chunk']} | {r['full']:.3f} | {r['cached']:.3f} | "
                  f"{r['ratio']:.2f} | {r['floor']:.2f} | {r['overhead']:.2f} |")
        print("\nfloor = a no-graph forward of every chunk + a forward and backward of every chunk: "
              "what any gradient cache must compute; cached / floor is this library's own overhead.\n")
    if options.what in ("memory", "all"):
        chunk, length, dim = 32, 64, 256
        reps_and_grads = 2 * 2 * 32 * chunk * dim * 4  # two groups, reps + grads, float32
        print(f"## Peak step memory (fresh process each; seq {length}, d {dim}, chunk {chunk})\n")
        print("| allocator | step | batch | peak growth (MiB) |")
        print("|---|---|---|---|")
        summary = []
        for label, env in [("glibc, fixed mmap threshold", FIXED_MMAP), ("glibc default", {})]:
            rows = memory_table(chunk, length, dim, env)
            for r in rows:
                print(f"| {label} | {r['mode']} | {r['rows']} | {r['step_peak'] / 2**20:.1f} |")
            small, large = rows[0]["step_peak"], rows[1]["step_peak"]
            summary.append(f"{label}: cached growth from batch {chunk} to {32 * chunk} = "
                           f"{(large - small) / 2**20:.1f} MiB; full step at {32 * chunk} / cached "
                           f"step = {rows[3]['step_peak'] / max(large, 1):.1f}x")
        print(f"\nrepresentations + their gradients at batch {32 * chunk}: "
              f"{reps_and_grads / 2**20:.1f} MiB")
        print("\n".join(summary))


if __name__ == "__main__":
    main()
