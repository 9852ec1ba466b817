"""The tile sweeps of the contrastive losses, written once over a tiny ops namespace.

The losses of ``gradcache_torch.losses``, ``gradcache_jax.losses`` and ``gradcache_tf.losses`` are,
up to a constant factor, *summed losses* ``S`` over the logits ``z_ij = alpha * x_i . y_j + beta``:

* ``ROWS`` (InfoNCE): ``S = sum_i logsumexp_j z_ij - sum_i z_i,pos(i)``, where ``y`` holds ``g``
  rows per row of ``x`` and ``pos(i) = i * g``
* ``ROWS_AND_COLUMNS`` (CLIP): ``S = sum_i logsumexp_j z_ij + sum_j logsumexp_i z_ij - 2 sum_i z_ii``
* ``SIGMOID`` (SigLIP): ``S = sum_ij softplus(-l_ij z_ij)``, ``l_ij = +1`` if ``i == j`` else ``-1``
  (a positive pair's ``softplus(-z_ii)`` is computed as such: written ``softplus(z_ii) - z_ii`` it
  would lose all precision when the pair is classified well)

This module computes ``S`` and its gradient one ``tile x tile`` block of logits at a time. The
forward sweep keeps online log-sum-exp statistics per row (and per column) and no graph; the
backward sweep recomputes each tile once and accumulates ``dS/dx``, ``dS/dy`` and ``dS/dbeta``; the
positive pairs are ``O(B·d)`` updates of those, and ``dS/dalpha`` follows from ``dS/dx`` with no
further pass. Working memory is ``O((B + tile)·d + tile²)``. The two sweeps run inside each
backend's own custom-gradient function (:meth:`gradcache._loss_forms.LossOps.tiled_sum`).

The sweeps are written against :class:`TileOps`: the array operations, and the *way to loop*. A
backend derives it from :class:`gradcache._tile_ops.ArrayOps`, which writes most of the operations
once over a dozen array primitives the backend supplies. Eager backends (numpy, torch, TensorFlow
eager) loop in Python over tiles whose last one may be smaller (``ragged``), with the loops and
buffers of that module. Compiled backends (``lax.fori_loop``, ``tf.while_loop``) need one static
tile shape: the last tile is then moved back to end at the last row (its start is clamped) and the
rows an earlier tile already covered are masked out, so that the loop body is traced once whatever
the batch size. This module must never import a framework; it
uses numpy only for :class:`NumpyOps`, the reference that the tests run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from gradcache._errors import GradCacheError
from gradcache._tile_ops import InPlaceLoopOps

ROWS = "rows"
ROWS_AND_COLUMNS = "rows_and_columns"
SIGMOID = "sigmoid"
KINDS = (ROWS, ROWS_AND_COLUMNS, SIGMOID)

#: Rows (and columns) per tile when the caller gives no ``tile_size``: a float32 tile of logits is
#: 1 MiB, small next to the representations at any batch worth tiling, and large enough for the
#: matrix products to run at full speed (see ``benchmarks/bench_losses.py``).
DEFAULT_TILE_SIZE = 512

NEG_INF = float("-inf")


class TileOps(Protocol):
    """What the sweeps need from a framework. ``start`` and loop indices are Python ints when
    :attr:`ragged` is true and may be traced integers otherwise. A backend writes few of these:
    :class:`gradcache._tile_ops.ArrayOps` derives the rest."""

    #: Python loops over tiles of which the last may be smaller (else: static tiles, masking).
    ragged: bool

    def fori(self, count: int, body: Callable[[Any, tuple], tuple], carry: tuple) -> tuple: ...
    def rows(self, x: Any, start: Any, size: int) -> Any: ...
    def full(self, shape: tuple, fill: float, like: Any) -> Any: ...
    def buffer(self, rows: int, tail: tuple, fill: float, like: Any) -> Any: ...
    def read(self, buffer: Any, start: Any, size: int) -> Any: ...
    def write(self, buffer: Any, start: Any, value: Any) -> Any: ...
    def add(self, buffer: Any, start: Any, value: Any) -> Any: ...
    def result(self, buffer: Any) -> Any: ...
    def scalar(self, value: float, like: Any) -> Any: ...
    def rescale(self, private: Any, factor: Any) -> Any: ...
    def matmul_nt(self, a: Any, b: Any) -> Any: ...
    def matmul(self, a: Any, b: Any) -> Any: ...
    def matmul_tn(self, a: Any, b: Any) -> Any: ...
    def exp(self, x: Any, /) -> Any: ...
    def log(self, x: Any, /) -> Any: ...
    def log1p(self, x: Any, /) -> Any: ...
    def abs(self, x: Any) -> Any: ...
    def sigmoid(self, x: Any, /) -> Any: ...
    def softplus(self, x: Any, /) -> Any: ...
    def expdiff(self, a: Any, b: Any) -> Any: ...
    def inner(self, a: Any, b: Any) -> Any: ...
    def every(self, x: Any, step: int) -> Any: ...
    def subtract_every(self, private: Any, step: int, value: Any, weight: float) -> Any: ...
    def diagonal(self, tile: Any, row_start: Any, column_start: Any) -> Any: ...
    def maximum(self, a: Any, b: Any, /) -> Any: ...
    def where(self, condition: Any, a: Any, b: Any, /) -> Any: ...
    def isfinite(self, x: Any, /) -> Any: ...
    def sum(self, x: Any, axis: int | None = None) -> Any: ...
    def logsumexp(self, x: Any, axis: int, /) -> Any: ...
    def clamp_start(self, start: Any, last: int) -> Any: ...
    def at_least(self, start: Any, size: int, low: Any) -> Any: ...
    def outer_and(self, rows: Any, columns: Any) -> Any: ...
    def column(self, x: Any) -> Any: ...
    def row(self, x: Any) -> Any: ...


@dataclass(frozen=True)
class Tiling:
    """How ``count`` tiles of ``tile`` rows cover ``n`` rows.

    >>> Tiling.of(10, 4)
    Tiling(n=10, tile=4, count=3)
    >>> Tiling.of(3, 512).tile   # never larger than the batch
    3
    """

    n: int
    tile: int
    count: int

    @classmethod
    def of(cls, n: int, tile: int) -> Tiling:
        tile = min(tile, n)
        return cls(n, tile, -(-n // tile))

    @property
    def exact(self) -> bool:
        return self.n % self.tile == 0

    def at(self, ops: TileOps, index: Any) -> tuple[Any, int, Any]:
        """``(start, size, valid)`` of tile ``index``; ``valid`` masks the rows an earlier tile
        covered (``None`` when none did)."""
        if ops.ragged:
            start = index * self.tile
            return start, min(self.tile, self.n - start), None
        if self.exact:
            return index * self.tile, self.tile, None
        # The last tile ends at row n: it starts earlier, and the rows before index * tile are
        # already counted. One static shape for every tile keeps the compiled loop body single.
        start = ops.clamp_start(index * self.tile, self.n - self.tile)
        return start, self.tile, ops.at_least(start, self.tile, index * self.tile)


#: The default on an accelerator: each tile is a few kernel launches, so fewer, larger tiles.
DEFAULT_ACCELERATOR_TILE_SIZE = 4096


def check_tile_size(tile_size: Any, *, accelerator: bool = False) -> int:
    """The tile size to use: ``tile_size``, or the default for the device when ``None``.

    >>> check_tile_size(None), check_tile_size(None, accelerator=True), check_tile_size(64)
    (512, 4096, 64)
    """
    if tile_size is None:
        return DEFAULT_ACCELERATOR_TILE_SIZE if accelerator else DEFAULT_TILE_SIZE
    if isinstance(tile_size, bool) or not isinstance(tile_size, (int, np.integer)) or tile_size < 1:
        raise GradCacheError(f"tile_size must be an int >= 1 or None, got {tile_size!r}")
    return int(tile_size)


def _mask(ops: TileOps, row_valid: Any, column_valid: Any) -> Any:
    if row_valid is None and column_valid is None:
        return None
    if row_valid is None:
        return ops.row(column_valid)
    if column_valid is None:
        return ops.column(row_valid)
    return ops.outer_and(row_valid, column_valid)


def _masked(ops: TileOps, mask: Any, values: Any, fill: Any) -> Any:
    return values if mask is None else ops.where(mask, values, fill)


def _diagonal(ops: TileOps, tile: Any, row_start: Any, column_start: Any, masks: dict) -> Any:
    """Where ``tile`` holds positive pairs (global row == global column), or ``None`` if nowhere.

    Known in Python on ragged loops: most tiles are off the diagonal and need no mask, and the mask
    of one depends only on its shape and ``row_start - column_start``, so a sweep makes each once
    (in ``masks``) rather than comparing two ranges per tile."""
    rows, columns = tile.shape[0], tile.shape[1]
    if not ops.ragged:
        return ops.diagonal(tile, row_start, column_start)
    if row_start >= column_start + columns or column_start >= row_start + rows:
        return None
    key = (rows, columns, row_start - column_start)
    if key not in masks:
        masks[key] = ops.diagonal(tile, row_start, column_start)
    return masks[key]


def logaddexp(ops: TileOps, a: Any, b: Any) -> Any:
    """``log(exp(a) + exp(b))`` elementwise, exact when one or both sides are ``-inf``."""
    top = ops.maximum(a, b)
    shift = ops.where(ops.isfinite(top), top, top * 0)
    return shift + ops.log(ops.exp(a - shift) + ops.exp(b - shift))


def _logits(ops: TileOps, x_scaled: Any, y_tile: Any, beta: Any) -> Any:
    # alpha is folded into the row tile (tile x d) rather than into the logits (tile x tile)
    logits = ops.matmul_nt(x_scaled, y_tile)
    return logits if beta is None else logits + beta


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown loss kind {kind!r}; one of {KINDS}")


def _positives(kind: str, x: Any, y: Any, group: int | None = None) -> tuple[int, float]:
    """``(g, w)``: the positive of row ``i`` is column ``i * g``, and ``S`` holds ``-w z_i,ig``."""
    if kind == ROWS:
        return (y.shape[0] // x.shape[0] if group is None else group), 1.0
    return 1, (2.0 if kind == ROWS_AND_COLUMNS else 0.0)


def _own_positives(ops: TileOps, x: Any, y: Any, step: int, offset: Any) -> Any:
    """Rows ``(offset + i) * step`` of ``y`` for the rows ``i`` of ``x``: their positives."""
    every = ops.every(y, step)
    return every if offset is None else ops.rows(every, offset, x.shape[0])


def _start(offset: Any, row_start: Any) -> Any:
    return row_start if offset is None else offset + row_start


def tiled_forward(ops: TileOps, kind: str, x: Any, y: Any, alpha: Any, beta: Any,
                      tile: int, *, offset: Any = None, group: int | None = None,
                      column_term: bool = True) -> tuple[Any, Any, Any]:
    """The summed loss ``S`` of ``kind`` and the statistics its backward sweep needs.

    On one rank of several (:func:`gradcache._loss_forms.forward_across`), ``x`` holds this rank's
    rows only, the first being row ``offset`` of the global batch, and ``y`` every column: the
    result is then this rank's share of ``S`` (its rows' terms), and for ``ROWS_AND_COLUMNS`` the
    column statistics are *partial* (over this rank's rows), to be combined across ranks; with
    ``column_term=False`` the value leaves out their sum.

    Args:
        ops: the framework's :class:`TileOps`.
        kind: :data:`ROWS`, :data:`ROWS_AND_COLUMNS` or :data:`SIGMOID`.
        x: ``(n, d)`` row representations.
        y: ``(m, d)`` column representations.
        alpha: the scalar multiplying every similarity.
        beta: the scalar added to every logit (``None`` for none).
        tile: rows and columns per tile.
        offset: the global index of the first row of ``x`` when ``x`` is one rank's rows (``None``:
            the whole batch). The positive of row ``i`` is column ``(offset + i) * group``.
        group: columns per row (InfoNCE's ``k + 1``); by default ``y``'s rows over ``x``'s.
        column_term: whether the value of ``ROWS_AND_COLUMNS`` includes ``sum_j column_lse_j``.

    Returns:
        ``(value, row_lse, column_lse)``: ``S`` and the per-row / per-column log-sum-exp (``None``
        where ``kind`` needs none).

    >>> import numpy as np
    >>> x, y = np.eye(3), np.eye(3)
    >>> value, rows, _ = tiled_forward(NumpyOps(), ROWS, x, y, 1.0, None, tile=2)
    >>> bool(np.allclose(rows, np.log(np.e + 2))), bool(np.isclose(value, 3 * np.log(np.e + 2) - 3))
    (True, True)
    """
    _check_kind(kind)
    row_tiles, column_tiles = Tiling.of(x.shape[0], tile), Tiling.of(y.shape[0], tile)
    columns_too = kind == ROWS_AND_COLUMNS
    zero = ops.scalar(0.0, x)
    # the fill of masked logits (only static tiles mask), a tensor: some frameworks' where takes no
    # Python float beside a tensor of another dtype
    neg_inf = None if ops.ragged else ops.scalar(NEG_INF, x)
    masks: dict = {}  # the positive pairs' masks, by tile shape and diagonal
    row_lse = ops.buffer(row_tiles.n, (), NEG_INF, x) if kind != SIGMOID else zero
    column_lse = ops.buffer(column_tiles.n, (), NEG_INF, x) if columns_too else zero

    def row_step(i: Any, carry: tuple) -> tuple:
        row_lse, column_lse, total = carry
        row_start, row_size, row_valid = row_tiles.at(ops, i)
        x_scaled = ops.rows(x, row_start, row_size) * alpha

        def column_step(j: Any, inner: tuple) -> tuple:
            acc, column_lse, total = inner
            column_start, column_size, column_valid = column_tiles.at(ops, j)
            logits = _logits(ops, x_scaled, ops.rows(y, column_start, column_size), beta)
            if kind == SIGMOID:
                both = _mask(ops, row_valid, column_valid)
                positive = _diagonal(ops, logits, _start(offset, row_start), column_start, masks)
                signed = logits if positive is None else ops.where(positive, -logits, logits)
                terms = _masked(ops, both, ops.softplus(signed), zero)
                return acc, column_lse, total + ops.sum(terms)
            # Rows an earlier row tile covered keep their full row statistic (recomputed equal);
            # only columns an earlier column tile covered must not count twice in it.
            by_row = _masked(ops, _mask(ops, None, column_valid), logits, neg_inf)
            acc = logaddexp(ops, acc, ops.logsumexp(by_row, 1))
            if columns_too:
                by_column = _masked(ops, _mask(ops, row_valid, None), by_row, neg_inf)
                old = ops.read(column_lse, column_start, column_size)
                column_lse = ops.write(column_lse, column_start,
                                       logaddexp(ops, old, ops.logsumexp(by_column, 0)))
            return acc, column_lse, total

        acc = ops.full((row_size,), NEG_INF, x) if kind != SIGMOID else zero
        acc, column_lse, total = ops.fori(column_tiles.count, column_step, (acc, column_lse, total))
        if kind != SIGMOID:
            row_lse = ops.write(row_lse, row_start, acc)
        return row_lse, column_lse, total

    row_lse, column_lse, total = ops.fori(row_tiles.count, row_step, (row_lse, column_lse, zero))
    if kind == SIGMOID:
        return total, None, None
    row_lse = ops.result(row_lse)
    step, weight = _positives(kind, x, y, group)
    value = ops.sum(row_lse) - weight * alpha * ops.inner(x, _own_positives(ops, x, y, step, offset))
    if columns_too:
        column_lse = ops.result(column_lse)
        return (value + ops.sum(column_lse) if column_term else value), row_lse, column_lse
    return value, row_lse, None


def tiled_backward(ops: TileOps, kind: str, x: Any, y: Any, alpha: Any, beta: Any,
                       row_lse: Any, column_lse: Any, grad: Any,
                       tile: int, *, offset: Any = None,
                       group: int | None = None) -> tuple[Any, Any, Any, Any]:
    """Gradients of ``grad * S`` with respect to ``x``, ``y``, ``alpha`` and ``beta``.

    Each tile's logits are recomputed once; ``dS/dz`` of the tile is the row softmax (``ROWS``),
    the row plus the column softmax (``ROWS_AND_COLUMNS``) or the signed sigmoid (``SIGMOID``) of
    the logits, from the statistics of :func:`tiled_forward`; the positive pairs' ``-w`` follows.

    With an ``offset`` (``x`` is one rank's rows, see :func:`tiled_forward`; ``column_lse`` must
    then be the *global* column statistic), ``dx`` is complete, while ``dy``, ``dalpha`` and
    ``dbeta`` are this rank's rows' shares, to be summed over ranks; ``dy`` then leaves out the
    positive pairs' term, which falls in this rank's own rows of ``y`` and is subtracted from
    their sum by :func:`subtract_own_positives` (some backends cannot add at any row offset).

    Returns:
        ``(dx, dy, dalpha, dbeta)``; ``dbeta`` is ``None`` when ``beta`` is.

    >>> import numpy as np
    >>> x, y = np.eye(2), np.eye(2)
    >>> _, rows, _ = tiled_forward(NumpyOps(), ROWS, x, y, 1.0, None, tile=1)
    >>> dx, dy, dalpha, _ = tiled_backward(NumpyOps(), ROWS, x, y, 1.0, None, rows, None, 1.0, 1)
    >>> dx.shape, dy.shape
    ((2, 2), (2, 2))
    """
    _check_kind(kind)
    row_tiles, column_tiles = Tiling.of(x.shape[0], tile), Tiling.of(y.shape[0], tile)
    zero = ops.scalar(0.0, x)
    dx = ops.buffer(row_tiles.n, tuple(x.shape[1:]), 0.0, x)
    dy = ops.buffer(column_tiles.n, tuple(y.shape[1:]), 0.0, y)
    masks: dict = {}  # the positive pairs' masks, by tile shape and diagonal

    def row_step(i: Any, carry: tuple) -> tuple:
        dx, dy, dbeta = carry
        row_start, row_size, row_valid = row_tiles.at(ops, i)
        x_tile = ops.rows(x, row_start, row_size)
        x_scaled = x_tile * alpha
        row_stat = None if kind == SIGMOID else ops.column(ops.rows(row_lse, row_start, row_size))

        def column_step(j: Any, inner: tuple) -> tuple:
            dx_tile, dy, dbeta = inner
            column_start, column_size, column_valid = column_tiles.at(ops, j)
            y_tile = ops.rows(y, column_start, column_size)
            logits = _logits(ops, x_scaled, y_tile, beta)
            if kind == SIGMOID:
                # d softplus(-l z) / dz = -l sigmoid(-l z): sigmoid(z) off the diagonal, -sigmoid(-z) on it
                positive = _diagonal(ops, logits, _start(offset, row_start), column_start, masks)
                if positive is None:
                    weight = ops.sigmoid(logits)
                else:
                    flipped = ops.sigmoid(ops.where(positive, -logits, logits))
                    weight = ops.where(positive, -flipped, flipped)
            else:
                weight = ops.expdiff(logits, row_stat)
                if kind == ROWS_AND_COLUMNS:
                    column_stat = ops.row(ops.rows(column_lse, column_start, column_size))
                    weight = weight + ops.expdiff(logits, column_stat)
            weight = _masked(ops, _mask(ops, row_valid, column_valid), weight, zero)
            dx_tile = dx_tile + ops.matmul(weight, y_tile)
            dy = ops.add(dy, column_start, ops.matmul_tn(weight, x_tile))
            if beta is not None:
                dbeta = dbeta + ops.sum(weight)
            return dx_tile, dy, dbeta

        dx_tile = ops.full((row_size,) + tuple(x.shape[1:]), 0.0, x)
        dx_tile, dy, dbeta = ops.fori(column_tiles.count, column_step, (dx_tile, dy, dbeta))
        return ops.add(dx, row_start, dx_tile), dy, dbeta

    dx, dy, dbeta = ops.fori(row_tiles.count, row_step, (dx, dy, zero))
    dx, dy = ops.result(dx), ops.result(dy)
    step, weight = _positives(kind, x, y, group)
    if weight:
        # the positive pairs' -w z_i,ig, in place on the sweep's own buffers: no B x d temporary
        dx = ops.subtract_every(dx, 1, _own_positives(ops, x, y, step, offset), weight)
        if offset is None:
            dy = ops.subtract_every(dy, step, x, weight)
        # else: they fall in this rank's own rows of y, see subtract_own_positives
    # sum_ij dz_ij (x_i . y_j) = sum_i x_i . (dz y)_i: dalpha from the unscaled dx, with no pass
    # over the tiles; then dx and dy take their common factor, in place where the framework allows.
    dalpha = ops.inner(x, dx) * grad
    factor = grad * alpha
    dx, dy = ops.rescale(dx, factor), ops.rescale(dy, factor)
    return dx, dy, dalpha, None if beta is None else dbeta * grad


def subtract_own_positives(ops: TileOps, kind: str, x: Any, dy_own: Any, factor: Any,
                           group: int) -> Any:
    """The positive pairs' term of ``grad * dS/dy`` on the rank holding them.

    ``dy_own`` is the summed ``dy`` of :func:`tiled_backward` (given an ``offset``) restricted to
    this rank's own rows of ``y`` (``group`` per row of ``x``), ``factor`` the ``grad * alpha`` that
    scaled it.

    >>> x = np.ones((2, 1))
    >>> subtract_own_positives(NumpyOps(), ROWS, x, np.zeros((4, 1)), 0.5, group=2).ravel()
    array([-0.5,  0. , -0.5,  0. ])
    """
    step, weight = _positives(kind, x, dy_own, group)
    return ops.subtract_every(dy_own, step, x * factor, weight) if weight else dy_own


class NumpyOps(InPlaceLoopOps):
    """:class:`TileOps` over numpy, looping in Python: the reference the other backends match.

    >>> NumpyOps().logsumexp(np.zeros((2, 4)), 1)
    array([1.38629436, 1.38629436])
    """

    exp = staticmethod(np.exp)
    log = staticmethod(np.log)
    log1p = staticmethod(np.log1p)
    maximum = staticmethod(np.maximum)
    where = staticmethod(np.where)

    def logsumexp(self, x: Any, axis: int) -> Any:
        top = np.max(x, axis=axis, keepdims=True)
        top = np.where(np.isfinite(top), top, 0.0)
        with np.errstate(divide="ignore"):  # a masked-out line: log(0) = -inf is the answer
            out = np.log(np.sum(np.exp(x - top), axis=axis, keepdims=True)) + top
        return np.squeeze(out, axis=axis)

    def full(self, shape: tuple, fill: float, like: Any) -> Any:
        return np.full(shape, fill, dtype=like.dtype)

    def arange(self, size: int, like: Any) -> Any:
        return np.arange(size)


class CompiledNumpyOps(NumpyOps):
    """:class:`NumpyOps` with static tiles, clamped last tiles and masks: what the compiled
    backends run, checked here without a compiler.

    >>> CompiledNumpyOps().ragged
    False
    """

    ragged = False
