"""The contrastive losses assembled once, over the few differentiable ops a backend supplies.

Each loss is a constant times its summed loss ``S`` (:mod:`gradcache._tiled`), which
:meth:`LossOps.tiled_sum` computes inside the backend's own custom-gradient function. Around it, only ``O(B·d)`` work is left to the
framework's autodiff: the cosine normalisation and turning the temperature into the logits' scale.
A learnable temperature, logit scale or bias therefore gets its gradient from the framework,
exactly once, through the scalar it became. The dense references are written here too, over the
framework's own cross-entropy and log-sigmoid. This module also checks shapes and arguments, so
that every backend words its errors alike; :mod:`gradcache._loss_api` makes the public functions
from it. It must never import a framework.

**Across ranks.** Given a :class:`gradcache.Collective`, each loss is one rank's part of the loss of
the *global* batch (every rank's rows concatenated in rank order): :func:`forward_across` gathers
the columns ``y`` (one all-gather of ``B x d``), sweeps this rank's rows ``x`` against all of them
and sums the per-rank values; :func:`backward_across` sweeps them again, keeps ``dx`` of its own rows
and sends every column's share of ``dy`` to its owner (one reduce-scatter of ``B x d``). The rest is
scalars, and for CLIP one ``B``-vector per rank: the per-column log-sum-exp over each rank's rows,
gathered and combined so that the column term is the global one and is counted once.
:meth:`LossOps.tiled_sum` given a collective runs the two inside the backend's custom-gradient
function (through :func:`summed_forward` and :func:`summed_backward`).
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from gradcache._collective import Collective
from gradcache._errors import GradCacheError
from gradcache._tile_ops import ArrayOps
from gradcache._tiled import (
    ROWS,
    ROWS_AND_COLUMNS,
    SIGMOID,
    TileOps,
    check_tile_size,
    subtract_own_positives,
    tiled_backward,
    tiled_forward,
)

SIMILARITIES = ("dot", "cosine")

#: Initial values of the losses' parameters in the papers that introduced them: the temperature of
#: sentence-transformers' multiple-negatives ranking loss (scale 20), CLIP's 1/0.07 and SigLIP's
#: ``t = 10, b = -10``.
DEFAULT_TEMPERATURE = 0.05
DEFAULT_CLIP_SCALE = 1 / 0.07
DEFAULT_SIGLIP_SCALE = 10.0
DEFAULT_SIGLIP_BIAS = -10.0


class LossOps(ArrayOps):
    """Every op of the losses, tile ops included: what a backend's ``losses.py`` subclasses.

    The tile ops are :class:`gradcache._tile_ops.ArrayOps` (a backend adds its way to loop). Around
    them the assembly needs a few differentiable ops, which the backend's autodiff sees; of those a
    backend supplies the ones that raise here -- :meth:`custom_gradient`, :meth:`prepare`,
    :meth:`as_scalar`, :meth:`normalize`, :meth:`on_accelerator`, and for the dense references
    :meth:`cross_entropy` and :meth:`sigmoid_loss` over the framework's own functions (so that
    they check the tiled losses independently). The rest are written here once.
    """

    def tiled_sum(self, kind: str, x: Any, y: Any, alpha: Any, beta: Any, tile: int,
                  collective: Collective | None = None, layout: RankLayout | None = None) -> Any:
        """The summed loss ``S``: :meth:`custom_gradient` over :func:`summed_forward` and
        :func:`summed_backward` (across ranks when a ``collective`` is given)."""

        def forward(x: Any, y: Any, alpha: Any, beta: Any) -> tuple[Any, tuple]:
            return summed_forward(self.sweep_ops(collective), kind, x, y, alpha, beta, tile,
                                  collective, _current(layout, collective))

        def backward(saved: tuple, grad: Any) -> tuple[Any, Any, Any, Any]:
            return summed_backward(self.sweep_ops(collective), kind, saved, grad, tile, collective,
                                   _current(layout, collective))

        return self.custom_gradient(forward, backward, (x, y, alpha, beta))

    def custom_gradient(self, forward: Callable, backward: Callable, inputs: tuple) -> Any:
        """``forward(*inputs)[0]``, differentiated by the framework through ``backward``.

        ``forward`` returns ``(value, saved)``, ``saved`` a tuple of tensors or ``None``s;
        ``backward(saved, grad)`` returns one gradient per input (``None`` for an input that is
        ``None``). The framework's custom-gradient function: ``torch.autograd.Function``,
        ``jax.custom_vjp``, ``tf.custom_gradient``. Each rule is called where the framework runs
        it (traced, eagerly), and so decides its tile loop there (:meth:`sweep_ops`)."""
        return self._missing("custom_gradient")

    def sweep_ops(self, collective: Collective | None) -> Any:
        """The :class:`gradcache._tiled.TileOps` the sweeps run with, where they run (``self``;
        TensorFlow picks its eager or its graph loop, JAX types a mesh axis's carries)."""
        return self

    def shape(self, x: Any) -> tuple:
        try:
            return tuple(np.shape(x))  # a tensor's own .shape; a nested list as an array's
        except ValueError:  # a graph tensor of unknown rank: check_pair names it
            return ()

    def prepare(self, x: Any) -> Any:
        """``x`` as the framework's tensor, in float32 if it is in half precision (fp16/bf16
        logits would lose the log-sum-exp; autodiff casts the gradient back)."""
        return self._missing("prepare")

    def as_scalar(self, value: Any, like: Any) -> Any:
        """A Python number or a scalar tensor as a 0-d tensor of ``like``'s dtype (and device)."""
        return self._missing("as_scalar")

    def normalize(self, x: Any) -> Any:
        """Each row of ``x`` over its L2 norm."""
        return self._missing("normalize")

    def on_accelerator(self, x: Any) -> bool:
        """Whether ``x`` lives on an accelerator (which picks the default tile size)."""
        return self._missing("on_accelerator")

    # only for the dense references, which the framework differentiates as written
    def transpose(self, x: Any) -> Any:
        return x.T

    def cross_entropy(self, logits: Any, step: int) -> Any:
        """``mean_i -log softmax(logits_i)[i * step]``: row ``i``'s label is column ``i * step``."""
        return self._missing("cross_entropy")

    def sigmoid_loss(self, logits: Any) -> Any:
        """``sum_ij -log sigmoid(l_ij logits_ij)``, ``l = +1`` on the diagonal, ``-1`` elsewhere."""
        return self._missing("sigmoid_loss")


def _current(layout: RankLayout | None, collective: Collective | None) -> RankLayout | None:
    """``layout`` with its offset taken again from ``collective.rank`` where it is traced (an SPMD
    rank): a custom-gradient rule may not close over a value traced outside it (``jax.custom_vjp``),
    so each rule takes it where it runs."""
    if layout is None or isinstance(layout.offset, int) or collective is None:
        return layout
    return RankLayout(layout.counts, layout.group, collective.rank * layout.counts[0])


@dataclass(frozen=True)
class RankLayout:
    """How the global batch is split among ranks, from one rank's point of view.

    ``x`` rows ``counts[r]`` on rank ``r`` and ``y`` ``group`` rows per row of ``x``; this rank's
    first row of ``x`` is row ``offset`` of the global batch (a traced integer on SPMD engines).

    >>> layout = RankLayout(counts=(3, 5), group=2, offset=3)
    >>> layout.total, layout.column_counts
    (8, (6, 10))
    """

    counts: tuple[int, ...]
    group: int
    offset: Any

    @property
    def total(self) -> int:
        return sum(self.counts)

    @property
    def column_counts(self) -> tuple[int, ...]:
        return tuple(count * self.group for count in self.counts)


class _HasShape(Protocol):
    """All :func:`check_pair` needs of a :class:`LossOps`."""

    def shape(self, x: Any) -> Any: ...


class _Shapes:
    def shape(self, x: Any) -> Any:
        return x


def check_pair(ops: _HasShape, x: Any, y: Any, loss: str, *, square: bool) -> tuple[int, int]:
    """``(rows of x, rows of y)``, or a GradCacheError naming the shapes.

    >>> class Shapes:
    ...     def shape(self, x): return x
    >>> check_pair(Shapes(), (4, 8), (12, 8), "info_nce", square=False)
    (4, 12)
    """
    x_shape, y_shape = tuple(ops.shape(x)), tuple(ops.shape(y))
    if len(x_shape) != 2 or len(y_shape) != 2:
        raise GradCacheError(f"{loss} takes two (batch, dim) matrices, got shapes {x_shape} and "
                             f"{y_shape}")
    if x_shape[1] != y_shape[1]:
        raise GradCacheError(f"{loss}: the representations differ in width: {x_shape} and {y_shape}")
    if None in x_shape[:1] + y_shape[:1]:
        raise GradCacheError(f"{loss} needs static batch sizes (tiles are planned when traced), got "
                             f"shapes {x_shape} and {y_shape}")
    n, m = x_shape[0], y_shape[0]
    if n == 0:
        raise GradCacheError(f"{loss}: the batch is empty ({x_shape})")
    if m == 0:
        raise GradCacheError(f"{loss}: there are no passages to score the queries against "
                             f"({y_shape}, for queries {x_shape}); pass at least the positives")
    if square and m != n:
        raise GradCacheError(f"{loss} pairs row i of x with row i of y, so both need the same number "
                             f"of rows; got {x_shape} and {y_shape}")
    if not square and m % n:
        raise GradCacheError(
            f"{loss}: passages {y_shape} must hold the same number of rows for every query "
            f"{x_shape} (positive first, then its hard negatives), so a multiple of {n}")
    return n, m


#: the scalar arguments of the losses and whether each must be positive: a temperature or a scale
#: of 0 makes every logit infinite or 0, a negative one turns the objective around (positives
#: pushed apart); a bias may be any number
SCALARS = {"temperature": True, "logit_scale": True, "logit_bias": False}


def check_scalar(value: Any, name: str, loss: str) -> None:
    """Refuses a temperature, scale or bias given as a number (Python or numpy) that would make
    the loss NaN or meaningless -- non-finite, or for a temperature or scale not positive -- with
    a GradCacheError naming it, before anything is computed. A tensor's values are not read (it
    may be traced, or learnt): ``check_finite=True`` catches a loss they make non-finite.

    >>> check_scalar(0.05, "temperature", "info_nce")
    >>> check_scalar(0.0, "temperature", "info_nce")
    Traceback (most recent call last):
    ...
    gradcache._errors.GradCacheError: info_nce: temperature must be a finite number > 0, got 0.0
    """
    if isinstance(value, bool):
        raise GradCacheError(f"{loss}: {name} must be a number or a scalar tensor, got {value!r}")
    if not isinstance(value, numbers.Real):
        return
    positive = SCALARS[name]
    if not math.isfinite(value) or (positive and value <= 0):
        wanted = "a finite number > 0" if positive else "a finite number"
        raise GradCacheError(f"{loss}: {name} must be {wanted}, got {value!r}")


def layout_across(ops: LossOps, collective: Collective, x: Any, y: Any, loss: str, *,
                  square: bool) -> RankLayout:
    """Every rank's shapes (one :meth:`~gradcache.Collective.exchange`), checked alike on every
    rank so that all of them raise the same error or none does.

    >>> from gradcache.testing import run_ranks
    >>> def rank(r, collective):
    ...     return layout_across(_Shapes(), collective, (2 + r, 4), (2 * (2 + r), 4), "info_nce",
    ...                          square=False)
    >>> run_ranks(2, rank)[1][0]
    RankLayout(counts=(2, 3), group=2, offset=2)
    """
    mine = (tuple(ops.shape(x)), tuple(ops.shape(y)))
    shapes = [(tuple(a), tuple(b)) for a, b in collective.every_shape(mine)]
    for rank, (x_shape, y_shape) in enumerate(shapes):
        try:
            check_pair(_Shapes(), x_shape, y_shape, loss, square=square)
        except GradCacheError as error:
            raise GradCacheError(f"on rank {rank}: {error}") from None
    if len({(x_shape[1], y_shape[1]) for x_shape, y_shape in shapes}) > 1:
        raise GradCacheError(f"{loss}: the ranks' representations differ in width: "
                             f"{[list(pair) for pair in shapes]}")
    groups = [y_shape[0] // x_shape[0] for x_shape, y_shape in shapes]
    if len(set(groups)) > 1:
        raise GradCacheError(
            f"{loss}: every rank's passages must hold the same number of rows per query (k + 1), "
            f"got {groups} on ranks 0..{len(groups) - 1} (shapes {[list(pair) for pair in shapes]})")
    counts = tuple(x_shape[0] for x_shape, _ in shapes)
    this_rank = getattr(collective, "rank", None)
    if this_rank is None:
        raise GradCacheError(f"{loss} across ranks needs a collective with a `rank` attribute")
    offset: Any  # an int, or a traced integer
    if isinstance(this_rank, int):
        offset = sum(counts[:this_rank])
    else:  # a traced rank (SPMD): every rank holds the same number of rows
        offset = this_rank * counts[0]
    return RankLayout(counts, groups[0], offset)


def forward_across(ops: TileOps, collective: Collective, layout: RankLayout, kind: str, x: Any,
                   y: Any, alpha: Any, beta: Any, tile: int) -> tuple[Any, Any, Any, Any]:
    """The global summed loss ``S`` (the same on every rank) from this rank's ``x`` and ``y``.

    Returns:
        ``(value, columns, row_lse, column_lse)``: ``columns`` is the gathered ``y`` (every rank's,
        rank order), ``row_lse`` this rank's rows' statistics, ``column_lse`` the global columns'
        (``None`` where ``kind`` needs none); :func:`backward_across` takes them.
    """
    columns = collective.all_gather_rows(y, layout.column_counts)
    value, row_lse, partial = tiled_forward(ops, kind, x, columns, alpha, beta, tile,
                                            offset=layout.offset, group=layout.group,
                                            column_term=False)
    value = collective.all_reduce_sum(value)
    if kind != ROWS_AND_COLUMNS:
        return value, columns, row_lse, None
    # every rank's per-column log-sum-exp over its own rows (R x B numbers), combined: the global
    # column statistic, identical on every rank, whose sum is added once
    stacked = collective.all_gather_rows(ops.row(partial), [1] * collective.world_size)
    column_lse = ops.logsumexp(stacked, 0)
    return value + ops.sum(column_lse), columns, row_lse, column_lse


def backward_across(ops: TileOps, collective: Collective, layout: RankLayout, kind: str, x: Any,
                    columns: Any, alpha: Any, beta: Any, row_lse: Any, column_lse: Any, grad: Any,
                    tile: int) -> tuple[Any, Any, Any, Any]:
    """Gradients of ``grad * S`` with respect to this rank's ``x`` and ``y`` and the shared
    ``alpha`` and ``beta`` (the global ones, the same on every rank); ``grad`` must be too.

    ``dx`` is complete from this rank's rows alone; every rank's share of ``dy`` goes to the rank
    owning those rows (one reduce-scatter), ``dalpha`` and ``dbeta`` are summed over ranks.
    """
    dx, dy, dalpha, dbeta = tiled_backward(ops, kind, x, columns, alpha, beta, row_lse,
                                           column_lse, grad, tile, offset=layout.offset,
                                           group=layout.group)
    dy = collective.reduce_scatter_rows(dy, layout.column_counts)
    dy = subtract_own_positives(ops, kind, x, dy, grad * alpha, layout.group)
    dalpha = collective.all_reduce_sum(dalpha)
    if dbeta is not None:
        dbeta = collective.all_reduce_sum(dbeta)
    return dx, dy, dalpha, dbeta


def summed_forward(ops: TileOps, kind: str, x: Any, y: Any, alpha: Any, beta: Any, tile: int,
                   collective: Collective | None = None,
                   layout: RankLayout | None = None) -> tuple[Any, tuple]:
    """The summed loss ``S`` -- of every rank's rows when a ``collective`` is given -- and what
    :func:`summed_backward` needs: the body of a backend's custom-gradient forward.

    Returns:
        ``(value, saved)``; the backend keeps ``saved``, ``(x, columns, alpha, beta, row_lse,
        column_lse)`` (``columns``: ``y``, or every rank's gathered; ``beta`` and ``column_lse``
        may be ``None``), for the backward.
    """
    if collective is None:
        value, row_lse, column_lse = tiled_forward(ops, kind, x, y, alpha, beta, tile)
        return value, (x, y, alpha, beta, row_lse, column_lse)
    assert layout is not None, "a collective comes with its layout"
    value, columns, row_lse, column_lse = forward_across(ops, collective, layout, kind, x, y,
                                                         alpha, beta, tile)
    return value, (x, columns, alpha, beta, row_lse, column_lse)


def summed_backward(ops: TileOps, kind: str, saved: tuple, grad: Any, tile: int,
                    collective: Collective | None = None,
                    layout: RankLayout | None = None) -> tuple[Any, Any, Any, Any]:
    """``(dx, dy, dalpha, dbeta)`` of ``grad * S`` from :func:`summed_forward`'s ``saved``, with
    the same ``collective`` and ``layout``: the body of a backend's custom-gradient backward."""
    x, columns, alpha, beta, row_lse, column_lse = saved
    if collective is None:
        return tiled_backward(ops, kind, x, columns, alpha, beta, row_lse, column_lse, grad, tile)
    assert layout is not None, "a collective comes with its layout"
    return backward_across(ops, collective, layout, kind, x, columns, alpha, beta, row_lse,
                           column_lse, grad, tile)


def _mean_rows(ops: LossOps, x: Any, y: Any, loss: str, square: bool,
               collective: Collective | None) -> tuple[int, RankLayout | None]:
    """The number of rows the loss averages over (all ranks' together), and the layout."""
    if collective is None:
        n, _ = check_pair(ops, x, y, loss, square=square)
        return n, None
    layout = layout_across(ops, collective, x, y, loss, square=square)
    return layout.total, layout


def _summed(ops: LossOps, kind: str, x: Any, y: Any, alpha: Any, beta: Any, tile: int,
            collective: Collective | None, layout: RankLayout | None) -> Any:
    if collective is None:  # a backend without collectives need not take them
        return ops.tiled_sum(kind, x, y, alpha, beta, tile)
    return ops.tiled_sum(kind, x, y, alpha, beta, tile, collective, layout)


def prepare(ops: LossOps, x: Any, y: Any, similarity: str, loss: str) -> tuple[Any, Any]:
    """Half-precision inputs in float32, unit rows for ``similarity="cosine"``."""
    if similarity not in SIMILARITIES:
        raise GradCacheError(f"{loss}: similarity must be one of {SIMILARITIES}, got {similarity!r}")
    x, y = ops.prepare(x), ops.prepare(y)
    if similarity == "cosine":
        x, y = ops.normalize(x), ops.normalize(y)
    return x, y


def info_nce(ops: LossOps, q: Any, p: Any, temperature: Any, similarity: str,
             tile_size: Any, collective: Collective | None = None) -> Any:
    """InfoNCE with in-batch and hard negatives: ``mean_i [lse_j(s_ij / t) - s_i,pos(i) / t]``.

    ``p`` holds ``k + 1`` rows per query, query ``i``'s positive first at row ``i * (k + 1)``; every
    query is scored against every row of ``p``. With a ``collective``, ``q`` and ``p`` are this
    rank's rows and the result is the loss of every rank's rows together (see the module).
    """
    check_scalar(temperature, "temperature", "info_nce")
    tile = check_tile_size(tile_size, accelerator=ops.on_accelerator(q))
    n, layout = _mean_rows(ops, q, p, "info_nce", False, collective)
    q, p = prepare(ops, q, p, similarity, "info_nce")
    alpha = 1 / ops.as_scalar(temperature, q)
    return _summed(ops, ROWS, q, p, alpha, None, tile, collective, layout) / n


def clip_loss(ops: LossOps, x: Any, y: Any, logit_scale: Any, similarity: str,
              tile_size: Any, collective: Collective | None = None) -> Any:
    """Symmetric CLIP loss: the mean of InfoNCE over rows and over columns of ``scale * x y^T``."""
    check_scalar(logit_scale, "logit_scale", "clip_loss")
    tile = check_tile_size(tile_size, accelerator=ops.on_accelerator(x))
    n, layout = _mean_rows(ops, x, y, "clip_loss", True, collective)
    x, y = prepare(ops, x, y, similarity, "clip_loss")
    alpha = ops.as_scalar(logit_scale, x)
    return _summed(ops, ROWS_AND_COLUMNS, x, y, alpha, None, tile, collective, layout) / (2 * n)


def siglip_loss(ops: LossOps, x: Any, y: Any, logit_scale: Any, logit_bias: Any,
                similarity: str, tile_size: Any, collective: Collective | None = None) -> Any:
    """SigLIP: ``-(1/n) sum_ij log sigmoid(l_ij (scale s_ij + bias))``, ``l = 2 I - 1``.

    ``-log sigmoid(u) = softplus(-u)``: ``n`` times the loss is the ``SIGMOID`` summed loss.
    """
    check_scalar(logit_scale, "logit_scale", "siglip_loss")
    check_scalar(logit_bias, "logit_bias", "siglip_loss")
    tile = check_tile_size(tile_size, accelerator=ops.on_accelerator(x))
    n, layout = _mean_rows(ops, x, y, "siglip_loss", True, collective)
    x, y = prepare(ops, x, y, similarity, "siglip_loss")
    alpha = ops.as_scalar(logit_scale, x)
    beta = ops.as_scalar(logit_bias, x)
    return _summed(ops, SIGMOID, x, y, alpha, beta, tile, collective, layout) / n


def _checked(ops: LossOps, x: Any, y: Any, similarity: str, loss: str,
             square: bool) -> tuple[Any, Any, int, int]:
    n, m = check_pair(ops, x, y, loss, square=square)
    x, y = prepare(ops, x, y, similarity, loss)
    return x, y, n, m


def info_nce_dense(ops: LossOps, q: Any, p: Any, temperature: Any, similarity: str) -> Any:
    """:func:`info_nce` with the whole ``B x B(k+1)`` matrix of logits: the reference."""
    check_scalar(temperature, "temperature", "info_nce_dense")
    q, p, n, m = _checked(ops, q, p, similarity, "info_nce_dense", False)
    logits = ops.matmul_nt(q, p) / ops.as_scalar(temperature, q)
    return ops.cross_entropy(logits, m // n)


def clip_loss_dense(ops: LossOps, x: Any, y: Any, logit_scale: Any, similarity: str) -> Any:
    """:func:`clip_loss` with the whole ``B x B`` matrix of logits: the reference."""
    check_scalar(logit_scale, "logit_scale", "clip_loss_dense")
    x, y, _, _ = _checked(ops, x, y, similarity, "clip_loss_dense", True)
    logits = ops.as_scalar(logit_scale, x) * ops.matmul_nt(x, y)
    return (ops.cross_entropy(logits, 1) + ops.cross_entropy(ops.transpose(logits), 1)) / 2


def siglip_loss_dense(ops: LossOps, x: Any, y: Any, logit_scale: Any, logit_bias: Any,
                      similarity: str) -> Any:
    """:func:`siglip_loss` with the whole ``B x B`` matrix of logits: the reference."""
    check_scalar(logit_scale, "logit_scale", "siglip_loss_dense")
    check_scalar(logit_bias, "logit_bias", "siglip_loss_dense")
    x, y, n, _ = _checked(ops, x, y, similarity, "siglip_loss_dense", True)
    logits = ops.as_scalar(logit_scale, x) * ops.matmul_nt(x, y) + ops.as_scalar(logit_bias, x)
    return ops.sigmoid_loss(logits) / n


def check_across(loss: Any, front_ends: tuple, module: str, loss_kwargs: dict) -> None:
    """What every backend's ``across_ranks(loss, **loss_kwargs)`` checks before it returns: that
    ``loss`` is one of the backend's tiled losses and takes those keyword arguments."""
    if loss not in front_ends:
        raise GradCacheError(
            f"across_ranks takes info_nce, clip_loss or siglip_loss from {module}, got "
            f"{getattr(loss, '__name__', loss)!r}")
    try:
        inspect.signature(loss).bind(None, None, **loss_kwargs)
    except TypeError as error:
        raise GradCacheError(f"across_ranks({loss.__name__}, ...): {error}") from None
    for name, value in loss_kwargs.items():
        if name in SCALARS:
            check_scalar(value, name, f"across_ranks({loss.__name__}, ...)")


def across(ops: LossOps, loss: str, collective: Collective, x: Any, y: Any, *,
           temperature: Any = DEFAULT_TEMPERATURE, logit_scale: Any = None,
           logit_bias: Any = DEFAULT_SIGLIP_BIAS, similarity: str = "dot",
           tile_size: Any = None) -> Any:
    """The loss named ``loss`` (a tiled front-end's name) over every rank's rows, from this rank's
    ``x`` and ``y``, with the front-end's defaults: the body of every backend's ``across_ranks``."""
    if loss == "info_nce":
        return info_nce(ops, x, y, temperature, similarity, tile_size, collective)
    if loss == "clip_loss":
        scale = DEFAULT_CLIP_SCALE if logit_scale is None else logit_scale
        return clip_loss(ops, x, y, scale, similarity, tile_size, collective)
    scale = DEFAULT_SIGLIP_SCALE if logit_scale is None else logit_scale
    return siglip_loss(ops, x, y, scale, logit_bias, similarity, tile_size, collective)
