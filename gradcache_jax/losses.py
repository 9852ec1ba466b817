"""Contrastive losses for JAX whose memory grows linearly in the batch: InfoNCE, CLIP, SigLIP.

``info_nce``, ``clip_loss`` and ``siglip_loss`` never hold more than one ``tile x tile`` block of
logits: each is a ``jax.custom_vjp`` function whose forward sweeps the tiles with
``lax.fori_loop`` keeping one log-sum-exp per row (and column), and whose backward recomputes each
tile once and returns the gradients of the representations and of the logits' scale and bias (the
sweeps are :mod:`gradcache._tiled`, shared by every backend). Every tile has one
static shape -- a last tile that does not fit is moved back and its repeated rows masked -- so the
compiled program is the same size for any batch. The rest (cosine normalisation, turning a
temperature into a scale) is ordinary JAX, so a learnable temperature, logit scale or bias is a leaf of
your params like any other. ``*_dense`` are the same losses with the whole ``B x B`` matrix, the
reference the tiled ones equal. They are jit-able and work as the ``loss_fn`` of
:func:`gradcache_jax.cached_step` (with ``loss_takes_params=True`` for learnable parameters); see
``docs/losses.md``.

:func:`across_ranks` turns one of them into the loss of the global batch of a mesh axis inside
``jax.shard_map``, each device computing only its own rows' share: one all-gather and one
reduce-scatter of ``B x d`` numbers per step (:mod:`gradcache._loss_forms`).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from gradcache import GradCacheError, _loss_forms, _tiled
from gradcache._loss_forms import (
    DEFAULT_CLIP_SCALE,
    DEFAULT_SIGLIP_BIAS,
    DEFAULT_SIGLIP_SCALE,
    DEFAULT_TEMPERATURE,
    RankLayout,
)
from gradcache._tile_ops import ArrayOps
from gradcache_jax._distributed import MeshCollective, _varying_axes, to_varying

__all__ = [
    "across_ranks",
    "clip_loss",
    "clip_loss_dense",
    "info_nce",
    "info_nce_dense",
    "siglip_loss",
    "siglip_loss_dense",
]


class _TileOps(ArrayOps):
    """:class:`gradcache._tiled.TileOps` over ``lax``: static tiles, ``fori_loop``, dynamic slices
    (the rest is :class:`gradcache._tile_ops.ArrayOps` over the primitives)."""

    ragged = False

    def __init__(self, axis_name: Any = None):
        #: across a mesh axis (inside shard_map): the loops' carries start out varying over it, as
        #: the values this device's rows add to them are (a loop's carry keeps one type)
        self.axis_name = axis_name

    def fori(self, count: int, body: Callable, carry: tuple) -> tuple:
        if self.axis_name is not None:
            carry = jax.tree_util.tree_map(lambda leaf: to_varying(leaf, self.axis_name), carry)
        return lax.fori_loop(0, count, body, carry)

    def rows(self, x: jax.Array, start: Any, size: int) -> jax.Array:
        return lax.dynamic_slice_in_dim(x, start, size, axis=0)

    def write(self, buffer: jax.Array, start: Any, value: jax.Array) -> jax.Array:
        return lax.dynamic_update_slice_in_dim(buffer, value, start, axis=0)

    def subtract_every(self, private: jax.Array, step: int, value: jax.Array,
                       weight: float) -> jax.Array:
        return private.at[::step].add(-weight * value)

    exp = staticmethod(jnp.exp)
    log = staticmethod(jnp.log)
    maximum = staticmethod(jnp.maximum)
    where = staticmethod(jnp.where)
    logsumexp = staticmethod(jax.nn.logsumexp)
    sigmoid = staticmethod(jax.nn.sigmoid)  # one op, where the default takes three
    softplus = staticmethod(jax.nn.softplus)  # logaddexp(x, 0): exact everywhere

    def full(self, shape: tuple, fill: float, like: jax.Array) -> jax.Array:
        return jnp.full(shape, fill, like.dtype)

    def arange(self, size: int, like: Any) -> jax.Array:
        return jnp.arange(size)


_TILE_OPS = _TileOps()


@partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _tiled_sum(kind: str, tile: int, x: jax.Array, y: jax.Array, alpha: jax.Array,
               beta: jax.Array | None) -> jax.Array:
    return _tiled.tiled_forward(_TILE_OPS, kind, x, y, alpha, beta, tile)[0]


def _tiled_forward(kind: str, tile: int, x: jax.Array, y: jax.Array, alpha: jax.Array,
                       beta: jax.Array | None) -> tuple[jax.Array, tuple]:
    value, row_lse, column_lse = _tiled.tiled_forward(_TILE_OPS, kind, x, y, alpha, beta, tile)
    return value, (x, y, alpha, beta, row_lse, column_lse)


def _tiled_backward(kind: str, tile: int, residuals: tuple, grad: jax.Array) -> tuple:
    x, y, alpha, beta, row_lse, column_lse = residuals
    return _tiled.tiled_backward(_TILE_OPS, kind, x, y, alpha, beta, row_lse, column_lse,
                                     grad, tile)


_tiled_sum.defvjp(_tiled_forward, _tiled_backward)


def _tiled_sum_across(kind: str, tile: int, collective: MeshCollective, counts: tuple, group: int,
                      x: jax.Array, y: jax.Array, alpha: jax.Array,
                      beta: jax.Array | None) -> jax.Array:
    """The global summed loss S from this device's rows, as a ``jax.custom_vjp`` function made per
    call: it closes over the collective and the static layout, and takes this device's offset from
    ``lax.axis_index`` inside each rule (a traced offset may not cross into custom_vjp's static
    arguments). Under shard_map's type checks the value and ``dalpha``/``dbeta`` come out of
    ``psum`` -- invariant, the same on every device, so autodiff adds no sum over devices to them --
    and ``dx``, ``dy`` are varying, this device's rows."""

    ops = _TileOps(collective.axis_name)

    def layout() -> RankLayout:
        return RankLayout(counts, group, collective.rank * counts[0])  # SPMD: equal rows

    def forward(x: jax.Array, y: jax.Array, alpha: jax.Array,
                beta: jax.Array | None) -> tuple[jax.Array, tuple]:
        value, columns, row_lse, column_lse = _loss_forms.forward_across(
            ops, collective, layout(), kind, x, y, alpha, beta, tile)
        return value, (x, columns, alpha, beta, row_lse, column_lse)

    def backward(residuals: tuple, grad: jax.Array) -> tuple:
        x, columns, alpha, beta, row_lse, column_lse = residuals
        return _loss_forms.backward_across(ops, collective, layout(), kind, x, columns, alpha,
                                           beta, row_lse, column_lse, grad, tile)

    @jax.custom_vjp
    def summed(x: jax.Array, y: jax.Array, alpha: jax.Array, beta: jax.Array | None) -> jax.Array:
        return forward(x, y, alpha, beta)[0]

    summed.defvjp(forward, backward)
    return summed(x, y, alpha, beta)


class _LossOps:
    """:class:`gradcache._loss_forms.LossOps` over ``jax.numpy``."""

    def tiled_sum(self, kind: str, x: jax.Array, y: jax.Array, alpha: jax.Array,
                  beta: jax.Array | None, tile: int) -> jax.Array:
        return _tiled_sum(kind, tile, x, y, alpha, beta)

    def tiled_sum_across(self, kind: str, x: jax.Array, y: jax.Array, alpha: jax.Array,
                         beta: jax.Array | None, tile: int, collective: MeshCollective,
                         layout: RankLayout) -> jax.Array:
        return _tiled_sum_across(kind, tile, collective, layout.counts, layout.group, x, y, alpha,
                                 beta)

    def shape(self, x: Any) -> tuple:
        return tuple(jnp.shape(x))

    def prepare(self, x: Any) -> jax.Array:
        x = jnp.asarray(x)
        # fp16/bf16 logits would lose the log-sum-exp; autodiff casts the gradient back
        return x.astype(jnp.float32) if x.dtype in (jnp.float16, jnp.bfloat16) else x

    def as_scalar(self, value: Any, like: jax.Array) -> jax.Array:
        return jnp.reshape(jnp.asarray(value).astype(like.dtype), ())

    def on_accelerator(self, x: Any) -> bool:
        return jax.default_backend() != "cpu"

    def normalize(self, x: jax.Array) -> jax.Array:
        return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


_OPS = _LossOps()


def info_nce(q: Any, p: Any, *, temperature: Any = DEFAULT_TEMPERATURE, similarity: str = "dot",
             tile_size: int | None = None) -> jax.Array:
    """InfoNCE (multiple-negatives ranking) with in-batch and hard negatives, tiled.

    Query ``i`` is scored against every row of ``p``; its positive is row ``i * (k + 1)``, where
    ``p`` lays out ``k + 1`` rows per query (the positive, then ``k`` hard negatives). The loss is
    ``mean_i [logsumexp_j(s_ij / t) - s_i,pos / t]``: equal to :func:`info_nce_dense`, value and
    gradients, in ``O((B + tile)·d + tile²)`` memory.

    Args:
        q: ``(B, d)`` query representations.
        p: ``(B * (k + 1), d)`` passage representations, ``k >= 0``.
        temperature: a float or a scalar array (a leaf of your params to learn it).
        similarity: ``"dot"`` or ``"cosine"`` (rows normalised first).
        tile_size: rows and columns per tile of logits (default 512, 4096 on a GPU); memory, never the result.

    Returns:
        The scalar loss.

    >>> import jax, jax.numpy as jnp
    >>> from gradcache_jax.losses import info_nce, info_nce_dense
    >>> q = jax.random.normal(jax.random.PRNGKey(0), (6, 4))
    >>> p = jax.random.normal(jax.random.PRNGKey(1), (12, 4))   # one hard negative per query
    >>> loss = jax.jit(lambda q, p: info_nce(q, p, temperature=0.1, tile_size=4))(q, p)
    >>> bool(jnp.allclose(loss, info_nce_dense(q, p, temperature=0.1), rtol=1e-5))
    True
    """
    return _loss_forms.info_nce(_OPS, q, p, temperature, similarity, tile_size)


def clip_loss(x: Any, y: Any, *, logit_scale: Any = DEFAULT_CLIP_SCALE, similarity: str = "dot",
              tile_size: int | None = None) -> jax.Array:
    """The symmetric CLIP loss, tiled: InfoNCE over the rows and over the columns, averaged.

    Logits are ``logit_scale * x @ y.T``; row ``i`` of ``x`` pairs with row ``i`` of ``y``. As in
    CLIP, learn the scale as ``jnp.exp(log_scale)`` (pass the result here).

    Args:
        x: ``(B, d)`` representations (images).
        y: ``(B, d)`` representations (texts).
        logit_scale: a float or a scalar array (default ``1 / 0.07``).
        similarity: ``"dot"`` (CLIP normalises in the model) or ``"cosine"``.
        tile_size: rows and columns per tile of logits (default 512, 4096 on a GPU).

    Returns:
        The scalar loss, equal to :func:`clip_loss_dense`.

    >>> import jax, jax.numpy as jnp
    >>> from gradcache_jax.losses import clip_loss
    >>> x = jax.random.normal(jax.random.PRNGKey(0), (5, 3))
    >>> y = jax.random.normal(jax.random.PRNGKey(1), (5, 3))
    >>> grad = jax.grad(lambda s: clip_loss(x, y, logit_scale=jnp.exp(s), tile_size=2))(0.5)
    >>> grad.shape
    ()
    """
    return _loss_forms.clip_loss(_OPS, x, y, logit_scale, similarity, tile_size)


def siglip_loss(x: Any, y: Any, *, logit_scale: Any = DEFAULT_SIGLIP_SCALE,
                logit_bias: Any = DEFAULT_SIGLIP_BIAS, similarity: str = "dot",
                tile_size: int | None = None) -> jax.Array:
    """The SigLIP sigmoid loss, tiled: every pair is a binary problem, positives on the diagonal.

    ``-(1/B) sum_ij log sigmoid(label_ij * (logit_scale * x_i . y_j + logit_bias))`` with
    ``label = +1`` on the diagonal and ``-1`` elsewhere (SigLIP's ``t`` and ``b``).

    Args:
        x: ``(B, d)`` representations (images).
        y: ``(B, d)`` representations (texts).
        logit_scale: SigLIP's temperature ``t`` (a multiplier; default 10), float or array.
        logit_bias: SigLIP's bias ``b`` (default -10), float or array.
        similarity: ``"dot"`` or ``"cosine"``.
        tile_size: rows and columns per tile of logits (default 512, 4096 on a GPU).

    Returns:
        The scalar loss, equal to :func:`siglip_loss_dense`.

    >>> import jax, jax.numpy as jnp
    >>> from gradcache_jax.losses import siglip_loss, siglip_loss_dense
    >>> x = jax.random.normal(jax.random.PRNGKey(0), (5, 3))
    >>> y = jax.random.normal(jax.random.PRNGKey(1), (5, 3))
    >>> bool(jnp.allclose(siglip_loss(x, y, tile_size=2), siglip_loss_dense(x, y), rtol=1e-5))
    True
    """
    return _loss_forms.siglip_loss(_OPS, x, y, logit_scale, logit_bias, similarity, tile_size)


class _AcrossRanks:
    """The object :func:`across_ranks` returns: call it, inside ``jax.shard_map``, with this
    device's rows."""

    #: tells :func:`gradcache_jax.cached_step` (``mesh=`` or ``axis_name=``) to pass this device's
    #: own representations rather than the gathered global batch
    gathers_itself = True

    def __init__(self, loss: Callable, axis_name: Any, loss_kwargs: dict):
        self.loss = loss
        self.axis_name = axis_name
        self.loss_kwargs = loss_kwargs

    def __call__(self, x: Any, y: Any, **overrides: Any) -> jax.Array:
        try:
            collective = MeshCollective(self.axis_name)  # the axis bound where it is called
        except GradCacheError:
            raise GradCacheError(
                f"{self!r} was called where mesh axis {self.axis_name!r} is not bound: call it "
                f"inside jax.shard_map over a mesh with that axis (or as the loss_fn of "
                f"gradcache_jax.cached_step(..., mesh=...) or (..., axis_name=...))") from None
        typed = _varying_axes(collective.rank)  # empty without shard_map's type checks
        for name, rows in (("x", x), ("y", y)):
            if typed and not typed <= _varying_axes(rows):
                raise GradCacheError(
                    f"{self!r} takes this device's own rows, varying over the mesh axis, but its "
                    f"{name} is the same on every device (shape {jnp.shape(rows)}): the global "
                    f"batch, gathered already? As the loss_fn of cached_step it is given each "
                    f"device's rows because it gathers_itself; a function wrapping it must say so "
                    f"too (fn.gathers_itself = True)")
        kwargs = {**self.loss_kwargs, **overrides}
        return _loss_forms.across(_OPS, self.loss.__name__, collective, x, y, **kwargs)

    def __repr__(self) -> str:
        return (f"across_ranks({self.loss.__name__}, axis_name={self.axis_name!r}, "
                f"**{self.loss_kwargs!r})")


def across_ranks(loss: Callable, *, axis_name: Any, **loss_kwargs: Any) -> _AcrossRanks:
    """``loss`` over the global batch of a mesh axis, each device computing its own rows' share.

    The returned callable, called inside ``jax.shard_map`` (or as the ``loss_fn`` of
    ``cached_step(..., mesh=...)`` / ``(..., axis_name=...)``), takes *this device's* rows,
    ``(x_local, y_local)``, and returns the loss of the global batch -- every device's rows
    concatenated in device order along ``axis_name`` -- the same value on every device (typed
    invariant over the axis). Its gradient with respect to ``x_local`` and ``y_local`` is that of
    the global loss, and a learnable temperature, scale or bias (replicated, i.e. invariant over
    the axis) gets the global gradient, identical on every device and not summed again. Each device
    scores only its own rows against every gathered column; per call it all-gathers ``y`` and
    reduce-scatters its gradient (``B x d`` numbers each) plus scalars (and, for CLIP, one
    ``B``-vector per device). Every device holds the same number of rows (shard_map's shapes are
    static); for ``info_nce`` ``y_local`` holds ``k + 1`` rows per local query.

    Args:
        loss: :func:`info_nce`, :func:`clip_loss` or :func:`siglip_loss`.
        axis_name: the mesh axis the batch is split over (or a tuple of axes, counted as one in
            row-major order, as ``lax.axis_index`` numbers them).
        **loss_kwargs: the loss's keyword arguments (``temperature``, ``logit_scale``,
            ``logit_bias``, ``similarity``, ``tile_size``); more, or overrides, may be given per
            call: ``loss_fn(x_local, y_local, temperature=jnp.exp(params["log_t"]))``.

    Returns:
        A callable ``(x_local, y_local, **more_kwargs) -> loss`` with ``gathers_itself = True``.
    """
    _loss_forms.check_across(loss, (info_nce, clip_loss, siglip_loss), "gradcache_jax.losses", loss_kwargs)
    return _AcrossRanks(loss, axis_name, loss_kwargs)


def _prepared(x: Any, y: Any, similarity: str, loss: str, *,
              square: bool) -> tuple[jax.Array, jax.Array, int, int]:
    n, m = _loss_forms.check_pair(_OPS, x, y, loss, square=square)
    x, y = _loss_forms.prepare(_OPS, x, y, similarity, loss)
    return x, y, n, m


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=-1))


def info_nce_dense(q: Any, p: Any, *, temperature: Any = DEFAULT_TEMPERATURE,
                   similarity: str = "dot") -> jax.Array:
    """:func:`info_nce` with the whole ``B x B(k+1)`` logit matrix: plain autodiff, the reference.

    >>> import jax.numpy as jnp
    >>> from gradcache_jax.losses import info_nce_dense
    >>> info_nce_dense(jnp.eye(3), jnp.eye(3), temperature=1.0).shape
    ()
    """
    q, p, n, m = _prepared(q, p, similarity, "info_nce_dense", square=False)
    logits = q @ p.T / temperature
    return _cross_entropy(logits, jnp.arange(n) * (m // n))


def clip_loss_dense(x: Any, y: Any, *, logit_scale: Any = DEFAULT_CLIP_SCALE,
                    similarity: str = "dot") -> jax.Array:
    """:func:`clip_loss` with the whole ``B x B`` logit matrix: plain autodiff, the reference.

    >>> import jax.numpy as jnp
    >>> from gradcache_jax.losses import clip_loss_dense
    >>> clip_loss_dense(jnp.eye(3), jnp.eye(3), logit_scale=1.0).shape
    ()
    """
    x, y, n, _ = _prepared(x, y, similarity, "clip_loss_dense", square=True)
    logits = logit_scale * (x @ y.T)
    labels = jnp.arange(n)
    return (_cross_entropy(logits, labels) + _cross_entropy(logits.T, labels)) / 2


def siglip_loss_dense(x: Any, y: Any, *, logit_scale: Any = DEFAULT_SIGLIP_SCALE,
                      logit_bias: Any = DEFAULT_SIGLIP_BIAS, similarity: str = "dot") -> jax.Array:
    """:func:`siglip_loss` with the whole ``B x B`` logit matrix: plain autodiff, the reference.

    >>> import jax.numpy as jnp
    >>> from gradcache_jax.losses import siglip_loss_dense
    >>> siglip_loss_dense(jnp.eye(3), jnp.eye(3)).shape
    ()
    """
    x, y, n, _ = _prepared(x, y, similarity, "siglip_loss_dense", square=True)
    logits = logit_scale * (x @ y.T) + logit_bias
    labels = 2 * jnp.eye(n, dtype=logits.dtype) - 1
    return -jnp.sum(jax.nn.log_sigmoid(labels * logits)) / n

