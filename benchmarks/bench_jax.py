"""Measures the JAX adapter: compiled memory, compile time against the number of chunks, step time.

Prints markdown tables; asserts nothing (these machines are shared and noisy, so the time figures
are ratios of measurements taken side by side in one run). Memory is exact: XLA's own account of
the compiled step, ``jax.jit(step).lower(...).compile().memory_analysis()``, nothing is run for it.

    python benchmarks/bench_jax.py            # all three tables
    python benchmarks/bench_jax.py memory     # temporary memory at batch = 8 x chunk and 64 x chunk
    python benchmarks/bench_jax.py compile    # compile time at 4 and 64 chunks
    python benchmarks/bench_jax.py time       # cached / full-batch step time under jit (CPU)
    python benchmarks/bench_jax.py loss       # value_and_grad(cached_loss) / cached_step, under jit
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

try:
    from gradcache_jax import cached_loss, cached_step
except ImportError:  # run from a checkout whose editable install predates gradcache_jax
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from gradcache_jax import cached_loss, cached_step


def mlp_params(dim_in: int, hidden: int, dim_out: int, layers: int, seed: int = 0) -> dict:
    """A residual MLP tower: an input projection, ``layers`` hidden blocks, an output projection."""
    rng = np.random.default_rng(seed)

    def dense(a: int, b: int) -> dict:
        return {"w": jnp.asarray(rng.normal(scale=a ** -0.5, size=(a, b)), jnp.float32),
                "b": jnp.zeros((b,), jnp.float32)}

    return {"inp": dense(dim_in, hidden), "blocks": [dense(hidden, hidden) for _ in range(layers)],
            "out": dense(hidden, dim_out)}


def encoder(params: dict, x: jax.Array) -> jax.Array:
    h = jax.nn.gelu(x @ params["inp"]["w"] + params["inp"]["b"])
    for block in params["blocks"]:
        h = h + jax.nn.gelu(h @ block["w"] + block["b"])
    return h @ params["out"]["w"] + params["out"]["b"]


def info_nce(q: jax.Array, d: jax.Array) -> jax.Array:
    scores = q @ d.T / 0.05
    return jnp.mean(jax.nn.logsumexp(scores, axis=1) - jnp.diagonal(scores))


def make_steps(chunk: int) -> dict:
    """Fresh jitted functions (a fresh jit has no compiled program cached yet)."""
    def cached(params, q, d):
        return cached_step(encoder, (q, d), info_nce, chunk_size=chunk, params=params)

    def full(params, q, d):
        return jax.value_and_grad(lambda p: info_nce(encoder(p, q), encoder(p, d)))(params)

    return {"cached": jax.jit(cached), "full": jax.jit(full)}


def data(rows: int, dim_in: int, seed: int = 1) -> tuple[jax.Array, jax.Array]:
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.normal(size=(rows, dim_in)), jnp.float32) for _ in range(2))


def loss_temp_bytes(rows: int, dim_out: int) -> int:
    """The loss's own temporary memory: its value and gradient on (rows x dim_out) representations
    (for InfoNCE the rows x rows score matrix and its gradient, whatever the encoder)."""
    reps = jnp.zeros((rows, dim_out), jnp.float32)
    compiled = jax.jit(jax.value_and_grad(info_nce, argnums=(0, 1))).lower(reps, reps).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def memory_table(model: dict, chunk: int) -> None:
    params = mlp_params(**model)
    print(f"## Temporary memory of the compiled step (XLA memory_analysis; chunk {chunk}, "
          f"hidden {model['hidden']}, {model['layers']} blocks, d_out {model['dim_out']})\n")
    print("| batch | chunks | cached temp (MiB) | full-batch temp (MiB) | reps + grads (MiB) "
          "| loss's own temp (MiB) |")
    print("|---|---|---|---|---|---|")
    temps = {}
    for chunks in (8, 64):
        rows = chunks * chunk
        q, d = data(rows, model["dim_in"])
        steps = make_steps(chunk)
        temp = {name: step.lower(params, q, d).compile().memory_analysis().temp_size_in_bytes
                for name, step in steps.items()}
        reps = 2 * 2 * rows * model["dim_out"] * 4  # two groups, representations + gradients, f32
        loss = loss_temp_bytes(rows, model["dim_out"])
        temps[chunks] = (temp["cached"], temp["full"], reps, loss)
        print(f"| {rows} | {chunks} | {temp['cached'] / 2**20:.2f} | {temp['full'] / 2**20:.2f} | "
              f"{reps / 2**20:.2f} | {loss / 2**20:.2f} |")
    (c8, f8, r8, l8), (c64, f64, r64, l64) = temps[8], temps[64]
    batch_bound = (r64 - r8) + (l64 - l8)
    print(f"\nfrom 8 to 64 chunks the cached step's temporary memory grows by "
          f"{(c64 - c8) / 2**20:.2f} MiB; the representations and their gradients grow by "
          f"{(r64 - r8) / 2**20:.2f} MiB and the loss's own memory (the batch x batch scores and "
          f"their gradient) by {(l64 - l8) / 2**20:.2f} MiB, {batch_bound / 2**20:.2f} MiB together "
          f"(cached growth / that = {(c64 - c8) / batch_bound:.2f}). The full-batch step's grows by "
          f"{(f64 - f8) / 2**20:.2f} MiB; at 64 chunks it needs {f64 / c64:.1f}x the cached "
          f"step's temporary memory.\n")


def compile_table(model: dict, chunk: int, repeats: int) -> None:
    params = mlp_params(**model)
    print(f"## Compile time of the cached step (chunk {chunk}; best of {repeats}, interleaved, "
          f"a fresh jit each)\n")
    print("| batch | chunks | lowered program (lines) | compile (s) |")
    print("|---|---|---|---|")
    inputs = {chunks: data(chunks * chunk, model["dim_in"]) for chunks in (4, 64)}
    make_steps(chunk)["cached"].lower(params, *data(8 * chunk, model["dim_in"])).compile()  # warm-up
    seconds: dict[int, list[float]] = {4: [], 64: []}
    lines = {}
    for _ in range(repeats):
        for chunks, (q, d) in inputs.items():  # interleaved, so drift hits both alike
            step = make_steps(chunk)["cached"]
            start = time.perf_counter()
            lowered = step.lower(params, q, d)
            lowered.compile()
            seconds[chunks].append(time.perf_counter() - start)
            lines[chunks] = len(lowered.as_text().splitlines())
    best = {chunks: min(values) for chunks, values in seconds.items()}
    for chunks in (4, 64):
        print(f"| {chunks * chunk} | {chunks} | {lines[chunks]} | {best[chunks]:.3f} |")
    print(f"\ncompile time at 64 chunks / at 4 chunks = {best[64] / best[4]:.2f}\n")


def time_table(model: dict, configs: list[tuple[int, int]], repeats: int) -> None:
    params = mlp_params(**model)
    print(f"## Step time under jit on {jax.devices()[0].platform.upper()}, cached / full-batch "
          f"(median of {repeats}, interleaved)\n")
    print("| batch | chunk | full (ms) | cached (ms) | cached / full |")
    print("|---|---|---|---|---|")
    for rows, chunk in configs:
        q, d = data(rows, model["dim_in"])
        steps = make_steps(chunk)
        for step in steps.values():  # compile and warm up
            jax.block_until_ready(step(params, q, d))
        times: dict[str, list[float]] = {name: [] for name in steps}
        for _ in range(repeats):
            for name, step in steps.items():  # interleaved, so drift hits both alike
                start = time.perf_counter()
                jax.block_until_ready(step(params, q, d))
                times[name].append(time.perf_counter() - start)
        full, cached = (statistics.median(times[name]) for name in ("full", "cached"))
        print(f"| {rows} | {chunk} | {1e3 * full:.1f} | {1e3 * cached:.1f} | {cached / full:.2f} |")
    print()


def loss_table(model: dict, configs: list[tuple[int, int]], repeats: int) -> None:
    """``jax.value_and_grad(cached_loss(...))`` against ``cached_step`` on the same batch: the
    custom VJP must cost nothing over the step (same passes, same program up to the residuals)."""
    params = mlp_params(**model)

    def via_loss(params, q, d):
        return jax.value_and_grad(cached_loss(encoder, (q, d), info_nce, chunk_size=chunk))(params)

    def via_step(params, q, d):
        return cached_step(encoder, (q, d), info_nce, chunk_size=chunk, params=params)

    print(f"## value_and_grad(cached_loss) / cached_step under jit on "
          f"{jax.devices()[0].platform.upper()} (median of {repeats}, interleaved)\n")
    print("| batch | chunk | cached_step (ms) | cached_loss (ms) | loss / step | temp MiB step / loss |")
    print("|---|---|---|---|---|---|")
    ratios = []
    for rows, chunk in configs:
        q, d = data(rows, model["dim_in"])
        steps = {"step": jax.jit(via_step), "loss": jax.jit(via_loss)}
        temps = {name: step.lower(params, q, d).compile().memory_analysis().temp_size_in_bytes
                 for name, step in steps.items()}
        (step_loss, step_grads), (loss_loss, loss_grads) = (
            jax.block_until_ready(step(params, q, d)) for step in steps.values())
        error = max(float(jnp.max(jnp.abs(a - b))) for a, b in
                    zip(jax.tree_util.tree_leaves(step_grads), jax.tree_util.tree_leaves(loss_grads)))
        times: dict[str, list[float]] = {name: [] for name in steps}
        for _ in range(repeats):
            for name, step in steps.items():  # interleaved, so drift hits both alike
                start = time.perf_counter()
                jax.block_until_ready(step(params, q, d))
                times[name].append(time.perf_counter() - start)
        step_t, loss_t = (statistics.median(times[name]) for name in ("step", "loss"))
        best = min(times["loss"]) / min(times["step"])   # least disturbed by a busy machine
        ratios.append(loss_t / step_t)
        print(f"| {rows} | {chunk} | {1e3 * step_t:.1f} | {1e3 * loss_t:.1f} | {loss_t / step_t:.3f} "
              f"(best {best:.3f}) | {temps['step'] / 2**20:.2f} / {temps['loss'] / 2**20:.2f} |")
        assert abs(float(step_loss) - float(loss_loss)) <= 1e-5 * abs(float(step_loss)), "loss differs"
        assert error <= 1e-4, f"gradients differ by {error}"
    print(f"\nworst ratio {max(ratios):.3f} (target <= 1.03)\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", nargs="?", default="all", choices=["all", "memory", "compile", "time", "loss"])
    parser.add_argument("--chunk", type=int, default=32, help="chunk size for memory and compile")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    options = parser.parse_args()
    model = {"dim_in": 256, "hidden": options.hidden, "dim_out": 128, "layers": options.layers}
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, float32\n")
    if options.what in ("all", "memory"):
        memory_table(model, options.chunk)
    if options.what in ("all", "compile"):
        compile_table(model, options.chunk, repeats=5)
    if options.what in ("all", "time"):
        time_table(model, [(512, 64), (1024, 128), (2048, 256)], options.repeats)
    if options.what in ("all", "loss"):
        loss_table(model, [(512, 64), (1024, 128), (2048, 256)], max(options.repeats, 11))


if __name__ == "__main__":
    main()
