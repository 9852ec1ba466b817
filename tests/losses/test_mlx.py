"""Tiled losses in MLX: equal to the dense ones, alone and as the loss of ``cached_step``, in
memory that does not hold the dense matrix of logits."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings

from gradcache import GradCacheError
from gradcache.testing import examples
from tests.losses.common import Case, assert_same, cases, check_drawn, default_params

mx = pytest.importorskip("mlx.core")
import mlx.nn as nn  # noqa: E402

from gradcache_mlx import cached_step, losses  # noqa: E402


def evaluate(case: Case, dense: bool, dtype=mx.float64) -> dict:
    """Value and every gradient (representations and parameters), as numpy."""
    x, y = (mx.array(a, dtype=dtype) for a in case.data())
    params = {k: mx.array(v, dtype=dtype) for k, v in case.params.items()}
    fn = getattr(losses, f"{case.loss}_dense" if dense else case.loss)
    extra = {} if dense else {"tile_size": case.tile}
    value, (dx, dy, dparams) = mx.value_and_grad(
        lambda x, y, params: fn(x, y, similarity=case.similarity, **params, **extra),
        argnums=(0, 1, 2))(x, y, params)
    return {"loss": np.array(value), "x": np.array(dx), "y": np.array(dy),
            **{k: np.array(v) for k, v in dparams.items()}}


@settings(max_examples=examples(40), deadline=None)
@given(case=cases())
def test_tiled_equals_dense(case):
    check_drawn(evaluate(case, dense=False), evaluate(case, dense=True))


@pytest.mark.parametrize("loss", ["info_nce", "clip_loss", "siglip_loss"])
def test_float32_and_fixed_parameters(loss):
    case = Case(loss, rows=37, negatives=2 if loss == "info_nce" else 0, dim=16, tile=8,
                similarity="cosine", params=default_params(loss), seed=3)
    tiled, dense = evaluate(case, False, mx.float32), evaluate(case, True, mx.float32)
    assert_same(tiled, dense, tolerance=1e-5)
    x, y = (mx.array(a) for a in case.data())
    fixed = getattr(losses, loss)(x, y, tile_size=8, similarity="cosine", **default_params(loss))
    assert fixed.dtype == mx.float32
    assert abs(fixed.item() - float(dense["loss"])) <= 1e-5 * abs(float(dense["loss"]))


def test_half_precision_inputs_are_computed_in_float32():
    x, y = mx.random.normal((9, 8)).astype(mx.bfloat16), mx.random.normal((9, 8))
    loss, grad = mx.value_and_grad(lambda x: losses.clip_loss(x, y, tile_size=4))(x)
    assert loss.dtype == mx.float32 and grad.dtype == mx.bfloat16


class Towers(nn.Module):
    """Two towers and the loss's own parameters: what ``nn.value_and_grad`` differentiates."""

    def __init__(self, loss: str):
        super().__init__()
        self.query, self.passage = nn.Linear(6, 4), nn.Linear(6, 4)
        self.loss_params = {k: mx.array(v) for k, v in default_params(loss).items()}
        self.set_dtype(mx.float64)


@pytest.mark.parametrize("loss", ["info_nce", "clip_loss", "siglip_loss"])
def test_cached_step_with_tiled_loss_equals_a_full_batch_dense_step(loss):
    rng = np.random.default_rng(0)
    rows, group = 11, (3 if loss == "info_nce" else 1)
    queries = mx.array(rng.normal(size=(rows, 6)), dtype=mx.float64)
    passages = mx.array(rng.normal(size=(rows * group, 6)), dtype=mx.float64)
    model = Towers(loss)
    tiled, dense = getattr(losses, loss), getattr(losses, f"{loss}_dense")
    value, grads = cached_step(
        [model.query, model.passage], (queries, passages),
        lambda q, p: tiled(mx.tanh(q), mx.tanh(p), tile_size=4, **model.loss_params),
        chunk_size=4, model=model)
    expected, expected_grads = nn.value_and_grad(model, lambda: dense(
        mx.tanh(model.query(queries)), mx.tanh(model.passage(passages)), **model.loss_params))()
    from mlx.utils import tree_flatten
    assert_same({"loss": np.array(value), **{k: np.array(v) for k, v in tree_flatten(grads)}},
                {"loss": np.array(expected),
                 **{k: np.array(v) for k, v in tree_flatten(expected_grads)}}, tolerance=1e-10)


def test_memory_holds_tiles_not_the_dense_matrix():
    rows = 2048   # a dense float32 matrix of logits and its gradient: 32 MiB
    x, y = mx.random.normal((rows, 16)), mx.random.normal((rows, 16))
    mx.eval(x, y)

    def peak(fn):
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        mx.eval(mx.value_and_grad(fn, argnums=(0, 1))(x, y))
        return mx.get_peak_memory() - base

    tiled = peak(lambda x, y: losses.info_nce(x, y, tile_size=256))
    dense = peak(lambda x, y: losses.info_nce_dense(x, y))
    assert dense >= 2 * rows * rows * 4
    assert tiled <= dense / 4, (tiled, dense)


def test_the_tiled_loss_compiles():
    x, y = mx.random.normal((10, 4)), mx.random.normal((10, 4))
    compiled = mx.compile(lambda x, y: losses.clip_loss(x, y, tile_size=3))
    assert abs(compiled(x, y).item() - losses.clip_loss_dense(x, y).item()) <= 1e-5


def test_across_ranks_says_there_is_no_distributed_step():
    fn = losses.across_ranks(losses.info_nce, temperature=0.1)
    with pytest.raises(GradCacheError, match="no distributed step"):
        fn(mx.ones((2, 2)), mx.ones((2, 2)))


def test_a_temperature_must_be_a_scalar():
    with pytest.raises(GradCacheError, match="scalar"):
        losses.info_nce(mx.ones((2, 2)), mx.ones((2, 2)), temperature=mx.ones((2,)))
