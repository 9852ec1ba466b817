"""Keras integration: ``GradCacheModel``, a ``keras.Model`` whose ``fit`` takes gradient-cached steps.

A contrastive model in Keras is a few encoders and a loss over their representations. This module
wraps them in a model whose ``train_step`` is an ordinary Keras one around
:func:`gradcache_tf.cached_loss` (a ``GradientTape``, the optimizer's loss scale, ``apply_gradients``), so ``model.fit(dataset)`` trains with a
contrastive batch larger than memory. It imports Keras (TensorFlow backend) and must stay a thin
shell over ``cached_loss``: no gradient logic of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import keras
import tensorflow as tf

from gradcache import GradCacheError
from gradcache_tf._loss import cached_loss

if keras.backend.backend() != "tensorflow":  # pragma: no cover - depends on the environment
    raise ImportError(f"GradCacheModel needs Keras on the TensorFlow backend, found "
                      f"{keras.backend.backend()!r}; set KERAS_BACKEND=tensorflow")


class GradCacheModel(keras.Model):
    """A Keras model that trains encoders with a gradient-cached contrastive loss.

    Each dataset element is the tuple of input groups the encoders take, e.g. ``(queries,
    passages)`` (each a tensor or a nested dict/tuple of tensors), or a dict
    ``{"groups": (queries, passages), **loss_kwargs}`` when the loss needs more (labels); arrays
    work too: ``fit(x=(queries, passages), batch_size=...)``. Batch with ``drop_remainder=True``
    (arrays: a row count that ``batch_size`` divides): chunks are planned when Keras traces the
    step, which needs a static batch size. ``evaluate`` computes the same loss chunk by chunk,
    without dropout and without gradients.

    The training step is an ordinary Keras one around :func:`gradcache_tf.cached_loss` (the
    recipe for your own ``train_step`` is in ``docs/tf.md``). ``compile`` takes an optimizer
    only: a ``loss`` or compiled ``metrics`` are refused (the loss is ``loss_fn``; a contrastive
    batch has no targets), not dropped. The model is not saved whole (``loss_fn`` is code): save
    the encoders, or ``save_weights`` and load them into a model built the same way.

    Args:
        encoders: one encoder (a Keras layer or model) shared by every group, or one per group.
        loss_fn: ``loss_fn(*reps, **loss_kwargs)`` returning a scalar; a Keras layer's weights (a
            learnable temperature) are trained with the encoders.
        chunk_size: rows per chunk (one int or one per group); bounds memory only.
        get_rep: picks the representation from an encoder's output (one or one per group).
        step_options: more keyword arguments for :func:`gradcache_tf.cached_loss`
            (``check_finite``, ``random_state``, ...).
        **kwargs: passed to ``keras.Model`` (``name``, ``dtype``).

    Compile with an optimizer only (the loss is ``loss_fn``); under the ``mixed_float16`` policy
    Keras wraps it in a ``LossScaleOptimizer``, whose scale the step applies once. Built under
    a ``tf.distribute`` strategy's ``scope()``, ``fit`` takes distributed steps: the loss sees the
    global batch (every replica's rows), exactly as on one device (``step_options={"distributed":
    False}`` gives each replica its own contrastive batch instead).

    >>> import numpy as np, keras, tensorflow as tf
    >>> from gradcache_tf import GradCacheModel
    >>> encoder = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    >>> def info_nce(q, p):
    ...     scores = tf.matmul(q, p, transpose_b=True)
    ...     labels = tf.range(tf.shape(q)[0])
    ...     return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, scores))
    >>> model = GradCacheModel(encoder, info_nce, chunk_size=4)
    >>> model.compile(optimizer="sgd")
    >>> pairs = np.random.default_rng(0).normal(size=(2, 64, 8)).astype("float32")
    >>> data = tf.data.Dataset.from_tensor_slices((pairs[0], pairs[1])).batch(32, drop_remainder=True)
    >>> history = model.fit(data, epochs=1, verbose=0, shuffle=False)
    >>> sorted(history.history)
    ['loss']
    """

    def __init__(self, encoders: Any, loss_fn: Callable, *, chunk_size: int | Sequence[int],
                 get_rep: Callable | Sequence | None = None, step_options: Mapping | None = None,
                 **kwargs: Any):
        super().__init__(**kwargs)
        # Attributes Keras tracks: the encoders' and a Keras loss layer's weights become ours.
        self.encoders = list(encoders) if isinstance(encoders, (list, tuple)) else encoders
        self.contrastive_loss = loss_fn
        self.chunk_size = chunk_size
        self.get_rep = get_rep
        self.step_options = dict(step_options or {})
        self.loss_tracker = keras.metrics.Mean(name="loss")
        # No weights of its own; "built" stops Keras from tracing call() on a partial batch.
        self.built = True

    @property
    def metrics(self) -> list:
        return [self.loss_tracker]

    def _groups(self, data: Any) -> tuple[Sequence, dict]:
        if isinstance(data, Mapping):
            if "groups" not in data:
                raise GradCacheError(
                    f"a dict batch must hold the input groups under 'groups' (and loss keyword "
                    f"arguments under other keys); got keys {sorted(data)}")
            rest = {k: v for k, v in data.items() if k != "groups"}
            return tuple(data["groups"]), rest
        if isinstance(data, (list, tuple)):
            if len(data) == 1 and isinstance(data[0], (list, tuple, Mapping)):
                # fit(x=(queries, passages)) with arrays: Keras hands the step (x,)
                return self._groups(data[0])
            return tuple(data), {}
        raise GradCacheError(f"each batch must be a tuple of input groups such as (queries, "
                             f"passages), got {type(data).__name__}")

    def _encoder_for(self, group: int) -> Any:
        if not isinstance(self.encoders, list):
            return self.encoders
        if group >= len(self.encoders):
            raise GradCacheError(f"got more input groups than the {len(self.encoders)} encoders")
        return self.encoders[group]

    def _pick(self, group: int) -> Callable:
        get_rep: Any = self.get_rep
        if isinstance(get_rep, (list, tuple)):
            return get_rep[group]
        return get_rep or (lambda output: output)

    def call(self, inputs: Any, training: bool = False) -> tuple:
        """The full-batch representations of each group (no chunking), e.g. for inference."""
        groups, _ = self._groups(inputs)
        return tuple(self._pick(g)(self._encoder_for(g)(x, training=training))
                     for g, x in enumerate(groups))

    def train_step(self, data: Any) -> dict:
        groups, loss_kwargs = self._groups(data)
        options = dict(self.step_options)
        # Under strategy.scope() Keras runs this on every replica with its share of the batch:
        # take one step over the global batch (the optimizer sums the replicas' shares).
        options.setdefault("distributed", tf.distribute.has_strategy()
                           and not tf.distribute.in_cross_replica_context())
        if options["distributed"] and loss_kwargs:
            raise GradCacheError(
                f"a distributed fit gives each replica its own rows of the loss keyword arguments "
                f"({sorted(loss_kwargs)}), but the loss sees the global batch; write the training "
                f"step yourself and gather them (ReplicaContext.all_gather), or pass "
                f"step_options={{'distributed': False}} for per-replica contrastive batches")
        # An ordinary Keras train_step around cached_loss: the LossScaleOptimizer's scale is
        # applied once, here, as Keras does (cached_loss takes the optimizer only to keep float16
        # representation gradients in range, and divides its scale back out).
        with tf.GradientTape() as tape:
            loss = cached_loss(
                self.encoders, groups, self.contrastive_loss, chunk_size=self.chunk_size,
                variables=lambda: self.trainable_variables, get_rep=self.get_rep,
                loss_kwargs=loss_kwargs or None, optimizer=self.optimizer, **options)
            scaled = self.optimizer.scale_loss(loss)
        variables = self.trainable_variables
        grads = tape.gradient(scaled, variables)
        self.optimizer.apply_gradients(
            [(grad, variable) for grad, variable in zip(grads, variables, strict=True)
             if grad is not None])
        self.loss_tracker.update_state(loss)
        return {"loss": self.loss_tracker.result()}

    def compile(self, optimizer: Any = "rmsprop", loss: Any = None, metrics: Any = None,
                weighted_metrics: Any = None, **kwargs: Any) -> None:
        """Keras' ``compile`` with an optimizer only: the loss is ``loss_fn``, and a contrastive
        batch has no targets for compiled metrics to compare with. Anything else is refused
        rather than silently dropped; track metrics of the representations in a callback."""
        given = [name for name, value in (("loss", loss), ("metrics", metrics),
                                          ("weighted_metrics", weighted_metrics))
                 if value not in (None, [], {})]
        if given:
            raise GradCacheError(
                f"GradCacheModel.compile takes an optimizer only, got {', '.join(given)}: the "
                f"loss is the loss_fn given to GradCacheModel (reported as 'loss'), and a "
                f"contrastive batch has no targets for compiled metrics; compute other metrics "
                f"from model(...) in a callback")
        super().compile(optimizer=optimizer, **kwargs)

    def get_config(self) -> dict:
        raise GradCacheError(
            "GradCacheModel is a training wrapper and is not saved as a whole (its loss_fn is "
            "Python code); save what it trains: the encoders (encoder.save('encoder.keras')), or "
            "this model's weights (model.save_weights('gc.weights.h5'), loaded into a "
            "GradCacheModel built the same way)")

    def test_step(self, data: Any) -> dict:
        groups, loss_kwargs = self._groups(data)
        options = dict(self.step_options)
        options.setdefault("distributed", tf.distribute.has_strategy()
                           and not tf.distribute.in_cross_replica_context())
        if loss_kwargs:   # per-replica keyword rows: each replica its own batch, as in training
            options["distributed"] = False
        # no tape: the loss alone, chunk by chunk (memory bounded as in training), no dropout
        loss = cached_loss(self.encoders, groups, self.contrastive_loss, chunk_size=self.chunk_size,
                           get_rep=self.get_rep, loss_kwargs=loss_kwargs or None, training=False,
                           variables=lambda: self.trainable_variables, **options)
        self.loss_tracker.update_state(loss)
        return {"loss": self.loss_tracker.result()}
