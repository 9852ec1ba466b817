"""The TensorFlow side of ``gradcache bench``: the encoder, the two steps, their measurement jobs.

Both steps run inside ``tf.function`` and return ``(loss, grads)``: the cached one is
``gradcache_tf.cached_step``, the full-batch one a ``GradientTape`` over the whole batch, both with
the library's tiled InfoNCE (``gradcache_tf.losses.info_nce``); ``cached_dense`` is the cached step
with the dense ``B x B`` loss, for contrast. The
encoder is a ``tf.Module`` holding plain variables (no Keras, whose import would double each probe's
start-up). A ``tf.function`` traces once per input shape, so each probe warms up at the very batch
it measures: the trace and graph optimisation are then paid before the measured step. Memory is
read from TensorFlow's own CPU allocator where it keeps statistics (see :func:`memory`), else from
the resident set. Imported only in a child process (:mod:`gradcache_cli.bench.child`).
"""

from __future__ import annotations

import os
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402 - the log level must be set before the import

import gradcache_tf  # noqa: E402
from gradcache_cli import tf_memory  # noqa: E402
from gradcache_cli.bench.model import (  # noqa: E402
    SCALE,
    TIMED,
    init_weights,
    time_interleaved,
    token_batch,
)
from gradcache_tf import losses as tiled_losses  # noqa: E402


class Encoder(tf.Module):
    """Embedding, residual position-wise MLP blocks, mean pooling, projection (see _bench_model)."""

    def __init__(self, model: dict):
        super().__init__(name="bench_encoder")
        self.blocks = model["blocks"]
        self.weights = {name: tf.Variable(value, name=name)
                        for name, value in init_weights(model).items()}

    def __call__(self, ids: tf.Tensor) -> tf.Tensor:
        w = self.weights
        x = tf.gather(w["embed"], ids)
        for i in range(self.blocks):
            hidden = tf.nn.gelu(tf.matmul(x, w[f"w1_{i}"]) + w[f"b1_{i}"], approximate=False)
            x = x + tf.matmul(hidden, w[f"w2_{i}"]) + w[f"b2_{i}"]
        return tf.matmul(tf.reduce_mean(x, axis=1), w["w_out"]) + w["b_out"]


def info_nce(q: tf.Tensor, p: tf.Tensor) -> tf.Tensor:
    scores = SCALE * tf.matmul(tf.math.l2_normalize(q, axis=1), tf.math.l2_normalize(p, axis=1),
                               transpose_b=True)
    labels = tf.range(tf.shape(q)[0])
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, scores))

def info_nce_tiled(q: tf.Tensor, p: tf.Tensor) -> tf.Tensor:
    """The same InfoNCE by the library's tiled loss: no ``B x B`` score matrix is ever held."""
    return tiled_losses.info_nce(q, p, temperature=1 / SCALE, similarity="cosine")


def _steps(model: dict, chunk: int) -> dict:
    encoder = Encoder(model)

    @tf.function
    def cached(q: tf.Tensor, p: tf.Tensor) -> Any:
        return gradcache_tf.cached_step(encoder, (q, p), info_nce_tiled, chunk_size=chunk)

    @tf.function
    def cached_dense(q: tf.Tensor, p: tf.Tensor) -> Any:
        return gradcache_tf.cached_step(encoder, (q, p), info_nce, chunk_size=chunk)

    @tf.function
    def full(q: tf.Tensor, p: tf.Tensor) -> Any:
        with tf.GradientTape() as tape:
            loss = info_nce_tiled(encoder(q), encoder(p))
        return loss, tape.gradient(loss, encoder.trainable_variables)

    return {"cached": cached, "cached_dense": cached_dense, "full": full}


def _run_once(step: Any, q: tf.Tensor, p: tf.Tensor) -> None:
    loss, grads = step(q, p)
    # Reading every result waits for the step to finish; the results are dropped on return.
    loss.numpy()
    for grad in grads:
        tf.convert_to_tensor(grad).numpy()


def _batch(model: dict, rows: int) -> tuple[tf.Tensor, tf.Tensor]:
    return tuple(tf.constant(ids) for ids in token_batch(model, rows))


def _threads(payload: dict) -> None:
    if payload.get("threads"):
        tf.config.threading.set_intra_op_parallelism_threads(int(payload["threads"]))
        tf.config.threading.set_inter_op_parallelism_threads(int(payload["threads"]))


def memory(payload: dict) -> dict:
    """One step of ``payload["kind"]`` at ``payload["batch"]`` rows: its peak memory growth.

    Measured by :func:`gradcache_cli.tf_memory.step_peak`: TensorFlow's CPU allocator statistics
    where it keeps them (oneDNN on: a pooling allocator that keeps what it once held, so after a
    warm-up at the same shape -- needed, or the trace would be measured -- resident memory no longer
    moves), else resident-memory growth (a plain allocator that returns memory), as for torch.
    """
    _threads(payload)
    model = payload["model"]
    step = _steps(model, payload["chunk"])[payload["kind"]]
    q, p = _batch(model, payload["batch"])

    def once() -> None:
        _run_once(step, q, p)

    return tf_memory.step_peak(once, once, payload["budget"])


def time(payload: dict) -> dict:
    """Median step times of both steps at each batch in ``payload["batches"]``, interleaved."""
    _threads(payload)
    model, chunk = payload["model"], payload["chunk"]
    rows_out = []
    for rows in payload["batches"]:
        steps = _steps(model, chunk)
        q, p = _batch(model, rows)

        def run(step: Any, q: Any = q, p: Any = p) -> Any:
            return lambda: _run_once(step, q, p)

        medians = time_interleaved({name: run(steps[name]) for name in TIMED},
                                   payload["repeats"])
        rows_out.append({"batch": rows, "chunk": chunk, **medians})
    return {"version": tf.__version__, "rows": rows_out}
