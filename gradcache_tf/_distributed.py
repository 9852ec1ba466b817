"""The :class:`gradcache.Collective` over a ``tf.distribute`` replica context.

``cached_step(..., distributed=True)`` is called inside ``strategy.run`` (MirroredStrategy,
MultiWorkerMirroredStrategy): every replica runs pass 1 on its own rows, the core gathers every
replica's representations in replica order with ``ReplicaContext.all_gather``, takes the loss and
its gradient on the global batch, keeps this replica's rows and runs pass 2 locally.

Replicas may hold different numbers of rows: ``all_gather`` accepts shapes that differ along the
gathered axis, and :meth:`ReplicaCollective.row_counts` finds every replica's row count with one
more (tiny) all-gather per group. The offset of this replica's rows is then a tensor, so the same
code serves eager execution, ``tf.function`` (where the replica id is a tensor) and every replica
of a traced function.

``tf.distribute`` is SPMD here in the sense the core means (``agrees = False``): MirroredStrategy
runs its replicas as threads of one process and re-raises the first replica's error in the caller
without leaving the others waiting (checked in ``tests/tf/test_distributed.py``); a failing op at
run time fails the whole step. Across the workers of a MultiWorkerMirroredStrategy a worker that
raises leaves the others in their next collective until TensorFlow's own failure detection (the
coordination service) or ``CommunicationOptions(timeout_seconds=...)`` stops them.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from gradcache import GradCacheError
from gradcache._collective import Collective


def replica_context() -> tf.distribute.ReplicaContext:
    """The current replica context, or a ``GradCacheError`` explaining where to call the step."""
    context = tf.distribute.get_replica_context()
    if context is None:
        raise GradCacheError(
            "cached_step(..., distributed=True) was called in a cross-replica context (inside "
            "strategy.scope() but outside strategy.run); call it inside the function that "
            "strategy.run runs on every replica")
    return context


class ReplicaCollective(Collective):
    """One replica's view of a ``tf.distribute`` step (see the module docstring).

    ``grad_scale`` is 1: Keras optimizers *sum* the gradients of the replicas in
    ``apply_gradients``, so each replica pulls back the plain gradient of its own rows and the sum
    over replicas is the global-batch gradient.
    """

    agrees = False
    grad_scale = 1.0

    def __init__(self, context: tf.distribute.ReplicaContext | None = None):
        self.context = context if context is not None else replica_context()
        self.world_size = int(self.context.num_replicas_in_sync)
        replica = self.context.replica_id_in_sync_group
        static = tf.get_static_value(replica) if isinstance(replica, tf.Tensor) else replica
        self.replica = int(static) if static is not None else replica   # int, or an int32 tensor
        self.rank = self.replica

    # -- helpers ------------------------------------------------------------------------------------
    def is_first(self) -> Any:
        """True on replica 0 (a Python bool, or a boolean tensor inside ``tf.function``)."""
        if isinstance(self.replica, int):
            return self.replica == 0
        return tf.equal(self.replica, 0)

    def _offset(self, counts: Any) -> Any:
        """The first row of this replica in the global layout, from every replica's row count."""
        if isinstance(self.replica, int) and not isinstance(counts, tf.Tensor):
            return sum(counts[:self.replica])
        counts = tf.convert_to_tensor(counts, tf.int32)
        before = tf.range(self.world_size) < tf.cast(self.replica, tf.int32)
        return tf.reduce_sum(tf.where(before, counts, tf.zeros_like(counts)))

    @staticmethod
    def _rows_from(leaf: tf.Tensor, offset: Any, shape: tf.TensorShape) -> tf.Tensor:
        if isinstance(offset, int) and shape[0] is not None:
            return leaf[offset:offset + shape[0]]
        size = shape[0] if shape[0] is not None else -1
        if size == -1:
            raise GradCacheError("cannot take this replica's rows: its row count is not static")
        begin = tf.concat([tf.reshape(tf.cast(offset, tf.int32), [1]),
                           tf.zeros([shape.rank - 1], tf.int32)], 0)
        rows = tf.slice(leaf, begin, [size] + [-1] * (shape.rank - 1))
        return tf.ensure_shape(rows, shape) if shape.is_fully_defined() else rows

    # -- the protocol -------------------------------------------------------------------------------
    def every_shape(self, shape: Any) -> list[Any]:
        """Eagerly, every replica's ``shape`` (nested ints), gathered: replicas may differ. Inside
        ``tf.function`` shapes are planned statically, so this replica's stands for all of them
        (a replica that differs fails the gathered rows' shape check when the graph runs)."""
        if self.world_size == 1 or not tf.executing_eagerly():
            return [shape] * self.world_size
        flat = tf.nest.flatten(shape)
        every = tf.get_static_value(self.context.all_gather(tf.constant([flat], tf.int64), axis=0))
        return [tf.nest.pack_sequence_as(shape, [int(v) for v in row]) for row in every]

    def row_counts(self, rows: int | None) -> tuple[int | None, Any]:
        """``(this replica's static rows, every replica's rows)``: the ``counts`` of one group."""
        if self.world_size == 1:
            return rows, [rows]
        return rows, self.context.all_gather(tf.constant([rows], tf.int32), axis=0)

    def all_gather_rows(self, leaf: Any, counts: Any) -> Any:   # (rows, every rank's rows)
        leaf = tf.convert_to_tensor(leaf)
        if leaf.shape.rank is None or leaf.shape[0] is None:
            raise GradCacheError(
                f"a distributed step needs representations with a static number of rows; got "
                f"shape {leaf.shape}")
        if self.world_size == 1:
            return leaf
        gathered = self.context.all_gather(leaf, axis=0)
        # all_gather forgets the static shape inside tf.function; keep what every replica shares
        return tf.ensure_shape(gathered, [None, *leaf.shape[1:]])

    def local_rows(self, leaf: Any, counts: Any) -> Any:   # (rows, every rank's rows)
        leaf = tf.convert_to_tensor(leaf)
        if self.world_size == 1:
            return leaf
        rows, every = counts
        return self._rows_from(leaf, self._offset(every), tf.TensorShape([rows, *leaf.shape[1:]]))

    def reduce_scatter_rows(self, leaf: Any, counts: Any) -> Any:   # (rows, every rank's rows)
        # MirroredStrategy has no reduce-scatter of its own: sum everywhere, keep this replica's rows
        return self.local_rows(self.all_reduce_sum(tf.convert_to_tensor(leaf)), counts)

    def all_reduce_sum(self, value: Any) -> Any:
        if self.world_size == 1:
            return value
        return self.context.all_reduce(tf.distribute.ReduceOp.SUM, value)
