"""Measures the MLX adapter on CPU: step time of a cached step against a plain one, and memory.

Time: a plain full-batch step (``nn.value_and_grad`` of the loss on the whole batch), a cached step
(``gradcache_mlx.cached_step``), ``cached_loss`` under ``nn.value_and_grad``, and the floor any
gradient cache pays on that model (a forward of every chunk, then ``nn.value_and_grad`` of every
chunk), each evaluated (``mx.eval``) and timed alternately in one process, as CPU time (these
machines are shared and busy: wall-clock time moved by 2x between runs, CPU time far less), medians
of the rounds. Then the plain step compiled whole against the cached step with its encoder
compiled (``mx.compile`` with the model's and the random state captured). Memory: MLX's own peak
(``mx.get_peak_memory``) of the plain and the cached step at two batch sizes. It prints tables
and asserts nothing.

Run: ``python benchmarks/bench_mlx.py`` (``--quick`` for a smaller, faster run).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402

import gradcache_mlx  # noqa: E402


class Text(nn.Module):
    """Embedding, transformer blocks with dropout, mean pooling: activations dwarf the weights."""

    def __init__(self, vocab: int = 2000, width: int = 64, blocks: int = 2, dropout: float = 0.1):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.TransformerEncoder(blocks, width, 4, 4 * width, dropout=dropout)
        self.out = nn.Linear(width, width)

    def __call__(self, ids: mx.array) -> mx.array:
        return self.out(mx.mean(self.blocks(self.embed(ids), None), axis=1))


class MLP(nn.Module):
    def __init__(self, dim_in: int = 64, hidden: int = 512, layers: int = 3, dim_out: int = 128,
                 dropout: float = 0.1):
        super().__init__()
        sizes = [dim_in] + [hidden] * layers
        self.layers = [nn.Linear(a, b) for a, b in zip(sizes, sizes[1:])]
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(hidden, dim_out)

    def __call__(self, x: mx.array) -> mx.array:
        for layer in self.layers:
            x = self.drop(nn.gelu(layer(x)))
        return self.out(x)


def info_nce(q: mx.array, d: mx.array) -> mx.array:
    scores = q @ d.T / 0.05
    return mx.mean(mx.logsumexp(scores, axis=1) - mx.diagonal(scores))


def batch(kind: str, rows: int, seq: int = 32) -> tuple:
    if kind == "text":
        return tuple(mx.random.randint(0, 2000, (rows, seq)) for _ in range(2))
    return tuple(mx.random.normal((rows, 64)) for _ in range(2))


def steps(model: nn.Module, q: mx.array, d: mx.array, chunk: int) -> dict:
    """The steps to time, each returning what must be evaluated."""
    state = [model.state, mx.random.state]
    compiled = mx.compile(model, inputs=state, outputs=state)
    plain = nn.value_and_grad(model, lambda: info_nce(model(q), model(d)))

    def floor() -> list:
        done = []
        for x in (q, d):   # pass 1, then pass 2, each chunk evaluated on its own
            for start in range(0, x.shape[0], chunk):
                done.append(model(x[start:start + chunk]))
                mx.eval(done[-1])
        for x in (q, d):
            for start in range(0, x.shape[0], chunk):
                rows = x[start:start + chunk]
                done.append(nn.value_and_grad(model, lambda rows=rows: mx.sum(model(rows)))())
                mx.eval(done[-1])
        return done

    return {
        "plain": plain,
        "cached_step": lambda: gradcache_mlx.cached_step(model, (q, d), info_nce,
                                                         chunk_size=chunk),
        "cached_loss": nn.value_and_grad(model, lambda: gradcache_mlx.cached_loss(
            model, (q, d), info_nce, chunk_size=chunk)),
        "floor": floor,
        "plain, compiled": mx.compile(lambda: plain(), inputs=state, outputs=state),
        "cached_step, compiled encoder": lambda: gradcache_mlx.cached_step(
            compiled, (q, d), info_nce, chunk_size=chunk, model=model),
    }


def time_runs(kind: str, rows: int, chunk: int, rounds: int) -> dict:
    mx.random.seed(0)
    model = Text() if kind == "text" else MLP()
    q, d = batch(kind, rows)
    mx.eval(model.parameters(), q, d)
    timed = steps(model, q, d, chunk)
    for fn in timed.values():   # warm up (and compile)
        mx.eval(fn())
    seconds: dict = {name: [] for name in timed}
    for _ in range(rounds):
        for name, fn in timed.items():
            start = time.process_time()
            mx.eval(fn())
            seconds[name].append(time.process_time() - start)
    return {name: statistics.median(values) for name, values in seconds.items()}


def peak_mib(fn) -> float:
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    mx.eval(fn())
    return (mx.get_peak_memory() - base) / 2**20


def memory_runs(rows_list: list, chunk: int) -> list:
    mx.random.seed(0)
    model = MLP(dim_in=64, hidden=1024, layers=3, dim_out=64)
    mx.eval(model.parameters())
    out = []
    for rows in rows_list:
        q, d = batch("mlp", rows)
        mx.eval(q, d)
        full = peak_mib(nn.value_and_grad(model, lambda q=q, d=d: info_nce(model(q), model(d))))
        cached = peak_mib(lambda q=q, d=d: gradcache_mlx.cached_step(model, (q, d), info_nce,
                                                                     chunk_size=chunk))
        out.append((rows, cached, full))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    rounds = 3 if args.quick else 7
    runs = [("text encoder", "text", 64, 16), ("MLP", "mlp", 256, 64)] if args.quick else \
        [("text encoder", "text", 128, 32), ("text encoder", "text", 128, 64),
         ("MLP", "mlp", 512, 64), ("MLP", "mlp", 512, 128)]
    print(f"mlx {mx.__version__} on {mx.default_device()}; CPU time, medians of {rounds} "
          f"interleaved rounds\n")
    print("| encoder | batch / chunk | plain | cached_step | cached / plain | cached / floor "
          "| cached_loss / plain | compiled: plain | cached, compiled encoder | cached / plain |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, kind, rows, chunk in runs:
        t = time_runs(kind, rows, chunk, rounds)
        print(f"| {label} | {rows} / {chunk} | {1e3 * t['plain']:.0f} ms | "
              f"{1e3 * t['cached_step']:.0f} ms | {t['cached_step'] / t['plain']:.2f} | "
              f"{t['cached_step'] / t['floor']:.2f} | {t['cached_loss'] / t['plain']:.2f} | "
              f"{1e3 * t['plain, compiled']:.0f} ms | "
              f"{1e3 * t['cached_step, compiled encoder']:.0f} ms | "
              f"{t['cached_step, compiled encoder'] / t['plain, compiled']:.2f} |")
    chunk = 32 if args.quick else 64
    rows_list = [chunk * 4, chunk * 16] if args.quick else [chunk * 4, chunk * 32]
    print(f"\n| MLX peak memory, MLP (hidden 1024), chunk {chunk} | cached step | plain step |")
    print("|---|---|---|")
    for rows, cached, full in memory_runs(rows_list, chunk):
        print(f"| batch {rows} | {cached:.1f} MiB | {full:.1f} MiB |")


if __name__ == "__main__":
    main()
