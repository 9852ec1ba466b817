"""Tiled losses in JAX: equal to the dense ones under ``jit``, in ``cached_step``, in a program
whose size does not depend on the batch and whose memory grows linearly with it.

Each drawn shape compiles anew, so the property test draws fewer examples than the torch one.
float64 is switched on per test (JAX's thread-local context), as in ``tests/jax``.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings

from gradcache.testing import examples
from tests.losses.common import Case, assert_same, cases, check_drawn, default_params

jax = pytest.importorskip("jax")
import jax.extend  # noqa: E402, F811  (a submodule of the jax just imported)
import jax.numpy as jnp  # noqa: E402

from gradcache_jax import cached_step, losses  # noqa: E402


@pytest.fixture(autouse=True)
def _float64_inside_this_module():
    with jax.enable_x64(True):
        yield


def jit(fn, **options):
    # Many small programs, each compiled once: LLVM's optimisations cost more than they save.
    return jax.jit(fn, compiler_options={"xla_backend_optimization_level": 0}, **options)


def evaluate(case: Case, dense: bool, dtype=jnp.float64) -> dict:
    """Value and every gradient under ``jit``, as numpy."""
    x, y = (jnp.asarray(a, dtype) for a in case.data())
    params = {k: jnp.asarray(v, dtype) for k, v in case.params.items()}
    if dense:
        fn = getattr(losses, f"{case.loss}_dense")
        extra = {}
    else:
        fn = getattr(losses, case.loss)
        extra = {"tile_size": case.tile}

    def loss(x, y, params):
        return fn(x, y, similarity=case.similarity, **params, **extra)

    value, (dx, dy, dparams) = jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(x, y, params)
    return {"loss": np.asarray(value), "x": np.asarray(dx), "y": np.asarray(dy),
            **{k: np.asarray(v) for k, v in dparams.items()}}


@settings(max_examples=examples(25), deadline=None)
@given(case=cases(max_rows=10))
def test_tiled_equals_dense_under_jit(case):
    check_drawn(evaluate(case, dense=False), evaluate(case, dense=True))


@pytest.mark.parametrize("loss", ["info_nce", "clip_loss", "siglip_loss"])
def test_eager_float32_with_hard_negatives(loss):
    case = Case(loss, rows=19, negatives=3 if loss == "info_nce" else 0, dim=8, tile=6,
                similarity="cosine", params=default_params(loss), seed=5)
    x, y = (jnp.asarray(a, jnp.float32) for a in case.data())
    tiled = getattr(losses, loss)(x, y, similarity="cosine", tile_size=6, **default_params(loss))
    dense = getattr(losses, f"{loss}_dense")(x, y, similarity="cosine", **default_params(loss))
    assert tiled.dtype == jnp.float32
    assert abs(float(tiled) - float(dense)) <= 1e-5 * abs(float(dense))


def count_equations(jaxpr) -> int:
    return sum(1 + sum(count_equations(sub) for sub in jax.extend.core.jaxprs_in_params(e.params))
               for e in jaxpr.eqns)


def primitives(jaxpr) -> set:
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            names |= primitives(sub)
    return names


@pytest.mark.parametrize("loss", ["info_nce", "clip_loss", "siglip_loss"])
def test_program_does_not_grow_with_the_batch(loss):
    def value_and_grad(x, y):
        return jax.value_and_grad(
            lambda x, y: getattr(losses, loss)(x, y, tile_size=8), argnums=(0, 1))(x, y)

    sizes = {}
    for rows in (21, 301):  # neither divides into tiles
        x = y = jnp.ones((rows, 4))
        jaxpr = jax.make_jaxpr(value_and_grad)(x, y).jaxpr
        assert primitives(jaxpr) & {"scan", "while"}  # the tile loops are loops, not unrolled
        sizes[rows] = (count_equations(jaxpr),
                       len(jax.jit(value_and_grad).lower(x, y).as_text().splitlines()))
    assert sizes[21] == sizes[301], sizes


def test_compiled_memory_grows_linearly_not_quadratically():
    def temporaries(rows: int) -> int:
        x = jax.ShapeDtypeStruct((rows, 32), jnp.float32)
        fn = jax.value_and_grad(lambda x, y: losses.info_nce(x, y, tile_size=128), argnums=(0, 1))
        return jax.jit(fn).lower(x, x).compile().memory_analysis().temp_size_in_bytes

    small, large = temporaries(2048), temporaries(8192)
    floor_large = 4 * 8192 * 32 * 4  # representations and their gradients, float32
    assert large <= floor_large, (large, floor_large)  # a dense 8192 x 8192 float32 is 256 MiB
    assert large <= 4 * small + 2**20, (small, large)  # x4 rows -> at most x4 memory


def tower(params, x):
    return jnp.tanh(x @ params["w"] + params["b"])


@pytest.mark.parametrize("loss", ["info_nce", "clip_loss", "siglip_loss"])
def test_cached_step_with_tiled_loss_equals_a_full_batch_dense_step(loss):
    rng = np.random.default_rng(0)
    rows, group = 11, (3 if loss == "info_nce" else 1)
    queries = jnp.asarray(rng.normal(size=(rows, 6)))
    passages = jnp.asarray(rng.normal(size=(rows * group, 6)))
    params = {"q": {"w": jnp.asarray(rng.normal(size=(6, 4))), "b": jnp.zeros(4)},
              "p": {"w": jnp.asarray(rng.normal(size=(6, 4))), "b": jnp.zeros(4)},
              "loss": {k: jnp.asarray(v) for k, v in default_params(loss).items()}}
    encoders = [lambda prm, x: tower(prm["q"], x), lambda prm, x: tower(prm["p"], x)]
    tiled, dense = getattr(losses, loss), getattr(losses, f"{loss}_dense")

    def cached(params, queries, passages):
        return cached_step(encoders, (queries, passages),
                           lambda prm, q, p: tiled(q, p, tile_size=4, **prm["loss"]),
                           chunk_size=4, params=params, loss_takes_params=True)

    def full(params, queries, passages):
        return dense(tower(params["q"], queries), tower(params["p"], passages), **params["loss"])

    value, grads = jit(cached)(params, queries, passages)
    expected, expected_grads = jit(jax.value_and_grad(full))(params, queries, passages)
    flat = lambda tree: {jax.tree_util.keystr(k): np.asarray(v)  # noqa: E731
                         for k, v in jax.tree_util.tree_leaves_with_path(tree)}
    assert_same({"loss": np.asarray(value), **flat(grads)},
                {"loss": np.asarray(expected), **flat(expected_grads)}, tolerance=1e-10)
