"""The JAX side of ``gradcache bench``: the encoder, the two jitted steps, and their measurement jobs.

The cached step is ``gradcache_jax.cached_step`` under ``jax.jit``; the full-batch step is
``jax.jit(jax.value_and_grad(...))`` of the same loss on the whole batch: the library's tiled
InfoNCE (``gradcache_jax.losses.info_nce``); ``cached_dense`` is the cached step with the dense
``B x B`` loss, for contrast. Memory needs no run and no
fresh process: XLA's own account of the compiled program
(``jax.jit(step).lower(...).compile().memory_analysis()``) is exact, so one child sweeps every
batch size by compiling alone. Imported only in a child process (:mod:`gradcache_cli.bench.child`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from gradcache_cli.bench.model import SCALE, TIMED, init_weights, time_interleaved, token_batch
from gradcache_cli.bench.model import sweep as plan_sweep
from gradcache_jax import cached_step
from gradcache_jax import losses as tiled_losses


def encoder(params: dict, ids: jax.Array) -> jax.Array:
    """Embedding, residual position-wise MLP blocks, mean pooling, projection (see _bench_model)."""
    x = params["embed"][ids]
    index = 0
    while f"w1_{index}" in params:
        hidden = jax.nn.gelu(x @ params[f"w1_{index}"] + params[f"b1_{index}"], approximate=False)
        x = x + hidden @ params[f"w2_{index}"] + params[f"b2_{index}"]
        index += 1
    return x.mean(axis=1) @ params["w_out"] + params["b_out"]


def info_nce(q: jax.Array, p: jax.Array) -> jax.Array:
    def normalize(x: jax.Array) -> jax.Array:
        return x / jnp.maximum(jnp.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    scores = SCALE * normalize(q) @ normalize(p).T
    return jnp.mean(jax.nn.logsumexp(scores, axis=1) - jnp.diagonal(scores))

def info_nce_tiled(q: jax.Array, p: jax.Array) -> jax.Array:
    """The same InfoNCE by the library's tiled loss: no ``B x B`` score matrix is ever held."""
    return tiled_losses.info_nce(q, p, temperature=1 / SCALE, similarity="cosine")


def _steps(chunk: int) -> dict:
    """Fresh jitted steps, ``(params, q, p) -> (loss, grads)``."""
    def cached(params: dict, q: jax.Array, p: jax.Array) -> Any:
        return cached_step(encoder, (q, p), info_nce_tiled, chunk_size=chunk, params=params)

    def cached_dense(params: dict, q: jax.Array, p: jax.Array) -> Any:
        return cached_step(encoder, (q, p), info_nce, chunk_size=chunk, params=params)

    def full(params: dict, q: jax.Array, p: jax.Array) -> Any:
        return jax.value_and_grad(lambda w: info_nce_tiled(encoder(w, q), encoder(w, p)))(params)

    return {"cached": jax.jit(cached), "cached_dense": jax.jit(cached_dense), "full": jax.jit(full)}


def _params(model: dict) -> dict:
    return {name: jnp.asarray(value) for name, value in init_weights(model).items()}


def compiled_bytes(step: Any, params: dict, q: Any, p: Any) -> dict:
    """What XLA says the compiled step needs: temporaries + arguments + outputs - aliased."""
    analysis = step.lower(params, q, p).compile().memory_analysis()
    parts = {"temp": analysis.temp_size_in_bytes, "arguments": analysis.argument_size_in_bytes,
             "outputs": analysis.output_size_in_bytes, "alias": analysis.alias_size_in_bytes}
    total = parts["temp"] + parts["arguments"] + parts["outputs"] - parts["alias"]
    return {"bytes": int(total), "parts": {k: int(v) for k, v in parts.items()}}


def sweep(payload: dict) -> dict:
    """The whole memory sweep of both steps, from the compiler's account (nothing is run)."""
    model, chunk, budget = payload["model"], payload["chunk"], payload["budget"]
    params = _params(model)
    steps = _steps(chunk)

    def measure(kind: str, batch: int) -> dict:
        # Shapes only: lowering needs no data, so a batch that would not fit costs nothing.
        ids = jax.ShapeDtypeStruct((batch, model["seq"]), jnp.int32)
        found = compiled_bytes(steps[kind], params, ids, ids)
        return {**found, "fits": found["bytes"] <= budget}

    results = plan_sweep(measure, chunk=chunk, max_batch=payload["max_batch"],
                         extra_doublings=payload["extra_doublings"],
                         contrast=payload.get("contrast", ()))
    # JSON object keys are strings; the parent turns them back into batch sizes.
    return {"version": jax.__version__, "platform": jax.devices()[0].platform,
            "results": {kind: {str(b): r for b, r in found.items()}
                        for kind, found in results.items()}}


def time(payload: dict) -> dict:
    """Median step times of both jitted steps at each batch in ``payload["batches"]``."""
    model, chunk = payload["model"], payload["chunk"]
    params = _params(model)
    rows_out = []
    for rows in payload["batches"]:
        steps = _steps(chunk)
        q, p = (jnp.asarray(ids) for ids in token_batch(model, rows))

        def run(step: Any, q: Any = q, p: Any = p) -> Any:
            return lambda: jax.block_until_ready(step(params, q, p))

        medians = time_interleaved({name: run(steps[name]) for name in TIMED},
                                   payload["repeats"])
        rows_out.append({"batch": rows, "chunk": chunk, **medians})
    return {"version": jax.__version__, "platform": jax.devices()[0].platform, "rows": rows_out}
