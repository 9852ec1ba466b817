"""Contrastive losses for TensorFlow whose memory grows linearly in the batch: InfoNCE, CLIP, SigLIP.

``info_nce``, ``clip_loss`` and ``siglip_loss`` never hold more than one ``tile x tile`` block of
logits: each is a ``tf.custom_gradient`` function whose forward sweeps the tiles keeping one
log-sum-exp per row (and column), and whose backward recomputes each tile once and returns the
gradients of the representations and of the logits' scale and bias (the sweeps are
:mod:`gradcache._tiled`, shared by every backend). Eagerly the tiles are a Python loop;
inside ``tf.function`` they are a ``tf.while_loop`` over tiles of one static shape (a last tile that
does not fit is moved back and its repeated rows masked), so the graph does not grow with the batch.
The rest (cosine normalisation, turning a temperature into a scale) is ordinary TensorFlow, so a
learnable temperature, logit scale or bias is a ``tf.Variable`` the tape sees like any other.
``*_dense`` are the same losses with the whole ``B x B`` matrix, the reference the tiled ones equal.
They work as the ``loss_fn`` of :func:`gradcache_tf.cached_step`; see ``docs/losses.md``.

:func:`across_ranks` turns one of them into the loss of the global batch of the replicas of a
``tf.distribute`` strategy (inside ``strategy.run``), each replica computing only its own rows'
share: one all-gather of ``B x d`` numbers and one sum of its gradient per step
(:mod:`gradcache._loss_forms`).

This module holds TensorFlow's part only: its primitives of :class:`gradcache._loss_forms.LossOps`
(the array primitives and its tile loops -- a Python loop eagerly, a ``tf.while_loop`` in a graph --,
the ``custom_gradient`` around the sweeps, the differentiable ops), its replicas' collective for
``across_ranks`` and its pieces of the docstrings. The public functions are written once in :mod:`gradcache._loss_api` and bound
here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import tensorflow as tf

from gradcache import GradCacheError
from gradcache._loss_api import AcrossRanks, LossDocs, bind
from gradcache._loss_forms import LossOps
from gradcache._tile_ops import PerTileLoopOps
from gradcache_tf._distributed import ReplicaCollective, replica_context

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
    """:class:`gradcache._loss_forms.LossOps` over TensorFlow: the primitives both of its tile
    loops use, its ``custom_gradient`` and the differentiable ops; :meth:`sweep_ops` picks the loop
    where the sweeps run (the rest is written once over the primitives)."""

    exp = staticmethod(tf.exp)
    log = staticmethod(tf.math.log)
    maximum = staticmethod(tf.maximum)
    where = staticmethod(tf.where)
    # one op where the default takes three: each eager op costs tens of microseconds, once per tile
    isfinite = staticmethod(tf.math.is_finite)
    sigmoid = staticmethod(tf.sigmoid)  # one op, where the default takes three
    logsumexp = staticmethod(tf.reduce_logsumexp)
    # TF's softplus returns x above x = -log(eps) + 2, where log1p(exp(-x)) is below x's rounding
    softplus = staticmethod(tf.math.softplus)
    # TF tensors have no .T; the flags also spare a transposed copy of the tile
    matmul = staticmethod(tf.matmul)

    def full(self, shape: tuple, fill: float, like: tf.Tensor) -> tf.Tensor:
        return tf.fill(shape, tf.constant(fill, like.dtype))

    def arange(self, size: int, like: Any) -> tf.Tensor:
        return tf.range(size)

    def sum(self, x: tf.Tensor, axis: int | None = None) -> tf.Tensor:
        return tf.reduce_sum(x, axis=axis)  # TF tensors have no .sum

    def subtract_every(self, private: tf.Tensor, step: int, value: tf.Tensor,
                       weight: float) -> tf.Tensor:
        # In a graph, weight * value depends on the inputs alone: the executor would make it before
        # the tile loop and hold it (B x d, for dx and for dy) through the sweep. Made after the
        # buffer instead, it lives only for this subtraction. (Eagerly a no-op: ops run in order.)
        with tf.control_dependencies([private]):
            value = weight * value if weight != 1 else tf.identity(value)
        if step == 1:
            return private - value
        # rows 0, step, 2 step, ...: the first of each group of `step` rows
        groups = tf.reshape(private, [-1, step, private.shape[-1]])
        first = groups[:, :1] - value[:, None]
        return tf.reshape(tf.concat([first, groups[:, 1:]], axis=1), tf.shape(private))

    def sweep_ops(self, collective: Any) -> _Ops:
        # each custom-gradient rule asks where it runs: eagerly, or traced in a graph
        return _EAGER if tf.executing_eagerly() else _GRAPH

    # -- the differentiable ops around the sweeps ---------------------------------------------------
    def custom_gradient(self, forward: Callable, backward: Callable, inputs: tuple) -> tf.Tensor:
        # plain tensors in (a learnable temperature reaches it as alpha, a tensor the tape saw made
        # outside), None (no beta) left out
        given = [index for index, value in enumerate(inputs) if value is not None]

        @tf.custom_gradient
        def run(*tensors: tf.Tensor) -> tuple:
            full = list(inputs)
            for index, tensor in zip(given, tensors):
                full[index] = tensor
            value, saved = forward(*full)

            def grad(upstream: tf.Tensor) -> tuple:
                grads = backward(saved, upstream)
                return tuple(grads[index] for index in given)

            return value, grad

        return run(*(inputs[index] for index in given))

    def prepare(self, x: Any) -> tf.Tensor:
        x = tf.convert_to_tensor(x)
        return tf.cast(x, tf.float32) if x.dtype in (tf.float16, tf.bfloat16) else x

    def as_scalar(self, value: Any, like: tf.Tensor) -> tf.Tensor:
        if isinstance(value, (int, float)):
            return tf.constant(value, like.dtype)
        return tf.reshape(tf.cast(value, like.dtype), [])

    def on_accelerator(self, x: Any) -> bool:
        return "GPU" in getattr(x, "device", "") or "TPU" in getattr(x, "device", "")

    def normalize(self, x: tf.Tensor) -> tf.Tensor:
        return tf.math.l2_normalize(x, axis=-1)

    transpose = staticmethod(tf.transpose)

    def cross_entropy(self, logits: tf.Tensor, step: int) -> tf.Tensor:
        labels = tf.range(logits.shape[0]) * step
        return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))

    def sigmoid_loss(self, logits: tf.Tensor) -> tf.Tensor:
        labels = 2 * tf.eye(logits.shape[0], dtype=logits.dtype) - 1
        return -tf.reduce_sum(tf.math.log_sigmoid(labels * logits))


class _EagerOps(_Ops, PerTileLoopOps):
    """Eager tiles: a Python loop, a smaller last tile, accumulators kept per tile
    (:class:`gradcache._tile_ops.PerTileLoopOps`)."""

    def concat(self, pieces: list) -> tf.Tensor:
        return tf.concat(pieces, axis=0)


class _GraphOps(_Ops):
    """Graph tiles: one ``tf.while_loop`` per sweep level over tiles of one static shape."""

    ragged = False

    def fori(self, count: int, body: Callable, carry: tuple) -> tuple:
        def step(index: tf.Tensor, *carry: Any) -> tuple:
            return (index + 1, *body(index, tuple(carry)))

        # parallel_iterations=1: tiles one after the other, so one tile's temporaries are alive
        out = tf.while_loop(lambda index, *_: index < count, step, (tf.constant(0), *carry),
                            parallel_iterations=1, maximum_iterations=count)
        return tuple(out[1:])

    def rows(self, x: tf.Tensor, start: Any, size: int) -> tf.Tensor:
        rank = x.shape.rank
        begin = tf.stack([tf.cast(start, tf.int32)] + [tf.constant(0)] * (rank - 1))
        return tf.slice(x, begin, [size] + [-1] * (rank - 1))

    def write(self, buffer: tf.Tensor, start: Any, value: tf.Tensor) -> tf.Tensor:
        # (the default add reads the rows, adds and writes them here: the same sums as a
        # tensor_scatter_nd_add, one slice more per tile)
        rows = (tf.cast(start, tf.int32) + tf.range(value.shape[0]))[:, None]
        return tf.tensor_scatter_nd_update(buffer, rows, value)


_OPS, _EAGER, _GRAPH = _Ops(), _EagerOps(), _GraphOps()


class _ReplicaColumns(ReplicaCollective):
    """The replicas' collective as :func:`gradcache._loss_forms.forward_across` and
    ``backward_across`` use it: the reduce-scatter of ``dy`` takes ``ReplicaCollective``'s
    ``counts`` -- ``(this replica's columns, every replica's)`` -- and, traced, the gathered rows
    keep the static number the tiles are planned for (checked when the graph runs)."""

    def __init__(self, columns: int | None):
        super().__init__(replica_context())
        self.columns = columns
        self.traced = not tf.executing_eagerly() or self.world_size == 1

    def all_gather_rows(self, leaf: Any, counts: Any) -> Any:
        gathered = super().all_gather_rows(leaf, counts)  # TF gathers unequal rows as given
        if self.traced:
            gathered = tf.ensure_shape(gathered, [sum(counts), *leaf.shape[1:]])
        return gathered

    def reduce_scatter_rows(self, leaf: Any, counts: Any) -> Any:
        return super().reduce_scatter_rows(leaf, (self.columns, list(counts)))


class _AcrossRanks(AcrossRanks):
    """What :func:`across_ranks` returns: call it, inside ``strategy.run``, with this
    replica's rows."""

    @property
    def trainable_variables(self) -> list:
        """The trainable ``tf.Variable`` keyword arguments (a temperature): what
        :func:`gradcache_tf.cached_step` differentiates as the loss's own variables."""
        return [v for v in self.variables if v.trainable]

    @property
    def variables(self) -> list:
        return [value for value in self.loss_kwargs.values() if isinstance(value, tf.Variable)]

    def collective_for(self, x: Any, y: Any) -> ReplicaCollective:
        if tf.distribute.get_replica_context() is None:
            raise GradCacheError(f"{self!r} was called in a cross-replica context (inside "
                                 f"strategy.scope() but outside strategy.run); call it inside the "
                                 f"function that strategy.run runs on every replica")
        rows = _OPS.shape(y)[:1]
        return _ReplicaColumns(rows[0] if rows else None)

    # the loss runs its own Python loops and collectives: autograph must not rewrite them
    __call__ = tf.autograph.experimental.do_not_convert(AcrossRanks.__call__)


_DOCS = LossDocs(
    module=__name__,
    array_type=tf.Tensor,
    tensor="tensor",
    learnable="a ``tf.Variable``",
    log_scale="``tf.exp(log_scale)``",
    autodiff="autodiff",
    gradients="""
        A ``tf.custom_gradient`` function: ``tf.GradientTape`` gives the representations and a
        learnable variable their gradients. Eagerly the tiles are a Python loop; inside
        ``tf.function`` a ``tf.while_loop`` over tiles of one static shape, so the graph does not
        grow with the batch.
    """,
    rows=" (inside ``tf.function``, with a static ``B``)",
    unit="replica",
    ranks="a ``tf.distribute`` strategy's replicas",
    where="""
        , called inside ``strategy.run`` (``MirroredStrategy``, ``MultiWorkerMirroredStrategy``;
        the current replica context is the group),
    """,
    communicates="""
        all-gathers ``y`` (``B x d`` numbers) and every replica's row counts, and sums ``dy`` over
        replicas (MirroredStrategy has no reduce-scatter), plus scalars (and, for CLIP, one
        ``B``-vector per replica)
    """,
    specifics="""
        The replicas' encoder gradients therefore sum to the global batch's. A learnable
        temperature, scale or bias gets the *global* gradient on every replica: as the ``loss_fn``
        of ``cached_step(..., distributed=True)``, which passes each replica's own representations
        (``gathers_itself``), replica 0 alone carries it and the optimizer's sum over replicas is
        exact; in your own ``tf.GradientTape`` under ``strategy.run``, count it once yourself. A
        ``tf.Variable`` among the loss's arguments is the loss's own variable for ``cached_step``
        (``trainable_variables``); a scale computed from one (``tf.exp(log_scale)``) must be
        computed inside the loss: wrap it, ``def loss_fn(x, y): return across(x, y,
        logit_scale=tf.exp(log_scale))``, with ``loss_fn.gathers_itself = True``. Replicas may hold
        different numbers of rows; for ``info_nce`` each replica's ``y_local`` holds ``k + 1`` rows
        per local query, the same ``k`` everywhere.
    """,
    examples={
        "info_nce": """
            >>> import tensorflow as tf
            >>> from gradcache_tf.losses import info_nce, info_nce_dense
            >>> q = tf.random.stateless_normal((6, 4), seed=(0, 1), dtype=tf.float64)
            >>> # one hard negative per query
            >>> p = tf.random.stateless_normal((12, 4), seed=(0, 2), dtype=tf.float64)
            >>> loss = info_nce(q, p, temperature=0.1, tile_size=4)
            >>> abs(float(loss - info_nce_dense(q, p, temperature=0.1))) < 1e-12
            True
        """,
        "clip_loss": """
            >>> import tensorflow as tf
            >>> from gradcache_tf.losses import clip_loss
            >>> x = tf.random.stateless_normal((5, 3), seed=(0, 1))
            >>> y = tf.random.stateless_normal((5, 3), seed=(0, 2))
            >>> log_scale = tf.Variable(0.5)
            >>> with tf.GradientTape() as tape:
            ...     loss = clip_loss(x, y, logit_scale=tf.exp(log_scale), tile_size=2)
            >>> tape.gradient(loss, log_scale).shape
            TensorShape([])
        """,
        "siglip_loss": """
            >>> import tensorflow as tf
            >>> from gradcache_tf.losses import siglip_loss, siglip_loss_dense
            >>> x = tf.random.stateless_normal((5, 3), seed=(0, 1), dtype=tf.float64)
            >>> y = tf.random.stateless_normal((5, 3), seed=(0, 2), dtype=tf.float64)
            >>> abs(float(siglip_loss(x, y, tile_size=2) - siglip_loss_dense(x, y))) < 1e-12
            True
        """,
        "info_nce_dense": """
            >>> import tensorflow as tf
            >>> from gradcache_tf.losses import info_nce_dense
            >>> info_nce_dense(tf.eye(3), tf.eye(3), temperature=1.0).shape
            TensorShape([])
        """,
        "clip_loss_dense": """
            >>> import tensorflow as tf
            >>> from gradcache_tf.losses import clip_loss_dense
            >>> clip_loss_dense(tf.eye(3), tf.eye(3), logit_scale=1.0).shape
            TensorShape([])
        """,
        "siglip_loss_dense": """
            >>> import tensorflow as tf
            >>> from gradcache_tf.losses import siglip_loss_dense
            >>> siglip_loss_dense(tf.eye(3), tf.eye(3)).shape
            TensorShape([])
        """,
    },
)

(info_nce, clip_loss, siglip_loss, info_nce_dense, clip_loss_dense, siglip_loss_dense,
 across_ranks) = bind(_OPS, _DOCS, _AcrossRanks)
