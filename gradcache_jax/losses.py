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

This module holds JAX's part only: its primitives of :class:`gradcache._loss_forms.LossOps` (the
array primitives and the compiled tile loop, the ``custom_vjp`` around the sweeps, the
differentiable ops), its mesh collective for ``across_ranks`` and its pieces of the docstrings. The public functions are written once in
:mod:`gradcache._loss_api` and bound here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from gradcache import Collective, GradCacheError
from gradcache._loss_api import AcrossRanks, LossDocs, bind
from gradcache._loss_forms import LossOps
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


class _Ops(LossOps):
    """:class:`gradcache._loss_forms.LossOps` over ``lax``: static tiles, ``fori_loop``, dynamic
    slices, a ``custom_vjp`` around the sweeps (the rest is written once over the primitives)."""

    ragged = False

    def __init__(self, axis_name: Any = None):
        #: across a mesh axis (inside shard_map): the loops' carries start out varying over it, as
        #: the values this device's rows add to them are (a loop's carry keeps one type)
        self.axis_name = axis_name

    def sweep_ops(self, collective: Collective | None) -> _Ops:
        if collective is None:
            return self
        assert isinstance(collective, MeshCollective), "JAX's losses run across a mesh axis"
        return _Ops(collective.axis_name)

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
    logsumexp = staticmethod(jax.nn.logsumexp)
    sigmoid = staticmethod(jax.nn.sigmoid)  # one op, where the default takes three
    softplus = staticmethod(jax.nn.softplus)  # logaddexp(x, 0): exact everywhere

    def where(self, condition: jax.Array, a: Any, b: Any, /) -> jax.Array:
        # a method, not staticmethod(jnp.where): that would type as jnp.where's first overload,
        # the one-argument nonzero form
        return jnp.where(condition, a, b)

    def full(self, shape: tuple, fill: float, like: jax.Array) -> jax.Array:
        return jnp.full(shape, fill, like.dtype)

    def arange(self, size: int, like: Any) -> jax.Array:
        return jnp.arange(size)

    # -- the differentiable ops around the sweeps ---------------------------------------------------
    def custom_gradient(self, forward: Callable, backward: Callable, inputs: tuple) -> jax.Array:
        # made per call: the rules close over the loss's static arguments and the collective.
        # Across a mesh axis, under shard_map's type checks, the value and dalpha/dbeta come out of
        # psum -- invariant, so autodiff adds no sum over devices to them -- and dx, dy vary.
        @jax.custom_vjp
        def summed(*inputs: Any) -> jax.Array:
            return forward(*inputs)[0]

        summed.defvjp(forward, backward)
        return summed(*inputs)

    def prepare(self, x: Any) -> jax.Array:
        x = jnp.asarray(x)
        return x.astype(jnp.float32) if x.dtype in (jnp.float16, jnp.bfloat16) else x

    def as_scalar(self, value: Any, like: jax.Array) -> jax.Array:
        return jnp.reshape(jnp.asarray(value).astype(like.dtype), ())

    def on_accelerator(self, x: Any) -> bool:
        return jax.default_backend() != "cpu"

    def normalize(self, x: jax.Array) -> jax.Array:
        return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)

    def cross_entropy(self, logits: jax.Array, step: int) -> jax.Array:
        labels = jnp.arange(logits.shape[0]) * step
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=-1))

    def sigmoid_loss(self, logits: jax.Array) -> jax.Array:
        labels = 2 * jnp.eye(logits.shape[0], dtype=logits.dtype) - 1
        return -jnp.sum(jax.nn.log_sigmoid(labels * logits))


_OPS = _Ops()


class _AcrossRanks(AcrossRanks):
    """What :func:`across_ranks` returns: call it, inside ``jax.shard_map``, with this device's
    rows."""

    place = "axis_name"
    axis_name: Any  # set by AcrossRanks.__init__ (place)

    def collective_for(self, x: Any, y: Any) -> MeshCollective:
        try:
            collective = MeshCollective(self.axis_name)  # the axis bound where it is called
        except GradCacheError:
            raise GradCacheError(
                f"{self!r} was called where mesh axis {self.axis_name!r} is not bound: call it "
                f"inside jax.shard_map over a mesh with that axis (or as the loss_fn of "
                f"gradcache_jax.cached_step(..., distributed=mesh or axis name); see "
                f"docs/losses.md, Distributed)") from None
        typed = _varying_axes(collective.rank)  # empty without shard_map's type checks
        for name, rows in (("x", x), ("y", y)):
            if typed and not typed <= _varying_axes(rows):
                raise GradCacheError(
                    f"{self!r} takes this device's own rows, varying over the mesh axis, but its "
                    f"{name} is the same on every device (shape {jnp.shape(rows)}): the global "
                    f"batch, gathered already? As the loss_fn of cached_step it is given each "
                    f"device's rows because it gathers_itself; a function wrapping it must say so "
                    f"too (fn.gathers_itself = True; see docs/losses.md, Distributed)")
        return collective


_DOCS = LossDocs(
    module=__name__,
    array_type=jax.Array,
    tensor="array",
    learnable="a leaf of your params",
    log_scale="``jnp.exp(log_scale)``",
    autodiff="autodiff",
    gradients="""
        A ``jax.custom_vjp`` function, jit-able: ``jax.grad`` gives the representations and a
        learnable parameter their gradients. The tiles are a ``lax.fori_loop`` over one static tile
        shape, so the compiled program is the same size for any batch.
    """,
    unit="device",
    ranks="a mesh axis",
    where="""
        , called inside ``jax.shard_map`` (or as the ``loss_fn`` of ``cached_step(...,
        distributed=mesh)`` / ``(..., distributed="batch")`` inside your own ``shard_map``),
    """,
    communicates="""
        all-gathers ``y`` and reduce-scatters its gradient (``B x d`` numbers each) plus scalars
        (and, for CLIP, one ``B``-vector per device)
    """,
    specifics="""
        The value is typed invariant over the axis. A learnable temperature, scale or bias
        (replicated, i.e. invariant over the axis) gets the global gradient, identical on every
        device and not summed again. Every device holds the same number of rows (shard_map's shapes
        are static); for ``info_nce`` ``y_local`` holds ``k + 1`` rows per local query.
    """,
    place_doc="""
        axis_name: the mesh axis the batch is split over (or a tuple of axes, counted as one in
            row-major order, as ``lax.axis_index`` numbers them).
    """,
    examples={
        "info_nce": """
            >>> import jax, jax.numpy as jnp
            >>> from gradcache_jax.losses import info_nce, info_nce_dense
            >>> q = jax.random.normal(jax.random.PRNGKey(0), (6, 4))
            >>> p = jax.random.normal(jax.random.PRNGKey(1), (12, 4))   # 1 hard negative per query
            >>> loss = jax.jit(lambda q, p: info_nce(q, p, temperature=0.1, tile_size=4))(q, p)
            >>> bool(jnp.allclose(loss, info_nce_dense(q, p, temperature=0.1), rtol=1e-5))
            True
        """,
        "clip_loss": """
            >>> import jax, jax.numpy as jnp
            >>> from gradcache_jax.losses import clip_loss
            >>> x = jax.random.normal(jax.random.PRNGKey(0), (5, 3))
            >>> y = jax.random.normal(jax.random.PRNGKey(1), (5, 3))
            >>> grad = jax.grad(lambda s: clip_loss(x, y, logit_scale=jnp.exp(s), tile_size=2))(0.5)
            >>> grad.shape
            ()
        """,
        "siglip_loss": """
            >>> import jax, jax.numpy as jnp
            >>> from gradcache_jax.losses import siglip_loss, siglip_loss_dense
            >>> x = jax.random.normal(jax.random.PRNGKey(0), (5, 3))
            >>> y = jax.random.normal(jax.random.PRNGKey(1), (5, 3))
            >>> dense = siglip_loss_dense(x, y)
            >>> bool(jnp.allclose(siglip_loss(x, y, tile_size=2), dense, rtol=1e-5))
            True
        """,
        "info_nce_dense": """
            >>> import jax.numpy as jnp
            >>> from gradcache_jax.losses import info_nce_dense
            >>> info_nce_dense(jnp.eye(3), jnp.eye(3), temperature=1.0).shape
            ()
        """,
        "clip_loss_dense": """
            >>> import jax.numpy as jnp
            >>> from gradcache_jax.losses import clip_loss_dense
            >>> clip_loss_dense(jnp.eye(3), jnp.eye(3), logit_scale=1.0).shape
            ()
        """,
        "siglip_loss_dense": """
            >>> import jax.numpy as jnp
            >>> from gradcache_jax.losses import siglip_loss_dense
            >>> siglip_loss_dense(jnp.eye(3), jnp.eye(3)).shape
            ()
        """,
    },
)

(info_nce, clip_loss, siglip_loss, info_nce_dense, clip_loss_dense, siglip_loss_dense,
 across_ranks) = bind(_OPS, _DOCS, _AcrossRanks)
