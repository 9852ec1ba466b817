"""The tile ops of the tiled losses derived from a few array primitives: what a backend writes.

The sweeps of :mod:`gradcache._tiled` call the 34 methods of :class:`gradcache._tiled.TileOps`. Most
of them read the same in every framework once a handful of primitives is known -- ``exp``, ``log``,
``maximum``, ``where``, ``logsumexp``, ``full``, ``arange`` -- or are Python operators that numpy,
torch, JAX and TensorFlow tensors all understand (``a @ b``, ``x[:, None]``, ``x[::step]``, ``-x``).
:class:`ArrayOps` writes them once over those primitives; a backend subclasses it, supplies the
primitives, and overrides a derived op only where its framework has a faster or more exact one.

The *way to loop* over tiles comes ready for eager backends, which loop in Python over tiles whose
last one may be smaller:

* :class:`InPlaceLoopOps` keeps each accumulator as one array updated in place through slices
  (numpy, torch);
* :class:`PerTileLoopOps` keeps it as one tensor per tile, for immutable tensors (TensorFlow eager):
  adding to a tile then replaces that tile only, where adding to a slice of one immutable tensor
  would copy the whole of it.

Compiled backends (``lax.fori_loop``, ``tf.while_loop``) write their own loop and buffer update --
``fori``, ``rows`` (a dynamic slice of static size), ``write`` -- and ``subtract_every``, since
neither framework can subtract in place from every ``step``-th row. This module must never import a
framework.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

INF = float("inf")


class ArrayOps:
    """:class:`gradcache._tiled.TileOps` from array primitives.

    A backend supplies the primitives (the methods that raise :class:`NotImplementedError` here),
    and one way to loop: inherit :class:`InPlaceLoopOps` or :class:`PerTileLoopOps`, or write
    ``fori``, ``rows``, ``write`` and ``subtract_every`` for a compiled loop (``ragged = False``).

    >>> import numpy as np
    >>> class Minimal(InPlaceLoopOps):
    ...     exp, log, log1p = staticmethod(np.exp), staticmethod(np.log), staticmethod(np.log1p)
    ...     maximum, where = staticmethod(np.maximum), staticmethod(np.where)
    ...     def logsumexp(self, x, axis): return np.log(np.exp(x).sum(axis))
    ...     def full(self, shape, fill, like): return np.full(shape, fill, like.dtype)
    ...     def arange(self, size, like): return np.arange(size)
    >>> Minimal().softplus(np.array([0.0])), Minimal().diagonal(np.zeros((2, 3)), 1, 0)
    (array([0.69314718]), array([[False,  True, False],
           [False, False,  True]]))
    """

    #: Python loops over tiles of which the last may be smaller (else: static tiles, masking).
    ragged: bool = False

    # -- primitives: every backend supplies these ------------------------------------------------
    def _missing(self, name: str) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must supply the tile op {name!r} "
                                  f"(see gradcache._tile_ops)")

    def exp(self, x: Any, /) -> Any:
        return self._missing("exp")

    def log(self, x: Any, /) -> Any:
        return self._missing("log")

    def maximum(self, a: Any, b: Any, /) -> Any:
        return self._missing("maximum")

    def where(self, condition: Any, a: Any, b: Any, /) -> Any:
        """``a`` where ``condition`` else ``b``; either may be a Python float."""
        return self._missing("where")

    def logsumexp(self, x: Any, axis: int, /) -> Any:
        """Exact for lines of ``-inf`` (the masked ones): ``-inf``, not ``nan``."""
        return self._missing("logsumexp")

    def full(self, shape: tuple, fill: float, like: Any) -> Any:
        """An array of ``shape`` holding ``fill``, of ``like``'s dtype and device."""
        return self._missing("full")

    def arange(self, size: int, like: Any) -> Any:
        """``0 .. size - 1`` as integers on ``like``'s device (``like`` may be ``None``)."""
        return self._missing("arange")

    def log1p(self, x: Any, /) -> Any:
        """Only for the default :meth:`softplus`; a backend with its own needs none."""
        return self._missing("log1p")

    # -- the way to loop: from a loop class below, or the compiled backend's own -------------------
    def fori(self, count: int, body: Callable[[Any, tuple], tuple], carry: tuple) -> tuple:
        return self._missing("fori")

    def rows(self, x: Any, start: Any, size: int) -> Any:
        return self._missing("rows")

    def write(self, buffer: Any, start: Any, value: Any) -> Any:
        return self._missing("write")

    def subtract_every(self, private: Any, step: int, value: Any, weight: float) -> Any:
        """``private`` with ``weight * value`` subtracted from rows ``0, step, 2 step, ...``;
        ``private`` is the sweep's own buffer (it may be changed in place)."""
        return self._missing("subtract_every")

    def settle(self, values: list) -> list:
        """For a lazy framework: what a Python tile loop carries after each tile, computed now,
        so that the tile's logits are freed before the next tile's exist (MLX: evaluated, and cut
        from the graph that a transform would keep alive). ``values`` are the carried arrays and
        every tile of a per-tile buffer; return them in order. Default: as they are (eager)."""
        return values

    # -- derived: override only for speed or exactness --------------------------------------------
    def abs(self, x: Any) -> Any:
        return self.maximum(x, -x)

    def isfinite(self, x: Any, /) -> Any:
        return self.abs(x) < INF  # false for nan as well

    def softplus(self, x: Any, /) -> Any:
        """``log(1 + exp(x))`` without overflow and without the thresholds some frameworks take."""
        return self.maximum(x, x * 0) + self.log1p(self.exp(-self.abs(x)))

    def sigmoid(self, x: Any, /) -> Any:
        return self.exp(-self.softplus(-x))

    def expdiff(self, a: Any, b: Any) -> Any:
        return self.exp(a - b)

    def sum(self, x: Any, axis: int | None = None) -> Any:
        return x.sum(axis=axis)

    def inner(self, a: Any, b: Any) -> Any:
        return self.sum(a * b)

    def matmul(self, a: Any, b: Any, transpose_a: bool = False, transpose_b: bool = False) -> Any:
        """``a @ b``, either transposed first (a framework whose tensors have no ``.T`` overrides
        this one method, and may spare the transposed copy: ``tf.matmul``)."""
        return (a.T if transpose_a else a) @ (b.T if transpose_b else b)

    def matmul_nt(self, a: Any, b: Any) -> Any:
        return self.matmul(a, b, transpose_b=True)

    def matmul_tn(self, a: Any, b: Any) -> Any:
        return self.matmul(a, b, transpose_a=True)

    def scalar(self, value: float, like: Any) -> Any:
        return self.full((), value, like)

    def buffer(self, rows: int, tail: tuple, fill: float, like: Any) -> Any:
        return self.full((rows, *tail), fill, like)

    def read(self, buffer: Any, start: Any, size: int) -> Any:
        return self.rows(buffer, start, size)

    def add(self, buffer: Any, start: Any, value: Any) -> Any:
        # a compiled loop updates its carried buffer in place: no copy of the whole buffer per tile
        return self.write(buffer, start, self.read(buffer, start, value.shape[0]) + value)

    def result(self, buffer: Any) -> Any:
        return buffer

    def rescale(self, private: Any, factor: Any) -> Any:
        return private * factor

    def every(self, x: Any, step: int) -> Any:
        return x[::step]

    def column(self, x: Any) -> Any:
        return x[:, None]

    def row(self, x: Any) -> Any:
        return x[None, :]

    def outer_and(self, rows: Any, columns: Any) -> Any:
        return rows[:, None] & columns[None, :]

    def diagonal(self, tile: Any, row_start: Any, column_start: Any) -> Any:
        rows, columns = tile.shape
        return ((row_start + self.arange(rows, tile))[:, None]
                == (column_start + self.arange(columns, tile))[None, :])

    def clamp_start(self, start: Any, last: int) -> Any:
        return self.where(start > last, last, start)

    def at_least(self, start: Any, size: int, low: Any) -> Any:
        return start + self.arange(size, None) >= low


class LoopOps(ArrayOps):
    """A Python loop over tiles whose last one may be smaller: what every eager backend runs."""

    ragged = True

    def fori(self, count: int, body: Callable, carry: tuple) -> tuple:
        lazy = type(self).settle is not ArrayOps.settle
        for index in range(count):
            carry = body(index, carry)
            if lazy:
                carry = _settled(self, carry)
        return carry

    def rows(self, x: Any, start: int, size: int) -> Any:
        return x[start:start + size]

    def clamp_start(self, start: int, last: int) -> int:
        return min(start, last)  # Python ints, also where a subclass loops with static tiles


class InPlaceLoopOps(LoopOps):
    """:class:`LoopOps` with accumulators updated in place through slices (numpy, torch)."""

    def write(self, buffer: Any, start: int, value: Any) -> Any:
        buffer[start:start + value.shape[0]] = value
        return buffer

    def add(self, buffer: Any, start: int, value: Any) -> Any:
        part = buffer[start:start + value.shape[0]]  # a view: += writes through to the buffer
        part += value
        return buffer

    def rescale(self, private: Any, factor: Any) -> Any:
        private *= factor  # the sweep's own buffer: no copy
        return private

    def subtract_every(self, private: Any, step: int, value: Any, weight: float) -> Any:
        part = private[::step]
        part -= weight * value
        return private


class _PerTile:
    """An accumulator of ``rows`` rows kept as one array per tile written so far (by start row);
    rows no tile wrote hold ``fill``."""

    def __init__(self, rows: int, tail: tuple, fill: float, like: Any):
        self.rows, self.tail, self.fill, self.like = rows, tuple(tail), fill, like
        self.tiles: dict[int, Any] = {}


class PerTileLoopOps(LoopOps):
    """:class:`LoopOps` for immutable tensors (TensorFlow eager): each accumulator is one tensor
    per tile, joined once at the end, so that a tile's update never copies the whole buffer. The
    backend supplies :meth:`concat`."""

    def concat(self, pieces: list) -> Any:
        """``pieces`` joined along the rows."""
        return self._missing("concat")

    def buffer(self, rows: int, tail: tuple, fill: float, like: Any) -> _PerTile:
        return _PerTile(rows, tail, fill, like)

    def read(self, buffer: _PerTile, start: int, size: int) -> Any:
        if start in buffer.tiles:
            return buffer.tiles[start]
        return self.full((size, *buffer.tail), buffer.fill, buffer.like)

    def write(self, buffer: _PerTile, start: int, value: Any) -> _PerTile:
        buffer.tiles[start] = value
        return buffer

    def add(self, buffer: _PerTile, start: int, value: Any) -> _PerTile:
        return self.write(buffer, start, self.read(buffer, start, int(value.shape[0])) + value)

    def result(self, buffer: _PerTile) -> Any:
        pieces, at = [], 0
        for start in sorted(buffer.tiles):
            if start > at:
                pieces.append(self.read(buffer, at, start - at))
            pieces.append(buffer.tiles[start])
            at = start + int(buffer.tiles[start].shape[0])
        if at < buffer.rows:
            pieces.append(self.read(buffer, at, buffer.rows - at))
        return self.concat(pieces)


def _settled(ops: ArrayOps, carry: tuple) -> tuple:
    """``carry`` with its arrays -- and the tiles of its per-tile buffers -- through
    :meth:`ArrayOps.settle` (``None`` and Python numbers are left alone)."""
    slots: list[tuple[int, Any]] = [(index, None) for index, item in enumerate(carry)
             if item is not None and not isinstance(item, (_PerTile, int, float))]
    for index, item in enumerate(carry):
        if isinstance(item, _PerTile):
            slots += [(index, start) for start in item.tiles]
    values = ops.settle([carry[index] if start is None else carry[index].tiles[start]
                         for index, start in slots])
    settled = list(carry)
    for (index, start), value in zip(slots, values):
        if start is None:
            settled[index] = value
        else:
            settled[index].tiles[start] = value
    return tuple(settled)
