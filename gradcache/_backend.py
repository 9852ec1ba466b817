"""The backend protocol: the few primitives an adapter implements so that the core can run a step.

The core (:mod:`gradcache._schedule`) owns the algorithm -- chunking, the order of the passes, the
random-state bookkeeping, validation and error wording. A backend owns only what needs a framework:
what a tensor is, slicing and concatenating rows, encoding a chunk without a graph, the loss's
value-and-gradient, pulling a representation gradient back into the parameters, saving and replaying
random state, and (optionally) the way to iterate over chunks. An adapter that finds itself writing a
loop over chunks or a branch on the algorithm is missing a primitive here; add it instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gradcache import _tree
from gradcache._errors import GradCacheError


@dataclass(frozen=True)
class ChunkPlan:
    """How one input group is cut into consecutive chunks of ``sizes`` rows.

    Chunks made by the core are *uniform*: every chunk has ``chunk_size`` rows except a smaller
    last one. A user ``split_fn`` may produce any sizes; compiled loops then fall back to Python.

    >>> plan = ChunkPlan.uniform(batch_size=10, chunk_size=4)
    >>> plan.bounds
    [(0, 4), (4, 8), (8, 10)]
    >>> plan.num_full, plan.remainder
    (2, 2)
    """

    sizes: tuple[int, ...]

    @classmethod
    def uniform(cls, batch_size: int, chunk_size: int) -> ChunkPlan:
        full, rest = divmod(batch_size, chunk_size)
        return cls((chunk_size,) * full + ((rest,) if rest else ()))

    @property
    def batch_size(self) -> int:
        return sum(self.sizes)

    @property
    def num_chunks(self) -> int:
        return len(self.sizes)

    @property
    def chunk_size(self) -> int:
        return max(self.sizes) if self.sizes else 0

    @property
    def is_uniform(self) -> bool:
        """All chunks but the last have ``chunk_size`` rows, and the last has no more."""
        return all(size == self.chunk_size for size in self.sizes[:-1])

    @property
    def num_full(self) -> int:
        return sum(1 for size in self.sizes if size == self.chunk_size)

    @property
    def remainder(self) -> int:
        return self.batch_size - self.num_full * self.chunk_size

    @property
    def bounds(self) -> list[tuple[int, int]]:
        bounds, start = [], 0
        for size in self.sizes:
            bounds.append((start, start + size))
            start += size
        return bounds


# body(carry, chunk_index, rows_chunk, per_chunk_item) -> (carry, (rows_out, per_chunk_out))
ChunkBody = Callable[[Any, Any, Any, Any], tuple[Any, tuple[Any, Any]]]


class Backend:
    """Base class of every backend; subclasses fill in the primitives marked *required*.

    A backend instance lives for one step: the adapter's ``cached_step`` builds it with whatever the
    step needs (parameters and a key in JAX, a ``GradScaler`` in torch) and hands it to
    :func:`gradcache.run_cached_step`. Gradients travel as an opaque accumulator ``grads``: a pytree
    that a functional backend returns, or ``None`` for a backend that accumulates into the
    parameters in place (torch's ``.grad``).

    See ``docs/extending.md`` for a worked example and :mod:`gradcache.testing` for the contract
    suite a new backend must pass.
    """

    #: Short name used in messages and in dispatch (``"torch"``, ``"jax"``, ``"tf"``, ``"numpy"``).
    name: str = "backend"

    # -- tensors (required) --------------------------------------------------------------------
    def is_leaf(self, value: Any) -> bool:
        """True when ``value`` is a tensor of this backend (a leaf of nested inputs and outputs)."""
        raise NotImplementedError

    def shape(self, leaf: Any) -> tuple:
        """The static shape of a tensor as a tuple (entries may be ``None`` when unknown)."""
        raise NotImplementedError

    def slice_rows(self, leaf: Any, start: int, stop: int) -> Any:
        """Rows ``start:stop`` of a tensor along its first dimension (default: ``leaf[start:stop]``)."""
        return leaf[start:stop]

    def concat_rows(self, leaves: Sequence[Any]) -> Any:
        """Concatenates tensors along their first dimension."""
        raise NotImplementedError

    # -- randomness (required) ---------------------------------------------------------------------
    def rng_capture(self, group: int, chunk: Any) -> Any:
        """Called in pass 1 just before chunk ``chunk`` of ``group`` is encoded; returns a record.

        The record must let :meth:`rng_replay` reproduce exactly the randomness that chunk's
        encoding consumes. A stateful backend snapshots its generators; a key-based one derives the
        chunk's key from the group and chunk index.
        """
        raise NotImplementedError

    def rng_replay(self, record: Any) -> contextlib.AbstractContextManager:
        """A context in which the random state is the one ``record`` captured.

        On exit every random stream must be where it was on entry: replaying never advances them.
        """
        raise NotImplementedError

    # -- autodiff (required) -----------------------------------------------------------------------
    def encode(self, encoder: Any, chunk: Any, record: Any, get_rep: Callable) -> Any:
        """Pass 1: ``get_rep(encoder(chunk))`` without building a graph, under ``record``'s randomness."""
        raise NotImplementedError

    def loss_and_rep_grads(self, loss_fn: Callable, reps: list, grads: Any) -> tuple[Any, list, Any]:
        """Returns ``(loss, dloss/dreps, grads)``; gradients of loss-owned parameters go into ``grads``.

        ``loss_fn`` is a :class:`gradcache.CheckedLoss`: call it on ``reps`` and differentiate, or,
        when ``loss_fn.supplies_gradient``, take ``loss_fn.value_and_grad(*reps)`` as it is.
        ``dloss/dreps`` mirrors ``reps`` (a list with one nested representation per group), with
        zeros where the loss does not depend on a representation.
        """
        raise NotImplementedError

    def pullback(self, encoder: Any, chunk: Any, record: Any, get_rep: Callable, rep_grad: Any,
                 grads: Any, *, final_use: Any) -> tuple[Any, Any]:
        """Pass 2: re-encode ``chunk`` with a graph under ``record`` and add ``rep_grad``'s VJP into ``grads``.

        Returns ``(grads, recomputed_rep)``. ``final_use`` is true for the last chunk the step pulls
        back through ``encoder`` (distributed wrappers synchronise there, once per step).
        """
        raise NotImplementedError

    # -- optional primitives with defaults ------------------------------------------------------------
    def zero_grads(self) -> Any:
        """The empty gradient accumulator (``None`` for in-place backends)."""
        return None

    def transaction(self) -> contextlib.AbstractContextManager:
        """A context that undoes every gradient change made inside it if it exits with an exception."""
        return contextlib.nullcontext()

    def batch_size(self, leaf: Any) -> int | None:
        """Rows of a tensor (its first dimension), ``None`` for a scalar or an unknown size."""
        shape = self.shape(leaf)
        return shape[0] if shape else None

    def to_host(self, leaf: Any) -> Any:
        """The values of a tensor as a numpy array, or ``None`` while they are not known (a traced
        tensor under ``jit`` or ``tf.function``). ``check_finite`` and ``check_determinism`` read
        values through it (inside :meth:`run_check`), as do ``pad_trim`` and ``sort_by_length``;
        the default is ``numpy.asarray``."""
        return np.asarray(leaf)

    def take_rows(self, leaf: Any, index: Any) -> Any:
        """Rows ``index`` (a numpy integer array) of a tensor, in that order, differentiably
        (``sort_by_length``). The default indexes: ``leaf[index]``."""
        return leaf[index]

    def slice_columns(self, leaf: Any, stop: int) -> Any:
        """Columns ``:stop`` of a tensor along its second dimension (``pad_trim``)."""
        return leaf[:, :stop]

    def run_check(self, check: Callable[..., None], *values: Any) -> None:
        """Runs ``check(*values)``, a test that raises when the step must not go on.

        The core's ``check_finite`` and ``check_determinism`` go through here. The default runs the
        check now. A compiled backend whose values are not concrete yet (JAX under ``jit`` or inside
        a scanned loop) may instead run it on the host once they are (a host callback), so that the
        compiled program fails with the check's message instead of silently going on. ``values``
        are tensors, nested structures of tensors, or chunk indices as the loop passed them.
        """
        check(*values)

    def chunk_loop(self, body: ChunkBody, carry: Any, rows: Any, plan: ChunkPlan,
                   per_chunk: Sequence | None) -> tuple[Any, tuple[Any, Any]]:
        """Runs ``body`` over the chunks of ``rows`` in order; concatenates row outputs.

        ``rows`` is a nested structure whose tensor leaves all have ``plan.batch_size`` rows; the
        body receives them sliced to each chunk. ``per_chunk`` holds one item per chunk (as a previous
        loop returned them). The body returns ``(carry, (rows_out, per_chunk_out))``: ``rows_out`` is
        concatenated along rows over the chunks, ``per_chunk_out`` is collected per chunk. The default
        is a Python loop; a compiled backend overrides it with its own loop primitive so that program
        size does not grow with the number of chunks.
        """
        return python_chunk_loop(self, body, carry, rows, plan, per_chunk)

    def progress_enabled(self) -> bool:
        """Whether a progress bar can follow the chunks (false while tracing a compiled loop)."""
        return True


def call_with_convention(encoder: Callable, chunk: Any, is_leaf: Callable[[Any], bool]) -> Any:
    """Calls an encoder on one chunk the way users expect: ``enc(x)`` for a tensor (or anything
    that is not a container), ``enc(**x)`` for a mapping, ``enc(*x)`` for a list or tuple.

    >>> call_with_convention(lambda a, b: a + b, (1, 2), is_leaf=lambda v: False)
    3
    """
    if is_leaf(chunk):
        return encoder(chunk)
    if isinstance(chunk, Mapping):
        return encoder(**chunk)
    if isinstance(chunk, (list, tuple)):
        return encoder(*chunk)
    return encoder(chunk)


def python_chunk_loop(backend: Backend, body: ChunkBody, carry: Any, rows: Any, plan: ChunkPlan,
                      per_chunk: Sequence | None) -> tuple[Any, tuple[Any, Any]]:
    """The plain chunk-by-chunk loop every eager backend uses."""
    row_outputs: list = []
    per_chunk_outputs: list = []
    for index, (start, stop) in enumerate(plan.bounds):
        chunk = _tree.map_leaves(lambda leaf, a=start, b=stop: backend.slice_rows(leaf, a, b),
                                 rows, backend.is_leaf)
        item = None if per_chunk is None else per_chunk[index]
        carry, (rows_out, item_out) = body(carry, index, chunk, item)
        row_outputs.append(rows_out)
        per_chunk_outputs.append(item_out)
    return carry, (concat_row_trees(backend, row_outputs), per_chunk_outputs)


def concat_row_trees(backend: Backend, trees: Sequence[Any]) -> Any:
    """Concatenates structurally identical trees leaf by leaf along rows."""
    flat = [_tree.flatten(tree, backend.is_leaf) for tree in trees]
    if not flat:
        return None
    spec = flat[0][1]
    for index, (_, other) in enumerate(flat[1:], start=1):
        if other != spec:
            raise GradCacheError(f"chunk {index} produced an output structured differently from "
                                 f"chunk 0; an encoder must return the same structure for every chunk")
    columns = zip(*(leaves for leaves, _ in flat))
    return _tree.unflatten(spec, [backend.concat_rows(list(column)) for column in columns])

