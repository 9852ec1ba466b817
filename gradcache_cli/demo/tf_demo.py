"""The demo's TensorFlow backend: the bag model in Keras 3, its steps inside ``tf.function``, memory.

The model is :mod:`gradcache_cli.demo.torch_demo`'s ``bag`` model as two Keras models: hashed word
pieces (see :mod:`gradcache_cli.demo.tokenizer`) looked up in one ``Embedding`` layer shared by the
query and code towers, attention-pooled per tower, passed through a residual projection and
normalised. It trains with the same InfoNCE loss (cosine similarity times 20, cross-entropy against
the diagonal) and Keras' Adam. The large-batch step is ``gradcache_tf.cached_step`` inside a
``tf.function``; the small-batch comparison takes plain ``tf.GradientTape`` steps. Memory is
measured as for torch, each step in a fresh process (:mod:`gradcache_cli.memory`), but read from
TensorFlow's CPU allocator where it keeps statistics (its peak counts the step's buffers exactly),
else from resident memory (:mod:`gradcache_cli.tf_memory`). The runner
(:mod:`gradcache_cli.demo.runner`) owns the story and the printing; this module only knows
TensorFlow. Run as ``python -m gradcache_cli.demo.tf_demo --probe JSON`` it is the child process
that measures one step's memory.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

# Before TensorFlow loads: its C++ start-up notices (oneDNN, CPU features) would bury the report,
# and Keras must run on TensorFlow for gradcache_tf.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from gradcache_cli import memory, tf_memory  # noqa: E402
from gradcache_cli.demo import tokenizer  # noqa: E402
from gradcache_cli.demo.data import Pair  # noqa: E402
from gradcache_tf import cached_step  # noqa: E402

SCALE = 20.0  # cosine similarities times 20: sentence-transformers' MultipleNegativesRankingLoss


def memory_how(mode: str) -> str | None:
    """How the runner should name what ``step_memory(args, mode)`` returns (None: its default).

    The probes inherit this process's environment, so they read memory the way it would here.
    """
    if mode != "measure":
        return None
    if tf_memory.allocator_stats_available():
        return ("measured: peak of TensorFlow's CPU allocator during one step in tf.function, "
                "after a warm-up call, each in a fresh process")
    return ("measured: peak resident memory growth during one step in tf.function, after a "
            "warm-up call, each in a fresh process; TensorFlow's plain CPU allocator keeps no "
            "statistics here")


EMBED_BLOCK = 1024  # rows embedded per call at evaluation
PROBE_ROWS = 1024  # rows of the eager forward whose tape the computed breakdown measures


def setup(args: argparse.Namespace) -> str:
    """Sets TensorFlow's CPU threads; returns a short description of the framework for the header."""
    if args.threads:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(args.threads)
            tf.config.threading.set_inter_op_parallelism_threads(args.threads)
        except RuntimeError:
            pass  # the runtime already started in this process (tests): its threads stay as they are
    threads = tf.config.threading.get_intra_op_parallelism_threads() or os.cpu_count() or 1
    return (f"tensorflow {tf.__version__}, keras {keras.__version__}, tf.function, {threads} CPU "
            f"thread{'s' if threads > 1 else ''}")


def info_nce(queries: tf.Tensor, answers: tf.Tensor) -> tf.Tensor:
    """InfoNCE with in-batch negatives over normalised vectors: row ``i`` should pick answer ``i``.

    >>> q = tf.eye(3)
    >>> float(info_nce(q, q)) < 1e-6
    True
    """
    scores = SCALE * tf.matmul(queries, answers, transpose_b=True)
    labels = tf.range(tf.shape(scores)[0])
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, scores))


# -- the bag model ------------------------------------------------------------------------------------

class BagFeatures(NamedTuple):
    """Token ids of every pair, ``(n, length)`` int32 numpy arrays padded with 0."""

    queries: np.ndarray
    code: np.ndarray


class BagTower(keras.Model):
    """One tower: attention-pooled embeddings of hashed word pieces, projected and normalised.

    The embedding layer is shared between towers (passed in); the pooling scores, which learn
    which pieces matter (an IDF learned for the task), and the projection are per tower.
    """

    def __init__(self, table: keras.layers.Embedding, dim: int, dropout: float, seed: int,
                 **kwargs: Any):
        super().__init__(**kwargs)
        self.table = table
        # Start from a plain average of the pieces and an identity map: before training the model is
        # a random-projection bag of words, a lexical-overlap baseline rather than noise.
        self.score = keras.layers.Dense(1, kernel_initializer="zeros", bias_initializer="zeros")
        self.proj = keras.layers.Dense(dim, kernel_initializer="zeros", bias_initializer="zeros")
        self.dropout = dropout
        # A Keras seed generator on the layer: gradcache_tf finds it and replays its draws in pass 2.
        self.seed_generator = keras.random.SeedGenerator(seed) if dropout > 0 else None

    def call(self, ids: tf.Tensor, training: bool = False) -> tf.Tensor:
        mask = tf.not_equal(ids, tokenizer.PAD)
        # Trailing columns that no row uses are dropped: most snippets are far shorter than the cap.
        width = tf.maximum(tf.reduce_max(tf.reduce_sum(tf.cast(mask, tf.int32), axis=1)), 1)
        ids, mask = ids[:, :width], mask[:, :width]
        if training and self.dropout > 0:
            # Piece dropout; a row keeps its first piece so that no row is left empty.
            keep = keras.random.uniform(tf.shape(ids), seed=self.seed_generator) >= self.dropout
            first = tf.one_hot(tf.zeros(tf.shape(ids)[:1], tf.int32), tf.shape(ids)[1],
                               on_value=True, off_value=False)
            mask = mask & (keep | first)
        vectors = self.table(ids)
        scores = tf.where(mask, tf.squeeze(self.score(vectors), -1), -math.inf)
        weights = tf.nn.softmax(scores, axis=-1)
        pooled = tf.einsum("nl,nld->nd", weights, vectors)
        return tf.math.l2_normalize(pooled + self.proj(pooled), axis=-1, epsilon=1e-24)


class BagModel:
    """The from-scratch dual encoder, its optimizer and its two kinds of step."""

    scale = SCALE

    def __init__(self, args: argparse.Namespace, seed: int, lr: float):
        table = keras.layers.Embedding(
            args.buckets, args.dim,
            embeddings_initializer=keras.initializers.RandomNormal(stddev=1 / math.sqrt(args.dim),
                                                                   seed=seed))
        self.query_tower = BagTower(table, args.dim, args.dropout, seed + 1)
        self.code_tower = BagTower(table, args.dim, args.dropout, seed + 2)
        # Built now, on one row each, so that every variable exists before the first step and the
        # optimizer serves one fixed list of them.
        for tower in self.encoders():
            tower(tf.ones((1, 1), tf.int32))
        table.embeddings.assign(tf.tensor_scatter_nd_update(
            table.embeddings, [[tokenizer.PAD]], tf.zeros((1, args.dim))))
        self.variables = _unique_variables(*self.encoders())
        # torch.optim.Adam's defaults (Keras' own epsilon is 1e-7): the same update in every backend.
        self.optimizer = keras.optimizers.Adam(lr, beta_1=0.9, beta_2=0.999, epsilon=1e-8)
        self.optimizer.build(self.variables)
        # One traced graph per kind of step and per batch shape (the last batch of an epoch is
        # shorter: one more trace).
        self._cached = tf.function(self._cached_step)
        self._plain = tf.function(self._plain_step)
        self._embed = tf.function(lambda q, c: (self.query_tower(q, training=False),
                                                self.code_tower(c, training=False)))
        count = sum(int(np.prod(v.shape)) for v in self.variables)
        self.description = (f"bag of hashed word pieces, {args.buckets} buckets x {args.dim} dims "
                            f"shared by both towers, attention pooling; {count / 1e6:.1f}M "
                            f"parameters, trained from scratch with Adam (Keras)")

    def encoders(self) -> tuple[BagTower, BagTower]:
        return self.query_tower, self.code_tower

    def _apply(self, grads: list) -> None:
        # Dense gradients, as torch's nn.Embedding gives: Adam then decays the moments of every
        # row at every step, the same update rule in all three backends.
        self.optimizer.apply_gradients(
            [(tf.convert_to_tensor(g), v) for g, v in zip(grads, self.variables, strict=True)])

    def _cached_step(self, queries: tf.Tensor, code: tf.Tensor, chunk: int) -> tf.Tensor:
        loss, grads = cached_step(self.encoders(), (queries, code), info_nce, chunk_size=chunk,
                                  variables=self.variables)
        self._apply(grads)
        return loss

    def _plain_step(self, queries: tf.Tensor, code: tf.Tensor) -> tf.Tensor:
        loss, grads = full_gradients(self, queries, code)
        self._apply(grads)
        return loss

    def embed(self, features: BagFeatures) -> tuple[np.ndarray, np.ndarray]:
        out_q, out_c = [], []
        for start in range(0, len(features.queries), EMBED_BLOCK):
            eq, ec = self._embed(tf.constant(features.queries[start:start + EMBED_BLOCK]),
                                 tf.constant(features.code[start:start + EMBED_BLOCK]))
            out_q.append(eq.numpy().astype(np.float64))
            out_c.append(ec.numpy().astype(np.float64))
        return np.concatenate(out_q), np.concatenate(out_c)

    def step(self, features: BagFeatures, rows: np.ndarray, chunk_size: int | None) -> float:
        queries = tf.constant(features.queries[rows])
        code = tf.constant(features.code[rows])
        if chunk_size is None:
            return float(self._plain(queries, code))
        return float(self._cached(queries, code, min(chunk_size, len(rows))))


def full_gradients(model: BagModel, queries: tf.Tensor, code: tf.Tensor) -> tuple[tf.Tensor, list]:
    """Loss and gradients of the whole batch at once: the plain, uncached step."""
    with tf.GradientTape() as tape:
        loss = info_nce(model.query_tower(queries, training=True),
                        model.code_tower(code, training=True))
    return loss, tape.gradient(loss, model.variables)


def _unique_variables(*models: keras.Model) -> list:
    seen: dict[int, Any] = {}
    for model in models:
        for variable in model.trainable_variables:
            seen.setdefault(id(variable), variable)
    return list(seen.values())


# -- the runner's entry points ----------------------------------------------------------------------

def prepare(args: argparse.Namespace, pairs: Sequence[Pair]) -> BagFeatures:
    """The model's view of ``pairs``: token-id arrays (int32, what Keras' Embedding looks up)."""
    tok = tokenizer.HashTokenizer(args.buckets)
    return BagFeatures(tok.encode([p.query for p in pairs], args.query_len).astype(np.int32),
                       tok.encode([p.code for p in pairs], args.code_len).astype(np.int32))


def new_model(args: argparse.Namespace, *, seed: int, lr: float) -> BagModel:
    """A freshly initialised model (the same weights for the same seed) with its optimizer."""
    return BagModel(args, seed, lr)


def step_memory(args: argparse.Namespace, mode: str) -> tuple[memory.StepMemory, memory.StepMemory,
                                                               memory.Breakdown]:
    """Peak memory of one cached and one full-batch step at ``args.batch_size``, and where it goes.

    ``mode="measure"`` runs each step in a fresh process (:func:`memory.run_probe`); ``"compute"``
    adds up the parts of :func:`computed_breakdown`. The breakdown is computed either way.
    """
    breakdown = computed_breakdown(args)
    if mode == "measure":
        payload = {key: value for key, value in vars(args).items() if _jsonable(value)}
        budget = memory.default_budget()
        cached, full = (memory.run_probe(__name__, {**payload, "probe": kind, "budget": budget})
                        for kind in ("cached", "full"))
        return cached, full, breakdown
    return memory.StepMemory(breakdown.cached_total), memory.StepMemory(breakdown.full_total), breakdown


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except TypeError:
        return False


def _probe_batch(args: argparse.Namespace) -> tuple[BagModel, tf.Tensor, tf.Tensor]:
    """The model and the first batch of training pairs, as the main run's first step sees them."""
    from gradcache_cli.demo import runner

    dataset = runner.select_pairs(args)
    batch = min(args.batch_size, len(dataset.train))
    model = new_model(args, seed=args.seed, lr=args.lr)
    rows = runner.batches(len(dataset.train), batch, 1, args.seed)[0]
    features = prepare(args, [dataset.train[i] for i in rows])
    return model, tf.constant(features.queries), tf.constant(features.code)


def computed_breakdown(args: argparse.Namespace) -> memory.Breakdown:
    """Sizes of what a step holds, from what one chunk's tape keeps, scaled to the batch.

    Run eagerly, a ``GradientTape`` keeps alive exactly the tensors its recorded operations need
    for backward; TensorFlow's CPU allocator counts them (``get_memory_info``) once the forward is
    done, but its statistics leave out blocks under about 256 KiB, so the tape is measured on
    ``PROBE_ROWS`` rows (the batch's, repeated), where every buffer that grows with the rows is
    large enough to count. Per row (less the representation, counted below), times the chunk, it
    is what the cached step holds; times the batch, what a full-batch tape keeps. Both hold the
    representations and their gradients, the loss's ``batch x batch`` scores (about three float32
    matrices: scores, log-softmax, gradient) and the parameter gradients -- the torch backend's
    accounting.
    """
    model, queries, code = _probe_batch(args)
    batch = int(queries.shape[0])
    chunk = min(args.chunk_size, batch)
    graph_per_row, rep_bytes = 0.0, 0
    for tower, ids in zip(model.encoders(), (queries, code), strict=True):
        part = tf.constant(np.resize(ids.numpy(), (PROBE_ROWS, ids.shape[1])))
        _record(tower, part)  # the first eager call builds kernels and caches: not the tape's
        (tape, rep), held = tf_memory.held_bytes(functools.partial(_record, tower, part))
        del tape
        rep_size = int(np.prod(rep.shape)) * rep.dtype.size
        graph_per_row += max(held - rep_size, 0) / PROBE_ROWS
        rep_bytes += rep_size // PROBE_ROWS * batch
    return memory.Breakdown(
        encoder_cached=int(graph_per_row * chunk), encoder_full=int(graph_per_row * batch),
        loss=int(3 * batch * batch * 4 + 2 * rep_bytes),
        gradients=sum(int(np.prod(v.shape)) * 4 for v in model.variables))  # all float32


def _record(tower: Any, part: tf.Tensor) -> tuple[tf.GradientTape, tf.Tensor]:
    """One eager forward of ``tower`` under a tape, both returned (so the tape keeps what it saved)."""
    with tf.GradientTape() as tape:
        rep = tower(part, training=True)
    return tape, rep


def probe_main(payload: dict) -> None:
    """The child of :func:`memory.run_probe`: one step of one kind, its peak memory as JSON."""
    kind = payload.pop("probe")
    budget = int(payload.pop("budget"))
    args = argparse.Namespace(**payload)
    setup(args)
    model, queries, code = _probe_batch(args)
    chunk = min(args.chunk_size, int(queries.shape[0]))

    @tf.function
    def one_step(queries: tf.Tensor, code: tf.Tensor) -> tuple[tf.Tensor, list]:
        if kind == "cached":
            return cached_step(model.encoders(), (queries, code), info_nce, chunk_size=chunk,
                               variables=model.variables)
        return full_gradients(model, queries, code)

    # The first call traces and optimises the graph and starts TensorFlow's thread pools; the
    # second, measured, call is the step alone (see tf_memory for how it is read, and why).
    result = tf_memory.step_peak(lambda: one_step(queries, code), lambda: one_step(queries, code),
                                 budget)
    if result["bytes"] is None:
        memory.report({"bytes": None, "limit": budget, "note": result.get("note", "")})
        return
    memory.report({"bytes": result["bytes"], "note": result["method"]})

if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--probe":
        probe_main(json.loads(sys.argv[2]))
    else:
        sys.exit("usage: python -m gradcache_cli.demo.tf_demo --probe JSON (used by the demo)")
