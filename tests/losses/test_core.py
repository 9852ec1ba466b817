"""The framework-free tile sweeps, run on numpy against the closed-form dense summed losses.

Both ways to loop are checked here without any framework: the eager one (Python loop, a smaller
last tile) and the compiled one (static tiles, the last one moved back and its repeated rows
masked), which JAX and ``tf.function`` run.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradcache import GradCacheError, _loss_forms, _tiled
from gradcache.testing import examples
from tests.losses.common import relative_error

OPS = {"eager": _tiled.NumpyOps(), "compiled": _tiled.CompiledNumpyOps()}


def dense_summed_loss(kind: str, x: np.ndarray, y: np.ndarray, alpha: float,
                    beta: float | None) -> tuple:
    """The summed loss and its gradients with the whole logit matrix, by hand."""
    similarity = x @ y.T
    logits = alpha * similarity + (beta or 0.0)

    def lse(z: np.ndarray, axis: int) -> np.ndarray:
        top = z.max(axis=axis, keepdims=True)
        return (np.log(np.exp(z - top).sum(axis=axis, keepdims=True)) + top)

    positive = np.zeros_like(logits)  # 1 where column j is row i's positive
    positive[np.arange(len(x)), np.arange(len(x)) * (len(y) // len(x))] = 1.0
    if kind == _tiled.ROWS:
        rows = lse(logits, 1)
        value = rows.sum() - (positive * logits).sum()
        weight = np.exp(logits - rows) - positive
    elif kind == _tiled.ROWS_AND_COLUMNS:
        rows, columns = lse(logits, 1), lse(logits, 0)
        value = rows.sum() + columns.sum() - 2 * (positive * logits).sum()
        weight = np.exp(logits - rows) + np.exp(logits - columns) - 2 * positive
    else:
        labels = 2 * np.eye(len(x)) - 1
        value = np.logaddexp(0.0, -labels * logits).sum()
        weight = -labels / (1 + np.exp(labels * logits))
    return (value, alpha * weight @ y, alpha * weight.T @ x, (weight * similarity).sum(),
            weight.sum() if beta is not None else None)


@settings(max_examples=examples(150), deadline=None)
@given(kind=st.sampled_from(_tiled.KINDS), loop=st.sampled_from(sorted(OPS)),
       rows=st.integers(1, 11), group=st.integers(1, 4), dim=st.integers(1, 5),
       tile=st.integers(1, 13), seed=st.integers(0, 2**16))
def test_sweeps_equal_the_dense_summed_loss(kind, loop, rows, group, dim, tile, seed):
    # InfoNCE's y holds `group` rows per row of x; CLIP and SigLIP pair row i with column i
    columns = rows * group if kind == _tiled.ROWS else rows
    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=(rows, dim)), rng.normal(size=(columns, dim))
    alpha, beta = rng.uniform(0.2, 5.0), (rng.uniform(-3, 3) if kind == _tiled.SIGMOID else None)
    grad = rng.uniform(0.5, 2.0)
    ops = OPS[loop]
    value, row_lse, column_lse = _tiled.tiled_forward(ops, kind, x, y, alpha, beta, tile)
    got = _tiled.tiled_backward(ops, kind, x, y, alpha, beta, row_lse, column_lse, grad, tile)
    expected = dense_summed_loss(kind, x, y, alpha, beta)
    # a floor as for the gradients: a summed loss near 0 (well-separated pairs) has no relative scale
    assert relative_error(value, expected[0], floor=1.0) <= 1e-12
    for actual, want in zip(got, expected[1:]):
        if want is None:
            assert actual is None
        else:
            assert relative_error(actual, grad * want, floor=max(abs(expected[0]), 1.0)) <= 1e-12


@given(rows=st.integers(1, 40), tile=st.integers(1, 45))
def test_static_tiles_count_every_row_once(rows, tile):
    tiling = _tiled.Tiling.of(rows, tile)
    covered = np.zeros(rows, int)
    for index in range(tiling.count):
        start, size, valid = tiling.at(OPS["compiled"], index)
        assert size == tiling.tile and 0 <= start and start + size <= rows
        covered[start:start + size] += 1 if valid is None else valid
    assert (covered == 1).all()


def test_default_and_bad_tile_sizes():
    assert _tiled.check_tile_size(None) == _tiled.DEFAULT_TILE_SIZE
    for bad in (0, -3, 2.5, True, "8"):
        with pytest.raises(GradCacheError, match="tile_size must be an int"):
            _tiled.check_tile_size(bad)


class _Shapes:
    def shape(self, x):
        return x


@pytest.mark.parametrize("x, y, square, message", [
    ((4,), (4, 2), False, "two \\(batch, dim\\) matrices"),
    ((4, 3), (4, 2), False, "differ in width"),
    ((4, 2), (6, 2), False, "a multiple of 4"),
    ((4, 2), (8, 2), True, "the same number of rows"),
    ((0, 2), (0, 2), True, "empty"),
    ((None, 2), (4, 2), True, "static batch sizes"),
])
def test_shape_errors_name_the_shapes(x, y, square, message):
    with pytest.raises(GradCacheError, match=message):
        _loss_forms.check_pair(_Shapes(), x, y, "a_loss", square=square)


def test_the_loss_core_loads_no_framework():
    code = ("import sys, gradcache._tiled, gradcache._loss_forms; "
            "bad = [m for m in ('torch', 'jax', 'tensorflow', 'keras', 'mlx') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
