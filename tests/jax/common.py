"""Small pieces the JAX tests share: an InfoNCE loss, a two-layer tower, data, and comparisons."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gradcache.testing.contract import relative_error


def jit(fn: Any, **options: Any) -> Any:
    """``jax.jit`` with LLVM's optimisations off: these tests compile many small programs once
    each, and compiling dominates their time. What the programs compute is the same; the tests
    that count program size look at the lowered program, before any of this."""
    return jax.jit(fn, compiler_options={"xla_backend_optimization_level": 0}, **options)


def info_nce(q: Any, d: Any) -> Any:
    """InfoNCE with in-batch negatives: row ``i`` of ``q`` should match row ``i`` of ``d``."""
    scores = q @ d.T
    return jnp.mean(jax.nn.logsumexp(scores, axis=1) - jnp.diagonal(scores))


def tower_params(dim_in: int = 6, hidden: int = 8, dim_out: int = 4, dtype: Any = jnp.float64,
                 seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "w1": jnp.asarray(rng.normal(scale=0.5, size=(dim_in, hidden)), dtype),
        "b1": jnp.asarray(rng.normal(scale=0.1, size=(hidden,)), dtype),
        "w2": jnp.asarray(rng.normal(scale=0.5, size=(hidden, dim_out)), dtype),
    }


def tower(params: dict, x: Any, key: Any = None, rate: float = 0.25) -> Any:
    """A two-layer encoder, with dropout on its hidden layer when given a key."""
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    if key is not None:
        keep = jax.random.bernoulli(key, 1.0 - rate, h.shape)
        h = jnp.where(keep, h / (1.0 - rate), 0.0)
    return h @ params["w2"]


def batch(rows: int, dim: int = 6, dtype: Any = jnp.float64, seed: int = 1) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).normal(size=(rows, dim)), dtype)


def max_relative_error(actual: Any, expected: Any) -> float:
    """Largest relative error over the leaves of two pytrees of the same structure."""
    errors = jax.tree_util.tree_map(lambda a, e: relative_error(np.asarray(a), np.asarray(e)),
                                    actual, expected)
    return max(jax.tree_util.tree_leaves(errors))
