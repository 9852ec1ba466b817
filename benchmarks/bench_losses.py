"""Measures the tiled contrastive losses: memory against the O(B·d) floor, time against dense.

Prints markdown tables; asserts nothing (these machines are shared and noisy: times are ratios of
runs interleaved in one process). The *floor* is what any loss must hold: the representations and
their gradients, ``4·B·d`` numbers for two ``(B, d)`` groups.

* ``memory``: loss-side peak memory of one value-and-gradient at growing batch sizes. JAX: the
  compiled program's own accounting (``memory_analysis()``: arguments + outputs + temporaries),
  exact and compile-only, so it reaches B = 2^18 in seconds. torch (CPU): a fresh process per
  configuration, peak resident set growth from just before the inputs are made (the kernel's peak
  mark reset, the heap trimmed), so the inputs and gradients are part of what is measured.
  TensorFlow (CPU): a fresh process per configuration too, the value-and-gradient run as users run
  it, inside ``tf.function`` (where the tiles are a ``tf.while_loop``), traced and run once before
  the measurement. The figure is :func:`gradcache_cli.tf_memory.step_peak`'s: where TF's pooling
  CPU allocator keeps statistics (oneDNN on, the default on x86 CPUs with AVX-512, as here) it is
  the allocator's own peak bytes in use above what it held before the inputs were made -- exact, and
  the only honest figure there, since that pool keeps the pages it once held and resident memory
  cannot see a step; elsewhere it is peak resident-set growth as for torch. The table says which.
* ``time``: tiled / dense value-and-gradient time at the largest batch where dense fits here;
  TensorFlow inside ``tf.function`` (and eagerly, for reference: a Python loop over tiles).
* ``--headline``: one complete ``gradcache_torch.cached_step`` with the tiled InfoNCE at
  B = 262,144, d = 128 and a small encoder, where one dense B x B float32 matrix alone would take
  256 GiB; prints its peak memory and time. It takes many minutes on two cores.

    python benchmarks/bench_losses.py memory
    python benchmarks/bench_losses.py time
    python benchmarks/bench_losses.py all [--backends tf]
    python benchmarks/bench_losses.py --headline [--rows 262144] [--backend jax] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from gradcache_cli import memory

LOSSES = ("info_nce", "clip_loss", "siglip_loss")
BACKENDS = ("jax", "torch", "tf")
DIM = 128
FIXED_MMAP = memory.fixed_mmap_env(128 << 10)  # freed tiles go back to the OS at once


def floor_bytes(rows: int, dim: int = DIM, itemsize: int = 4) -> int:
    return 4 * rows * dim * itemsize


def mib(size: float) -> str:
    return f"{size / 2**20:,.0f}"


# -- JAX: the compiled program's own memory accounting -----------------------------------------------
def jax_memory(loss: str, form: str, rows: int, tile: int | None) -> int:
    import jax
    import jax.numpy as jnp

    from gradcache_jax import losses

    fn = getattr(losses, loss if form == "tiled" else f"{loss}_dense")
    extra = {"tile_size": tile} if form == "tiled" else {}
    grad = jax.value_and_grad(lambda x, y: fn(x, y, **extra), argnums=(0, 1))
    shape = jax.ShapeDtypeStruct((rows, DIM), jnp.float32)
    stats = jax.jit(grad).lower(shape, shape).compile().memory_analysis()
    return (stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
            - stats.alias_size_in_bytes)


def jax_memory_table(tile: int | None) -> None:
    print(f"## JAX: compiled value-and-grad memory (float32, d = {DIM}, tile = {tile or 'default'})\n")
    print("| loss | B | floor (MiB) | tiled (MiB) | tiled / floor | dense (MiB) | dense / floor |")
    print("|---|---|---|---|---|---|---|")
    for loss in LOSSES:
        for power in range(14, 19):
            rows = 2**power
            tiled = jax_memory(loss, "tiled", rows, tile)
            dense = jax_memory(loss, "dense", rows, None) if power <= 16 else None
            dense_cells = (f"{mib(dense)} | {dense / floor_bytes(rows):.1f}" if dense
                           else "(B x B alone: " + mib(rows * rows * 4) + ") | -")
            print(f"| {loss} | 2^{power} | {mib(floor_bytes(rows))} | {mib(tiled)} | "
                  f"{tiled / floor_bytes(rows):.2f} | {dense_cells} |", flush=True)
    print()


# -- torch: peak resident set of a fresh process (read by gradcache_cli.memory) ---------------------------
def torch_memory_here(loss: str, form: str, rows: int, tile: int | None) -> dict:
    """In a fresh process: peak RSS growth of making the inputs and one value-and-gradient."""
    import torch

    from gradcache_torch import losses

    fn = getattr(losses, loss if form == "tiled" else f"{loss}_dense")
    extra = {"tile_size": tile} if form == "tiled" else {}
    warm = torch.randn(256, DIM, requires_grad=True)
    fn(warm, warm, **extra).backward()  # thread pools and kernels, once
    del warm
    before = memory.baseline()
    x = torch.randn(rows, DIM, requires_grad=True)
    y = torch.randn(rows, DIM, requires_grad=True)
    start = time.perf_counter()
    fn(x, y, **extra).backward()
    seconds = time.perf_counter() - start
    return {"peak": memory.peak_rss_bytes() - before, "seconds": seconds}


def torch_memory_table(tile: int | None) -> None:
    print(f"## torch (CPU): peak RSS growth, fresh process each (float32, d = {DIM})\n")
    print("| loss | B | floor (MiB) | tiled (MiB) | tiled / floor | dense (MiB) | dense / floor |")
    print("|---|---|---|---|---|---|---|")
    for loss in LOSSES:
        for power in (12, 13, 14):
            rows = 2**power
            cells = []
            for form in ("tiled", "dense"):
                out = subprocess.run(
                    [sys.executable, __file__, "_torch_memory", loss, form, str(rows), str(tile or 0)],
                    capture_output=True, text=True, check=True,
                    # one thread: memory does not depend on it, and a shared machine stays usable
                    env={**os.environ, **FIXED_MMAP, "OMP_NUM_THREADS": "1"})
                peak = json.loads(out.stdout.strip().splitlines()[-1])["peak"]
                cells.append(f"{mib(peak)} | {peak / floor_bytes(rows):.2f}")
            print(f"| {loss} | 2^{power} | {mib(floor_bytes(rows))} | {' | '.join(cells)} |",
                  flush=True)
    print()


# -- TensorFlow: its allocator's peak (or peak RSS) in a fresh process (gradcache_cli.tf_memory) ----------
def tf_value_and_grad(fn, **extra):
    """``(x, y) -> (loss, (dx, dy))`` of ``fn`` with a ``GradientTape``, to be wrapped in
    ``tf.function`` (or run eagerly)."""
    import tensorflow as tf

    def value_and_grad(x, y):
        with tf.GradientTape() as tape:
            tape.watch((x, y))
            value = fn(x, y, **extra)
        return value, tape.gradient(value, (x, y))
    return value_and_grad


def tf_memory_here(loss: str, form: str, rows: int, tile: int | None) -> dict:
    """In a fresh process: peak memory of making the inputs and one value-and-gradient in
    ``tf.function``, above what was held before (see :func:`gradcache_cli.tf_memory.step_peak`)."""
    import tensorflow as tf

    from gradcache_cli import tf_memory
    from gradcache_tf import losses

    # one thread per op: memory does not depend on it, and a shared machine stays usable
    tf.config.threading.set_intra_op_parallelism_threads(1)
    fn = getattr(losses, loss if form == "tiled" else f"{loss}_dense")
    step = tf.function(tf_value_and_grad(fn, **({"tile_size": tile} if form == "tiled" else {})))
    timed: dict = {}

    def run() -> None:
        start = time.perf_counter()
        x = tf.random.normal((rows, DIM))
        y = tf.random.normal((rows, DIM))
        value, _ = step(x, y)
        float(value)
        timed["seconds"] = time.perf_counter() - start

    # the warm-up traces the graph at this static shape (the tiled loop needs one) and runs it once
    found = tf_memory.step_peak(run, run, memory.default_budget())
    return {"peak": found["bytes"], "method": found["method"], "seconds": timed.get("seconds"),
            "note": found.get("note", "")}


def tf_memory_table(tile: int | None) -> None:
    header = False
    for loss in LOSSES:
        for power in (12, 13, 14):
            rows = 2**power
            found = {}
            for form in ("tiled", "dense"):
                out = subprocess.run(
                    [sys.executable, __file__, "_tf_memory", loss, form, str(rows), str(tile or 0)],
                    capture_output=True, text=True, check=True,
                    env={**os.environ, **FIXED_MMAP, "TF_CPP_MIN_LOG_LEVEL": "2"})
                found[form] = json.loads(out.stdout.strip().splitlines()[-1])
            if not header:  # the child says how it read memory
                header = True
                measure = ("the CPU allocator's peak bytes in use" if
                           found["tiled"]["method"] == "allocator" else "peak RSS growth")
                print(f"## TensorFlow (CPU), value-and-grad in tf.function: {measure} above what "
                      f"was held before the inputs, fresh process each (float32, d = {DIM})\n")
                print("| loss | B | floor (MiB) | tiled (MiB) | tiled / floor | dense (MiB) | "
                      "dense / floor |")
                print("|---|---|---|---|---|---|---|")
            cells = [f"{mib(peak)} | {peak / floor_bytes(rows):.2f}"
                     if (peak := found[form]["peak"]) is not None
                     else f"({found[form]['note']}) | -" for form in ("tiled", "dense")]
            print(f"| {loss} | 2^{power} | {mib(floor_bytes(rows))} | {' | '.join(cells)} |",
                  flush=True)
    print()


# -- time: tiled / dense, interleaved -------------------------------------------------------------------
def _interleaved(runs: dict, repeats: int) -> dict:
    for run in runs.values():
        run()  # compile / warm up
    times: dict = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def time_table(rows: int, repeats: int, tile: int | None, backends: tuple = BACKENDS) -> None:
    import torch

    from gradcache_torch import losses as torch_losses

    print(f"## Time of value-and-grad, tiled / dense (float32, B = {rows}, d = {DIM}, "
          f"tile = {tile or 'default'}; median of {repeats}, interleaved)\n")
    print("| backend | loss | dense (s) | tiled (s) | tiled / dense |")
    print("|---|---|---|---|---|")
    extra = {"tile_size": tile} if tile else {}
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, DIM, generator=generator, requires_grad=True)
    y = torch.randn(rows, DIM, generator=generator, requires_grad=True)
    for loss in LOSSES if "torch" in backends else ():
        def run(fn, **kw):
            def go():
                x.grad = y.grad = None
                fn(x, y, **kw).backward()
            return go
        med = _interleaved({"dense": run(getattr(torch_losses, f"{loss}_dense")),
                            "tiled": run(getattr(torch_losses, loss), **extra)}, repeats)
        print(f"| torch | {loss} | {med['dense']:.2f} | {med['tiled']:.2f} | "
              f"{med['tiled'] / med['dense']:.2f} |", flush=True)
    if "jax" in backends:
        jax_time_rows(x.detach().numpy(), y.detach().numpy(), repeats, extra)
    if "tf" in backends:
        tf_time_rows(x.detach().numpy(), y.detach().numpy(), repeats, extra)
    print()


def jax_time_rows(x, y, repeats: int, extra: dict) -> None:
    import jax
    import jax.numpy as jnp

    from gradcache_jax import losses as jax_losses

    jx, jy = jnp.asarray(x), jnp.asarray(y)
    for loss in LOSSES:
        def compiled(fn, **kw):
            step = jax.jit(jax.value_and_grad(lambda a, b: fn(a, b, **kw), argnums=(0, 1)))
            return lambda: jax.block_until_ready(step(jx, jy))
        med = _interleaved({"dense": compiled(getattr(jax_losses, f"{loss}_dense")),
                            "tiled": compiled(getattr(jax_losses, loss), **extra)}, repeats)
        print(f"| jax | {loss} | {med['dense']:.2f} | {med['tiled']:.2f} | "
              f"{med['tiled'] / med['dense']:.2f} |", flush=True)


def tf_time_rows(x, y, repeats: int, extra: dict) -> None:
    import tensorflow as tf

    from gradcache_tf import losses as tf_losses

    tx, ty = tf.constant(x), tf.constant(y)

    def timed(traced: bool, fn, **kw):
        step = tf_value_and_grad(fn, **kw)
        step = tf.function(step) if traced else step
        return lambda: float(step(tx, ty)[0])  # float(): wait for the result

    for traced in (True, False):  # as users run TF; eagerly (a Python loop over tiles) for reference
        for loss in LOSSES:
            med = _interleaved({"dense": timed(traced, getattr(tf_losses, f"{loss}_dense")),
                                "tiled": timed(traced, getattr(tf_losses, loss), **extra)},
                               repeats)
            label = "tf" if traced else "tf (eager)"
            print(f"| {label} | {loss} | {med['dense']:.2f} | {med['tiled']:.2f} | "
                  f"{med['tiled'] / med['dense']:.2f} |", flush=True)


# -- the headline: one cached step at B = 262,144 ---------------------------------------------------------
def headline(rows: int, chunk: int, tile: int | None, device: str = "cpu") -> None:
    import torch

    from gradcache_torch import cached_step
    from gradcache_torch.losses import info_nce

    torch.manual_seed(0)
    features = 256
    encoder = torch.nn.Sequential(torch.nn.Linear(features, 512), torch.nn.GELU(),
                                  torch.nn.Linear(512, DIM)).to(device)
    temperature = torch.nn.Parameter(torch.tensor(0.05, device=device))
    cuda = device.startswith("cuda")
    extra = {"tile_size": tile} if tile else {}

    def loss_fn(q, p):
        return info_nce(q, p, temperature=temperature, **extra)

    warm = [torch.randn(chunk, features, device=device) for _ in range(2)]
    cached_step(encoder, warm, loss_fn, chunk_size=chunk // 4)  # warm-up at a small batch
    encoder.zero_grad(set_to_none=True)
    temperature.grad = None
    del warm
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = memory.baseline()
    queries = torch.randn(rows, features, device=device)
    passages = torch.randn(rows, features, device=device)
    inputs = 2 * rows * features * 4
    start = time.perf_counter()
    loss = cached_step(encoder, (queries, passages), loss_fn, chunk_size=chunk)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() if cuda else memory.peak_rss_bytes()) - before
    where = (torch.cuda.get_device_name() if cuda else f"{torch.get_num_threads()} CPU threads")
    print(f"## Headline: one torch cached_step, tiled InfoNCE, B = {rows:,}, d = {DIM}, "
          f"chunk = {chunk}, tile = {tile or 'default'}, {where}\n")
    print(f"| loss | time (s) | peak {'allocated' if cuda else 'RSS'} growth (MiB) | inputs (MiB) | "
          "floor: reps + grads (MiB) | "
          "peak / (inputs + floor) | one dense B x B float32 (MiB) |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {float(loss):.4f} | {seconds:,.0f} | {mib(peak)} | {mib(inputs)} | "
          f"{mib(floor_bytes(rows))} | {peak / (inputs + floor_bytes(rows)):.2f} | "
          f"{mib(rows * rows * 4)} |")
    print(f"\ntemperature grad {float(temperature.grad):.4g}; "
          f"encoder grad norm {float(torch.cat([p.grad.flatten() for p in encoder.parameters()]).norm()):.4g}")


def headline_jax(rows: int, chunk: int, tile: int | None) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from gradcache_jax import cached_step
    from gradcache_jax.losses import info_nce

    features = 256
    rng = np.random.default_rng(0)
    params = {"w1": jnp.asarray(rng.normal(size=(features, 512)) / 16, jnp.float32),
              "b1": jnp.zeros(512, jnp.float32),
              "w2": jnp.asarray(rng.normal(size=(512, DIM)) / 22, jnp.float32),
              "temperature": jnp.asarray(0.05, jnp.float32)}
    extra = {"tile_size": tile} if tile else {}

    def encoder(params, x):
        return jax.nn.gelu(x @ params["w1"] + params["b1"]) @ params["w2"]

    def loss_fn(params, q, p):
        return info_nce(q, p, temperature=params["temperature"], **extra)

    def step(params, queries, passages):
        return cached_step(encoder, (queries, passages), loss_fn, chunk_size=chunk,
                           params=params, loss_takes_params=True)

    shape = jax.ShapeDtypeStruct((rows, features), jnp.float32)
    compiled = jax.jit(step).lower(params, shape, shape).compile()
    stats = compiled.memory_analysis()
    program = (stats.argument_size_in_bytes + stats.output_size_in_bytes
               + stats.temp_size_in_bytes - stats.alias_size_in_bytes)
    queries = jnp.asarray(rng.normal(size=(rows, features)), jnp.float32)
    passages = jnp.asarray(rng.normal(size=(rows, features)), jnp.float32)
    inputs = 2 * rows * features * 4
    before = memory.baseline()
    start = time.perf_counter()
    loss, grads = jax.block_until_ready(compiled(params, queries, passages))
    seconds = time.perf_counter() - start
    peak = memory.peak_rss_bytes() - before
    print(f"## Headline: one jitted JAX cached_step, tiled InfoNCE, B = {rows:,}, d = {DIM}, "
          f"chunk = {chunk}, tile = {tile or 'default'}\n")
    print("| loss | time (s) | compiled step memory (MiB) | peak RSS growth (MiB) | inputs (MiB) | "
          "floor: reps + grads (MiB) | compiled / (inputs + floor) | one dense B x B float32 (MiB) |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {float(loss):.4f} | {seconds:,.0f} | {mib(program)} | {mib(peak)} | {mib(inputs)} | "
          f"{mib(floor_bytes(rows))} | {program / (inputs + floor_bytes(rows)):.2f} | "
          f"{mib(rows * rows * 4)} |")
    print(f"\ntemperature grad {float(grads['temperature']):.4g}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", nargs="?", default="all",
                        choices=["memory", "time", "all", "_torch_memory", "_tf_memory"])
    parser.add_argument("args", nargs="*")
    parser.add_argument("--headline", action="store_true")
    parser.add_argument("--rows", type=int, default=None)
    parser.add_argument("--chunk", type=int, default=16384)
    parser.add_argument("--tile", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backends", default=",".join(BACKENDS),
                        help="comma-separated backends of the memory and time tables "
                             f"(default {','.join(BACKENDS)})")
    parser.add_argument("--backend", choices=["torch", "jax"], default="torch",
                        help="the framework of the --headline step")
    parser.add_argument("--device", default="cpu", help="torch device of the --headline step")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (on a loaded machine 1 avoids stalls)")
    options = parser.parse_args()
    if options.what == "_torch_memory":
        loss, form, rows, tile = options.args
        print(json.dumps(torch_memory_here(loss, form, int(rows), int(tile) or None)))
        return
    if options.what == "_tf_memory":
        loss, form, rows, tile = options.args
        print(json.dumps(tf_memory_here(loss, form, int(rows), int(tile) or None)))
        return
    backends = tuple(options.backends.split(","))
    if unknown := set(backends) - set(BACKENDS):
        parser.error(f"unknown backends {sorted(unknown)}; choose from {', '.join(BACKENDS)}")
    if options.threads:
        import torch
        torch.set_num_threads(options.threads)
    if options.headline:
        if options.backend == "jax":
            headline_jax(options.rows or 262_144, options.chunk, options.tile)
        else:
            headline(options.rows or 262_144, options.chunk, options.tile, options.device)
        return
    if options.what in ("memory", "all"):
        if "jax" in backends:
            jax_memory_table(options.tile)
        if "torch" in backends:
            torch_memory_table(options.tile)
        if "tf" in backends:
            tf_memory_table(options.tile)
    if options.what in ("time", "all"):
        time_table(options.rows or 2**14, options.repeats, options.tile, backends)


if __name__ == "__main__":
    main()
