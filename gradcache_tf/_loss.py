"""``cached_loss`` for TensorFlow: a loss recorded on the caller's ``tf.GradientTape``.

The loss is a ``tf.custom_gradient`` of no inputs whose forward runs the first half of the core's
schedule (:func:`gradcache.cached_forward`: pass 1 with no tape recording, the loss, the loss-owned
variables' gradient into the backend's accumulator) and whose gradient function runs the second
(:func:`gradcache.cached_backward`: pass 2, everything times the incoming gradient) and hands the
accumulator back in the order of the variables TensorFlow asks about. Nothing of the algorithm is
here: the same two core functions make ``cached_step``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import tensorflow as tf
from tensorflow.python.eager import record  # could_possibly_record: is any tape recording?
from tensorflow.python.eager import tape as tape_lib  # variable_accessed (private, stable)

from gradcache import cached_backward, cached_forward
from gradcache_tf import _rng
from gradcache_tf._backend import first_order_only
from gradcache_tf._step import Setup, errors_through_autograph

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from gradcache import StepKeywords


@tf.autograph.experimental.do_not_convert
def cached_loss(encoders: Any, inputs: Sequence, loss_fn: Callable, *,
                chunk_size: int | Sequence[int], variables: Sequence[Any] | Callable | None = None,
                training: bool | None = True, optimizer: Any = None,
                random_state: Sequence[Any] = (), check_random: bool = True,
                graph_loop: bool = True, **options: Unpack[StepKeywords]) -> tf.Tensor:
    """The contrastive loss of a batch larger than memory, differentiable by ``tf.GradientTape``.

    Runs pass 1 (every chunk encoded with no tape recording) and the loss, and returns the scalar
    loss recorded on the caller's tape. ``tape.gradient(loss, variables)`` -- or the gradient of
    anything computed from it: ``optimizer.scale_loss(loss)``, ``loss / steps``, a sum with other
    terms -- then runs pass 2, with the incoming gradient scaling everything, and gives exactly
    what the same tape would give for the full-batch loss, with the same random masks as a
    chunk-by-chunk forward. It works eagerly and inside ``tf.function`` (a Keras ``train_step``).

    The arguments are :func:`gradcache_tf.cached_step`'s, with these differences:

    * ``variables``: what pass 2 pulls gradients back into (default: the trainable variables of
      the encoders and the loss, found after pass 1). ``tape.gradient`` gets the cached gradient
      for each of them and ``None`` for any other variable (the inputs get none either).
    * ``optimizer``: optional. With a ``keras.optimizers.LossScaleOptimizer`` the representations'
      gradients are taken of the scaled loss, so that float16 ones keep their precision; the
      result is still the gradient of what you differentiate (scale the loss yourself with
      ``optimizer.scale_loss(loss)`` inside the tape, as Keras' own ``train_step`` does: the
      scale is applied once).
    * Outside any ``GradientTape`` (an evaluation loop) only the loss is taken: no pass 2, no
      gradient held.

    The forward holds, until the gradient is taken, each chunk's random state and the
    representations' gradients (no activations). The gradient can be taken once: a second
    ``tape.gradient`` through the same loss (a persistent tape) raises ``GradCacheError``, and
    so does a loss with no gradient path (one that stops the representations' gradient or is
    integer-valued), at the call. A failure in pass 2 raises from ``tape.gradient``; nothing has
    been applied then, and the random streams are where the forward left them (inside
    ``tf.function``: for a failed check). The gradient is first-order only: a tape that
    differentiates it raises ``LookupError``. Do not change the variables between the call and
    ``tape.gradient``: pass 2 would use the new values (``check_determinism=True`` catches it).

    >>> import tensorflow as tf
    >>> from gradcache_tf import cached_loss
    >>> encoder = tf.keras.layers.Dense(4)
    >>> queries, passages = tf.random.normal((16, 8)), tf.random.normal((16, 8))
    >>> def info_nce(q, p):
    ...     scores = tf.matmul(q, p, transpose_b=True)
    ...     labels = tf.range(tf.shape(q)[0])
    ...     return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, scores))
    >>> with tf.GradientTape() as tape:
    ...     loss = cached_loss(encoder, (queries, passages), info_nce, chunk_size=4)
    ...     total = loss / 2 + 1e-4 * tf.reduce_sum(encoder.kernel ** 2)  # any function of it
    >>> grads = tape.gradient(total, encoder.trainable_variables)
    >>> [g.shape.as_list() for g in grads]
    [[8, 4], [4]]
    >>> _ = tf.keras.optimizers.SGD(0.1).apply_gradients(zip(grads, encoder.trainable_variables))
    """
    with errors_through_autograph():
        setup = Setup(encoders, inputs, loss_fn, options, entry="cached_loss",
                      variables=variables, training=training, optimizer=optimizer,
                      random_state=random_state, check_random=check_random, graph_loop=graph_loop)
        return _cached_loss(encoders, loss_fn, chunk_size, setup)


def _cached_loss(encoders: Any, loss_fn: Callable, chunk_size: Any, setup: Setup) -> tf.Tensor:
    backend = setup.backend

    def forward(differentiate: bool) -> Any:
        with backend.transaction():
            return cached_forward(backend, encoders, setup.inputs, loss_fn, chunk_size=chunk_size,
                                  collective=setup.collective, differentiate=differentiate,
                                  **setup.keywords)

    if not record.could_possibly_record():   # no tape: an evaluation, the loss alone
        return forward(False).loss

    @tf.custom_gradient
    def gradcache_loss() -> tuple[tf.Tensor, Callable]:
        state = forward(True)
        # the loss depends on these: tell custom_gradient's watcher and the caller's tape (pass 1
        # read them with recording stopped)
        for variable in backend.tf_variables:
            tape_lib.variable_accessed(variable)
        loss = state.loss
        # the representations' gradients are of the scaled loss (see optimizer=): divide it out
        scale = None if backend.loss_scale is None else backend.loss_scale(tf.ones((), tf.float32))
        slot_of = {id(v): slot for slot, v in enumerate(backend.tf_variables)}

        def grad_fn(upstream: tf.Tensor, variables: Sequence | None = None) -> Any:
            factor = upstream
            if scale is not None:   # in float32 at least: 1 / 2**15 is subnormal in float16
                wide = tf.float64 if upstream.dtype == tf.float64 else tf.float32
                factor = tf.cast(upstream, wide) / tf.cast(scale, wide)
            # a failure puts the random streams back; it reaches the caller's tape.gradient,
            # inside tf.function too
            with errors_through_autograph(), backend.transaction():
                grads = cached_backward(state, factor)
            wanted = [slot_of.get(id(_rng.as_tf_variable(v))) for v in variables or ()]
            found = first_order_only(
                [None if slot is None or slot not in backend.touched else grads[slot]
                 for slot in wanted], [_rng.as_tf_variable(v) for v in variables or ()])
            return ([], found) if variables else []

        return tf.identity(loss), grad_fn

    return gradcache_loss()
