"""The demo's JAX backend: the bag model in plain JAX and optax, its steps under ``jax.jit``, memory.

The model is :mod:`gradcache_cli.demo.torch_demo`'s ``bag`` model written as functions of a
parameter pytree: hashed word pieces (see :mod:`gradcache_cli.demo.tokenizer`) looked up in one
embedding table shared by the query and code towers, attention-pooled per tower, passed through a
residual projection and normalised. It trains with the same InfoNCE loss (cosine similarity times 20,
cross-entropy against the diagonal) and Adam (``optax.adam``). The large-batch step is
``gradcache_jax.cached_step`` inside a jitted train step; the small-batch comparison takes plain
``jax.value_and_grad`` steps. Memory is XLA's own account of each compiled step
(``memory_analysis()``: the temporaries and outputs its buffer assignment reserves), which is exact
for the compiled program and needs neither a run nor a fresh process. The runner
(:mod:`gradcache_cli.demo.runner`) owns the story and the printing; this module only knows JAX.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradcache_cli import memory
from gradcache_cli.demo import tokenizer
from gradcache_cli.demo.data import Pair
from gradcache_jax import cached_step

SCALE = 20.0  # cosine similarities times 20: sentence-transformers' MultipleNegativesRankingLoss


def memory_how(mode: str) -> str | None:
    """How the runner should name what ``step_memory(args, mode)`` returns (None: its default)."""
    if mode == "measure":
        return "compiled: XLA's buffer assignment of each jitted step, temporaries and outputs, exact"
    return None


EMBED_BLOCK = 1024  # rows embedded per call at evaluation; the last block is padded to this size


def setup(args: argparse.Namespace) -> str:
    """Sets XLA's CPU threads (before its first computation); returns the header's description."""
    threads = args.threads or os.cpu_count() or 1
    if args.threads:
        # XLA reads its flags when the CPU client starts, i.e. at the first computation, which has
        # not happened yet: importing jax starts nothing. One thread (the bag model's default) makes
        # the small operations run inline instead of hopping between pool threads.
        flags = os.environ.get("XLA_FLAGS", "")
        extra = f"--xla_cpu_multi_thread_eigen={'false' if threads == 1 else 'true'} " \
                f"intra_op_parallelism_threads={threads}"
        os.environ["XLA_FLAGS"] = f"{flags} {extra}".strip()
    return f"jax {jax.__version__}, jit, {threads} CPU thread{'s' if threads > 1 else ''}"


def info_nce(queries: Any, answers: Any) -> Any:
    """InfoNCE with in-batch negatives over normalised vectors: row ``i`` should pick answer ``i``.

    >>> q = jnp.eye(3)
    >>> float(info_nce(q, q)) < 1e-6
    True
    """
    scores = SCALE * queries @ answers.T
    return jnp.mean(jax.nn.logsumexp(scores, axis=1) - jnp.diagonal(scores))


# -- the bag model ------------------------------------------------------------------------------------

class BagFeatures(NamedTuple):
    """Token ids of every pair, ``(n, length)`` int32 numpy arrays padded with 0."""

    queries: np.ndarray
    code: np.ndarray


def init_params(args: argparse.Namespace, seed: int) -> dict:
    """The model's parameters: the shared table, and per tower the pooling scores and projection.

    Pooling scores and projection start at zero, as in the torch model: before training the model
    is a plain average of random piece vectors, a lexical-overlap baseline rather than noise.
    """
    table = jax.random.normal(jax.random.PRNGKey(seed), (args.buckets, args.dim), jnp.float32)
    table = (table / math.sqrt(args.dim)).at[tokenizer.PAD].set(0.0)

    def tower() -> dict:
        return {"score_w": jnp.zeros((args.dim,), jnp.float32),
                "score_b": jnp.zeros((), jnp.float32),
                "proj_w": jnp.zeros((args.dim, args.dim), jnp.float32),
                "proj_b": jnp.zeros((args.dim,), jnp.float32)}

    return {"table": table, "query": tower(), "code": tower()}


def tower_forward(params: dict, side: str, ids: Any, key: Any = None, dropout: float = 0.0) -> Any:
    """One tower on ``(n, length)`` ids: attention-pooled piece vectors, projected, normalised."""
    weights = params[side]
    mask = ids != tokenizer.PAD
    if key is not None and dropout > 0:
        # Piece dropout from the chunk's key, which gradcache passes again in pass 2; a row keeps
        # its first piece so that no row is left empty.
        keep = jax.random.uniform(key, ids.shape) >= dropout
        mask = mask & keep.at[:, 0].set(True)
    vectors = params["table"][ids]
    scores = jnp.where(mask, vectors @ weights["score_w"] + weights["score_b"], -jnp.inf)
    pooled = jnp.einsum("nl,nld->nd", jax.nn.softmax(scores, axis=-1), vectors)
    out = pooled + pooled @ weights["proj_w"] + weights["proj_b"]
    # torch's F.normalize: divide by the norm, kept away from zero.
    return out / jnp.maximum(jnp.linalg.norm(out, axis=-1, keepdims=True), 1e-12)


def _encoders(dropout: float) -> tuple:
    """The two towers as ``cached_step`` encoders: ``f(params, ids)``, or ``f(params, ids, key)``."""
    if dropout > 0:
        return (lambda p, x, key: tower_forward(p, "query", x, key, dropout),
                lambda p, x, key: tower_forward(p, "code", x, key, dropout))
    return (lambda p, x: tower_forward(p, "query", x), lambda p, x: tower_forward(p, "code", x))


def gradient_fns(dropout: float) -> tuple:
    """``(cached, full)``: functions ``(params, queries, code, key, chunk) -> (loss, grads)``.

    ``cached`` is gradcache's step; ``full`` differentiates the whole batch at once (the plain
    step of the comparison run, and the full-batch step whose memory the demo reports).
    """
    encoders = _encoders(dropout)

    def cached(params: dict, queries: Any, code: Any, key: Any, chunk: int) -> tuple:
        return cached_step(encoders, (queries, code), info_nce, chunk_size=chunk, params=params,
                           rng=key if dropout > 0 else None)

    def full(params: dict, queries: Any, code: Any, key: Any, chunk: int | None = None) -> tuple:
        del chunk

        def loss(p: dict) -> Any:
            if dropout > 0:
                # The same per-group keys a one-chunk cached step would draw.
                return info_nce(encoders[0](p, queries, jax.random.fold_in(key, 0)),
                                encoders[1](p, code, jax.random.fold_in(key, 1)))
            return info_nce(encoders[0](p, queries), encoders[1](p, code))

        return jax.value_and_grad(loss)(params)

    return cached, full


class BagModel:
    """The from-scratch dual encoder, its optax state and its two kinds of jitted step."""

    scale = SCALE

    def __init__(self, args: argparse.Namespace, seed: int, lr: float):
        self.params = init_params(args, seed)
        self.optimizer = optax.adam(lr)  # torch.optim.Adam's defaults: betas (0.9, 0.999), eps 1e-8
        self.opt_state = self.optimizer.init(self.params)
        self.key = jax.random.PRNGKey(seed + 1)
        self.steps = 0
        cached, full = gradient_fns(args.dropout)

        def train_step(grad_fn: Any, params: dict, opt_state: Any, queries: Any, code: Any,
                       key: Any, chunk: int | None) -> tuple:
            loss, grads = grad_fn(params, queries, code, key, chunk)
            updates, opt_state = self.optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        # One compiled program per kind of step and per batch shape (the last batch of an epoch is
        # shorter: one more compilation). The old parameters and optimizer state are donated, so
        # each step updates them in place instead of allocating 3 x 8 MiB anew.
        self._cached = jax.jit(functools.partial(train_step, cached), static_argnums=(5,),
                               donate_argnums=(0, 1))
        self._plain = jax.jit(functools.partial(train_step, full), static_argnums=(5,),
                              donate_argnums=(0, 1))
        self._embed = jax.jit(lambda p, q, c: (tower_forward(p, "query", q),
                                               tower_forward(p, "code", c)))
        count = sum(leaf.size for leaf in jax.tree_util.tree_leaves(self.params))
        self.description = (f"bag of hashed word pieces, {args.buckets} buckets x {args.dim} dims "
                            f"shared by both towers, attention pooling; {count / 1e6:.1f}M "
                            f"parameters, trained from scratch with Adam (optax)")

    def embed(self, features: BagFeatures) -> tuple[np.ndarray, np.ndarray]:
        out_q, out_c = [], []
        n = len(features.queries)
        for start in range(0, n, EMBED_BLOCK):
            q, c = features.queries[start:start + EMBED_BLOCK], features.code[start:start + EMBED_BLOCK]
            rows = len(q)
            if n > EMBED_BLOCK and rows < EMBED_BLOCK:
                # Padded with empty texts to the block's shape: one compiled program for every block.
                q = np.pad(q, ((0, EMBED_BLOCK - rows), (0, 0)), constant_values=tokenizer.EMPTY)
                c = np.pad(c, ((0, EMBED_BLOCK - rows), (0, 0)), constant_values=tokenizer.EMPTY)
            eq, ec = self._embed(self.params, q, c)
            out_q.append(np.asarray(eq, dtype=np.float64)[:rows])
            out_c.append(np.asarray(ec, dtype=np.float64)[:rows])
        return np.concatenate(out_q), np.concatenate(out_c)

    def step(self, features: BagFeatures, rows: np.ndarray, chunk_size: int | None) -> float:
        key = jax.random.fold_in(self.key, self.steps)
        self.steps += 1
        queries, code = features.queries[rows], features.code[rows]
        fn = self._plain if chunk_size is None else self._cached
        self.params, self.opt_state, loss = fn(self.params, self.opt_state, queries, code, key,
                                               None if chunk_size is None else min(chunk_size, len(rows)))
        return float(loss)


# -- the runner's entry points ----------------------------------------------------------------------

def prepare(args: argparse.Namespace, pairs: Sequence[Pair]) -> BagFeatures:
    """The model's view of ``pairs``: token-id arrays (int32, JAX's default integer)."""
    tok = tokenizer.HashTokenizer(args.buckets)
    return BagFeatures(tok.encode([p.query for p in pairs], args.query_len).astype(np.int32),
                       tok.encode([p.code for p in pairs], args.code_len).astype(np.int32))


def new_model(args: argparse.Namespace, *, seed: int, lr: float) -> BagModel:
    """A freshly initialised model (the same weights for the same seed) with its optimizer."""
    return BagModel(args, seed, lr)


def _batch_shape(args: argparse.Namespace) -> tuple[int, int]:
    """(batch, chunk) of the main run's first step, as the runner computes them."""
    from gradcache_cli.demo import runner

    n_train = len(runner.select_pairs(args).train)
    batch = min(args.batch_size, n_train)
    return batch, min(args.chunk_size, batch)


def step_memory(args: argparse.Namespace, mode: str) -> tuple[memory.StepMemory, memory.StepMemory,
                                                               memory.Breakdown]:
    """Memory of one cached and one full-batch gradient step at the run's batch, and where it goes.

    ``mode="measure"`` compiles both steps (``(params, queries, code) -> (loss, grads)``, without
    the optimizer, like the torch probe) and reads XLA's account: temporaries plus outputs (the
    gradients), the memory the step needs beyond its arguments. Nothing runs, so a full-batch step
    too large for the machine still gets its figure. ``"compute"`` adds up :func:`computed_breakdown`.
    """
    batch, chunk = _batch_shape(args)
    breakdown = computed_breakdown(args, batch, chunk)
    if mode != "measure":
        return (memory.StepMemory(breakdown.cached_total), memory.StepMemory(breakdown.full_total),
                breakdown)
    params = jax.eval_shape(lambda: init_params(args, args.seed))
    queries = jax.ShapeDtypeStruct((batch, args.query_len), jnp.int32)
    code = jax.ShapeDtypeStruct((batch, args.code_len), jnp.int32)
    key = jax.eval_shape(lambda: jax.random.PRNGKey(0))
    out = []
    for fn in gradient_fns(args.dropout):
        compiled = jax.jit(fn, static_argnums=(4,)).lower(params, queries, code, key, chunk).compile()
        stats = compiled.memory_analysis()
        if stats is None:
            out.append(memory.StepMemory(None, None, "XLA gave no memory analysis"))
            continue
        out.append(memory.StepMemory(stats.temp_size_in_bytes + stats.output_size_in_bytes
                                     - stats.alias_size_in_bytes))
    return out[0], out[1], breakdown


def computed_breakdown(args: argparse.Namespace, batch: int, chunk: int) -> memory.Breakdown:
    """Sizes of what a step holds, from the residuals ``jax.vjp`` keeps for one chunk, scaled.

    The residuals of a tower's forward (what its backward reads: gathered vectors, pooling weights,
    indices; the parameters themselves left out) grow linearly with rows, so one chunk's, times
    ``batch / chunk``, are a full-batch graph's; the cached step holds one chunk's. Both hold the
    representations and their gradients, the loss's ``batch x batch`` scores (about three float32
    matrices: scores, log-softmax, gradient) and the parameter gradients -- the same accounting as
    the torch backend's. Shapes only (``jax.eval_shape``): nothing is computed or compiled.
    """
    params = jax.eval_shape(lambda: init_params(args, args.seed))

    def residuals(params: dict, ids: Any, side: str) -> list:
        rep, vjp_fn = jax.vjp(lambda p: tower_forward(p, side, ids), params)
        # Inside the trace a parameter kept for backward is the very tracer passed in.
        inputs = {id(leaf) for leaf in jax.tree_util.tree_leaves(params)}
        return [rep] + [leaf for leaf in jax.tree_util.tree_leaves(vjp_fn) if id(leaf) not in inputs]

    def nbytes(leaf: Any) -> int:
        return math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize

    per_row, rep_bytes = 0.0, 0
    # Every row full-length: the compiled step pads nothing away, so this is its real shape.
    for side, length in (("query", args.query_len), ("code", args.code_len)):
        ids = jax.ShapeDtypeStruct((chunk, length), jnp.int32)
        rep, *saved = jax.eval_shape(functools.partial(residuals, side=side), params, ids)
        per_row += sum(nbytes(leaf) for leaf in saved) / chunk
        rep_bytes += nbytes(rep) // chunk * batch
    return memory.Breakdown(
        encoder_cached=int(per_row * chunk), encoder_full=int(per_row * batch),
        loss=int(3 * batch * batch * 4 + 2 * rep_bytes),
        gradients=sum(nbytes(leaf) for leaf in jax.tree_util.tree_leaves(params)))
