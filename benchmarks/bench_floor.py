"""The recomputation floor: how close ``cached_step`` comes to the work gradient caching must do.

Gradient caching runs every chunk forward twice and backward once. The floor is that work alone,
with nothing around it: (a) a no-graph forward of every chunk, then (b) a forward and a backward of
every chunk with a fixed random cotangent in place of the loss's gradient, the parameter gradients
summed. ``cached_step`` does the same plus the loss on the representations, the bookkeeping and
the random-state replay; cached / floor is what the library (and the loss) add, and the issue's
target is <= 1.05. cached / plain is against one full-batch step of the same loss.

The encoder, its weights, the data and the timing loop are ``gradcache bench``'s
(:mod:`gradcache_cli.bench`); the loss of the cached and plain steps is the library's tiled
InfoNCE. Each backend runs in a child process with one CPU thread (torch.set_num_threads(1);
XLA without multi-threaded Eigen; TF intra- and inter-op 1), its three steps timed in turn
(interleaved repetitions, medians), both wall time and the process's CPU time. JAX steps run
under ``jax.jit`` (the floor's chunk loops are ``lax.scan``, like the library's), TF steps inside
``tf.function`` (the floor's loops are ``tf.while_loop``, like the library's). Asserts nothing.

    python benchmarks/bench_floor.py                      # every backend, chunks 32, 64, 128
    python benchmarks/bench_floor.py --backends jax --chunks 64 --repeats 9
    python benchmarks/bench_floor.py --quick              # tiny model, one repetition (the test)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gradcache_cli.bench.model import DEFAULT, QUICK, time_clocks, token_batch  # noqa: E402
from gradcache_cli.bench.runner import child_env, json_answer  # noqa: E402

BACKENDS = ("torch", "jax", "tf")
MODULES = {"torch": "torch", "jax": "jax", "tf": "tensorflow"}
STEPS = ("floor", "cached", "plain")


def _cotangents(model: dict, rows: int) -> tuple[Any, Any]:
    """The fixed random cotangents of the floor's backward, one ``rows x out`` array per group."""
    import numpy as np

    rng = np.random.default_rng(2)
    return tuple(rng.normal(size=(rows, model["out"])).astype(np.float32) for _ in range(2))


def torch_steps(model: dict, rows: int, chunk: int) -> dict:
    import torch

    from gradcache_cli.bench import torch_bench
    from gradcache_torch import cached_step

    torch.set_num_threads(1)
    encoder = torch_bench.Encoder(model)
    q, p = (torch.from_numpy(ids) for ids in token_batch(model, rows))
    cotangents = [torch.from_numpy(c) for c in _cotangents(model, rows)]
    loss = torch_bench.info_nce_tiled

    def floor() -> None:
        encoder.zero_grad(set_to_none=True)
        with torch.no_grad():
            for group in (q, p):
                for ids in group.split(chunk):
                    encoder(ids)
        for group, cotangent in zip((q, p), cotangents):
            for ids, grad in zip(group.split(chunk), cotangent.split(chunk)):
                encoder(ids).backward(grad)

    def cached() -> None:
        encoder.zero_grad(set_to_none=True)
        cached_step(encoder, (q, p), loss, chunk_size=chunk)

    def plain() -> None:
        encoder.zero_grad(set_to_none=True)
        loss(encoder(q), encoder(p)).backward()

    return {"floor": floor, "cached": cached, "plain": plain}


def jax_steps(model: dict, rows: int, chunk: int) -> dict:
    import jax
    import jax.numpy as jnp

    from gradcache_cli.bench import jax_bench
    from gradcache_jax import cached_step

    encoder, loss = jax_bench.encoder, jax_bench.info_nce_tiled
    params = {name: jnp.asarray(value) for name, value in
              jax_bench.init_weights(model).items()}
    q, p = (jnp.asarray(ids) for ids in token_batch(model, rows))
    cq, cp = (jnp.asarray(c) for c in _cotangents(model, rows))

    def chunks(x: jax.Array) -> jax.Array:
        return x.reshape(-1, chunk, *x.shape[1:])

    def floor(params: dict, q: jax.Array, p: jax.Array, cq: jax.Array, cp: jax.Array) -> Any:
        # The no-graph forward's outputs are returned, or XLA would drop the work.
        reps = [jax.lax.map(lambda ids: encoder(params, ids), chunks(g)) for g in (q, p)]

        def body(grads: dict, item: tuple) -> tuple:
            ids, cotangent = item
            _, vjp = jax.vjp(lambda w: encoder(w, ids), params)
            return jax.tree_util.tree_map(jnp.add, grads, vjp(cotangent)[0]), None

        grads = jax.tree_util.tree_map(jnp.zeros_like, params)
        for group, cotangent in ((q, cq), (p, cp)):
            grads, _ = jax.lax.scan(body, grads, (chunks(group), chunks(cotangent)))
        return reps, grads

    def cached(params: dict, q: jax.Array, p: jax.Array) -> Any:
        return cached_step(encoder, (q, p), loss, chunk_size=chunk, params=params)

    def plain(params: dict, q: jax.Array, p: jax.Array) -> Any:
        return jax.value_and_grad(lambda w: loss(encoder(w, q), encoder(w, p)))(params)

    floor_jit, cached_jit, plain_jit = jax.jit(floor), jax.jit(cached), jax.jit(plain)
    return {"floor": lambda: jax.block_until_ready(floor_jit(params, q, p, cq, cp)),
            "cached": lambda: jax.block_until_ready(cached_jit(params, q, p)),
            "plain": lambda: jax.block_until_ready(plain_jit(params, q, p))}


def tf_steps(model: dict, rows: int, chunk: int) -> dict:
    import tensorflow as tf

    from gradcache_cli.bench import tf_bench
    from gradcache_tf import cached_step

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    encoder, loss = tf_bench.Encoder(model), tf_bench.info_nce_tiled
    variables = encoder.trainable_variables
    q, p = (tf.constant(ids) for ids in token_batch(model, rows))
    cq, cp = (tf.constant(c) for c in _cotangents(model, rows))
    count = rows // chunk

    @tf.function
    def floor(q: tf.Tensor, p: tf.Tensor, cq: tf.Tensor, cp: tf.Tensor) -> Any:
        reps = []
        for group in (q, p):  # the no-graph forward; its outputs returned so none is pruned
            def forward(i: tf.Tensor, out: tf.TensorArray, group: tf.Tensor = group) -> tuple:
                return i + 1, out.write(i, encoder(group[i * chunk:(i + 1) * chunk]))
            _, out = tf.while_loop(lambda i, _: i < count, forward,
                                   (0, tf.TensorArray(tf.float32, size=count)),
                                   parallel_iterations=1)
            reps.append(out.concat())
        grads = [tf.zeros_like(v) for v in variables]
        for group, cotangent in ((q, cq), (p, cp)):
            def backward(i: tf.Tensor, grads: list, group: tf.Tensor = group,
                         cotangent: tf.Tensor = cotangent) -> tuple:
                rows_i = slice(i * chunk, (i + 1) * chunk)
                with tf.GradientTape() as tape:
                    out = encoder(group[rows_i])
                new = tape.gradient(out, variables, output_gradients=cotangent[rows_i])
                return i + 1, [g + n for g, n in zip(grads, new)]
            _, grads = tf.while_loop(lambda i, _: i < count, backward, (0, grads),
                                     parallel_iterations=1)
        return reps, grads

    @tf.function
    def cached(q: tf.Tensor, p: tf.Tensor) -> Any:
        return cached_step(encoder, (q, p), loss, chunk_size=chunk)

    @tf.function
    def plain(q: tf.Tensor, p: tf.Tensor) -> Any:
        with tf.GradientTape() as tape:
            value = loss(encoder(q), encoder(p))
        return value, tape.gradient(value, variables)

    def done(results: Any) -> None:  # reading every result waits for the step
        for leaf in tf.nest.flatten(results):
            tf.convert_to_tensor(leaf).numpy()

    return {"floor": lambda: done(floor(q, p, cq, cp)), "cached": lambda: done(cached(q, p)),
            "plain": lambda: done(plain(q, p))}


def child(backend: str, model: dict, rows: int, chunks: list[int], repeats: int) -> dict:
    """One backend's measurements: ``{chunk: {step: {"wall": s, "cpu": s}}}`` and the version."""
    make = {"torch": torch_steps, "jax": jax_steps, "tf": tf_steps}[backend]
    found = {}
    for chunk in chunks:
        steps = make(model, rows, chunk)
        found[str(chunk)] = time_clocks({name: steps[name] for name in STEPS}, repeats)
    version = importlib.import_module(MODULES[backend]).__version__.split("+")[0]
    return {"version": version, "chunks": found}


def run_backend(backend: str, model: dict, rows: int, chunks: list[int], repeats: int,
                timeout: float) -> dict:
    """Runs :func:`child` in a fresh process with one CPU thread; ``{"error": why}`` if it fails."""
    payload = json.dumps({"backend": backend, "model": model, "rows": rows, "chunks": chunks,
                          "repeats": repeats})
    return json_answer([sys.executable, __file__, "--child", payload], env=child_env(1),
                       timeout=timeout)


def table(found: dict[str, dict], chunks: list[int]) -> list[str]:
    """The markdown table: one row per backend and chunk, ratios by CPU time and by wall time."""
    lines = ["| backend | chunk | floor ms (cpu) | cached ms (cpu) | plain ms (cpu) | "
             "cached / floor (cpu) | cached / plain (cpu) | cached / floor (wall) | "
             "cached / plain (wall) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for backend, answer in found.items():
        if "chunks" not in answer:
            lines.append(f"| {backend} | – | – | – | – | error: {answer.get('error')} | – | – | – |")
            continue
        for chunk in chunks:
            t = answer["chunks"][str(chunk)]
            cpu = {name: t[name]["cpu"] for name in STEPS}
            wall = {name: t[name]["wall"] for name in STEPS}
            lines.append(
                f"| {backend} {answer['version']} | {chunk} | {1e3 * cpu['floor']:.0f} | "
                f"{1e3 * cpu['cached']:.0f} | {1e3 * cpu['plain']:.0f} | "
                f"{cpu['cached'] / cpu['floor']:.3f} | {cpu['cached'] / cpu['plain']:.3f} | "
                f"{wall['cached'] / wall['floor']:.3f} | {wall['cached'] / wall['plain']:.3f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default=",".join(BACKENDS),
                        help="comma-separated, from torch,jax,tf (not installed: skipped)")
    parser.add_argument("--chunks", default=None,
                        help="comma-separated chunk sizes, rows (default: 32,64,128; --quick: 4,8)")
    parser.add_argument("--batch", type=int, default=512, help="rows per group")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps of each kind (median)")
    parser.add_argument("--quick", action="store_true",
                        help="the bench's tiny model, batch 16, one repetition")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        payload = json.loads(args.child)
        print(json.dumps(child(payload["backend"], payload["model"], payload["rows"],
                               payload["chunks"], payload["repeats"])), flush=True)
        return 0
    model = QUICK if args.quick else DEFAULT
    rows = 16 if args.quick else args.batch
    chunks = [int(c) for c in (args.chunks or ("4,8" if args.quick else "32,64,128")).split(",")]
    repeats = 1 if args.quick else args.repeats
    if any(rows % chunk for chunk in chunks):
        parser.error(f"--batch {rows} must be a multiple of every chunk size {chunks}")
    found = {}
    for backend in args.backends.split(","):
        if importlib.util.find_spec(MODULES[backend]) is None:
            print(f"skipping {backend}: {MODULES[backend]} is not installed", flush=True)
            continue
        found[backend] = run_backend(backend, model, rows, chunks, repeats, timeout=1800)
    print(f"## cached_step against the recomputation floor and a plain step (batch {rows} rows "
          f"x 2 groups; median of {repeats}, interleaved; one CPU thread; tiled InfoNCE)\n")
    print("\n".join(table(found, chunks)))
    return 0 if all("chunks" in answer for answer in found.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
