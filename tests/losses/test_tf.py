"""Tiled losses in TensorFlow: equal to the dense ones eagerly, inside ``tf.function`` (with and
without XLA) and in ``cached_step``, in a graph whose size does not depend on the batch.

Each drawn shape traces a new graph, so the graph-mode property test draws fewer examples.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings

import tests.tf  # noqa: F401  (TensorFlow's environment first, as the TF tests set it)
from gradcache.testing import examples
from tests.losses.common import Case, assert_same, cases, check_drawn, default_params

tf = pytest.importorskip("tensorflow")
from gradcache_tf import cached_step, losses, trainable_variables  # noqa: E402


def evaluate(case: Case, dense: bool, mode: str = "eager", dtype=tf.float64) -> dict:
    """Value and every gradient (variables for the parameters), as numpy."""
    x, y = (tf.constant(a, dtype) for a in case.data())
    params = {k: tf.Variable(v, dtype=dtype) for k, v in case.params.items()}
    fn = getattr(losses, f"{case.loss}_dense" if dense else case.loss)
    extra = {} if dense else {"tile_size": case.tile}

    def run(x, y):
        with tf.GradientTape() as tape:
            tape.watch([x, y])
            loss = fn(x, y, similarity=case.similarity, **params, **extra)
        return loss, tape.gradient(loss, [x, y] + list(params.values()))

    if mode != "eager":
        run = tf.function(run, jit_compile=mode == "xla")
    loss, grads = run(x, y)
    out = {"loss": loss.numpy(), "x": grads[0].numpy(), "y": grads[1].numpy()}
    out.update({k: g.numpy() for k, g in zip(params, grads[2:])})
    return out


@settings(max_examples=examples(40), deadline=None)
@given(case=cases())
def test_tiled_equals_dense_eagerly(case):
    check_drawn(evaluate(case, dense=False), evaluate(case, dense=True))


@settings(max_examples=examples(12), deadline=None)
@given(case=cases(max_rows=9))
def test_tiled_equals_dense_in_tf_function(case):
    check_drawn(evaluate(case, dense=False, mode="graph"), evaluate(case, dense=True))


@pytest.mark.parametrize("loss", ["info_nce", "clip_loss", "siglip_loss"])
def test_tiled_equals_dense_under_xla(loss):
    case = Case(loss, rows=13, negatives=2 if loss == "info_nce" else 0, dim=5, tile=4,
                similarity="dot", params=default_params(loss), seed=7)
    assert_same(evaluate(case, dense=False, mode="xla"), evaluate(case, dense=True))


def test_float32_eager():
    case = Case("clip_loss", rows=33, negatives=0, dim=16, tile=8, similarity="cosine",
                params=default_params("clip_loss"), seed=1)
    assert_same(evaluate(case, False, dtype=tf.float32), evaluate(case, True, dtype=tf.float32),
                tolerance=1e-5)


def graph_value_and_grad(loss, tile_size):
    """The tiled ``loss``'s value and its gradients with respect to both inputs, as a tf.function."""
    @tf.function
    def value_and_grad(x, y):
        with tf.GradientTape() as tape:
            tape.watch([x, y])
            value = getattr(losses, loss)(x, y, tile_size=tile_size)
        return value, tape.gradient(value, [x, y])
    return value_and_grad


@pytest.mark.parametrize("loss", ["info_nce", "clip_loss", "siglip_loss"])
def test_graph_does_not_grow_with_the_batch(loss):
    value_and_grad = graph_value_and_grad(loss, tile_size=4)
    sizes = {}
    for rows in (10, 90):
        x = tf.ones((rows, 3))
        graph = value_and_grad.get_concrete_function(x, x).graph
        sizes[rows] = len(graph.get_operations())
        assert any(op.type in ("While", "StatelessWhile") for op in graph.get_operations())
    assert sizes[10] == sizes[90], sizes


@pytest.mark.parametrize("loss", ["info_nce", "clip_loss", "siglip_loss"])
def test_graph_holds_at_most_two_b_by_d_temporaries_beyond_the_gradients(loss):
    # CLIP subtracts 2 x (its positive pairs) from dx and dy; 2 * x and 2 * y depend on the inputs
    # alone, so the graph executor used to make them before the tile loop and hold both through
    # it: 5 B x d buffers at the peak where InfoNCE and SigLIP need 3. Read from TF's pooling CPU
    # allocator, which keeps statistics only where oneDNN is on (x86 with AVX-512).
    try:
        tf.config.experimental.get_memory_info("CPU:0")
    except ValueError:
        pytest.skip("TensorFlow's CPU allocator keeps no statistics here (oneDNN off)")
    rows, dim = 2048, 128  # B x d = 1 MiB; a 128 x 128 tile of logits is 64 KiB
    value_and_grad = graph_value_and_grad(loss, tile_size=128)
    x = tf.random.stateless_normal((rows, dim), seed=(0, 1))
    y = tf.random.stateless_normal((rows, dim), seed=(0, 2))
    value_and_grad(x, y)  # trace and run once
    before = tf.config.experimental.get_memory_info("CPU:0")["current"]
    tf.config.experimental.reset_memory_stats("CPU:0")
    out = value_and_grad(x, y)
    peak = tf.config.experimental.get_memory_info("CPU:0")["peak"] - before
    del out
    assert peak <= 4.5 * rows * dim * 4, f"peak {peak / (rows * dim * 4):.2f} x B x d float32"


class Tower(tf.Module):
    def __init__(self, seed: int):
        rng = np.random.default_rng(seed)
        self.w = tf.Variable(rng.normal(size=(6, 4)))
        self.b = tf.Variable(np.zeros(4))

    def __call__(self, x):
        return tf.tanh(x @ self.w + self.b)


class Learnable(tf.Module):
    """A loss owning its parameters, as a user would write it; ``cached_step`` finds them."""

    def __init__(self, loss: str, dense: bool, tile: int, params: dict | None = None):
        self.fn = getattr(losses, f"{loss}_dense" if dense else loss)
        self.extra = {} if dense else {"tile_size": tile}
        self.params = params or {k: tf.Variable(v, dtype=tf.float64)
                                 for k, v in default_params(loss).items()}

    def __call__(self, x, y):
        return self.fn(x, y, **self.params, **self.extra)


@pytest.mark.parametrize("loss", ["info_nce", "clip_loss", "siglip_loss"])
def test_cached_step_with_tiled_loss_equals_a_full_batch_dense_step(loss):
    rng = np.random.default_rng(0)
    rows, group = 11, (3 if loss == "info_nce" else 1)
    queries = tf.constant(rng.normal(size=(rows, 6)))
    passages = tf.constant(rng.normal(size=(rows * group, 6)))
    towers = [Tower(1), Tower(2)]
    tiled = Learnable(loss, False, tile=4)
    dense = Learnable(loss, True, tile=4, params=tiled.params)
    variables = trainable_variables(towers, tiled)  # the order of cached_step's grads
    assert len(variables) == 4 + len(tiled.params)

    @tf.function
    def cached():
        return cached_step(towers, (queries, passages), tiled, chunk_size=4)

    value, grads = cached()
    with tf.GradientTape() as tape:
        expected = dense(towers[0](queries), towers[1](passages))
    expected_grads = tape.gradient(expected, variables)
    names = [v.name + str(i) for i, v in enumerate(variables)]
    assert_same({"loss": value.numpy(), **{n: g.numpy() for n, g in zip(names, grads)}},
                {"loss": expected.numpy(), **{n: g.numpy() for n, g in zip(names, expected_grads)}},
                tolerance=1e-10)
