"""The backend protocol: the few primitives an adapter implements so that the core can run a step.

The core (:mod:`gradcache._schedule`) owns the algorithm -- chunking, the order of the passes, the
random-state bookkeeping, validation and error wording, which chunks run in a compiled loop
(:mod:`gradcache._chunks`), and the skeletons of the loss's gradient and of the pullback
(:mod:`gradcache._autodiff`). A backend owns only what needs a framework: what a tensor is, slicing
and concatenating rows, encoding a chunk without a graph, the value and gradient of a function of a
list of tensors, the vector-Jacobian product of an encoder at its parameters, saving and replaying
random state, and (optionally) a compiled loop over chunks of equal size. An adapter that finds
itself writing a loop over chunks or a branch on the algorithm is missing a primitive here; add it
instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gradcache import _tree


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


# body(carry_leaves, index, row_leaves, item_leaves) -> (carry_leaves, out_leaves, out_item_leaves)
LoopBody = Callable[[list, Any, list, list], tuple[list, list, list]]

# fn(values) -> (target, value): the value of a function, and what to differentiate (the value
# times the loss scale)
ScaledFunction = Callable[[list], tuple[Any, Any]]

# outputs(encoder_output) -> (tensor leaves, one cotangent per leaf or None)
Outputs = Callable[[Any], tuple[list, list]]


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

    # -- tensors (required; shape has a default) -----------------------------------------------
    def is_leaf(self, value: Any) -> bool:
        """True when ``value`` is a tensor of this backend (a leaf of nested inputs and outputs)."""
        raise NotImplementedError

    def shape(self, leaf: Any) -> tuple:
        """The static shape of a tensor as a tuple (entries may be ``None`` when unknown).

        The default reads ``tuple(leaf.shape)``, as every framework's tensors spell it; a shape
        that cannot be listed -- a graph tensor of unknown rank, whose shape raises ``ValueError``
        when iterated (TensorFlow) -- is one row count that is not known, ``(None,)``."""
        try:
            return tuple(leaf.shape)
        except ValueError:
            return (None,)

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

    def value_and_grad(self, fn: ScaledFunction, values: list, grads: Any) -> tuple[Any, list, Any]:
        """The value of ``fn`` at ``values`` and the gradient of what it differentiates.

        ``fn(values)`` returns ``(target, value)``: ``target`` is ``value`` times the loss scale
        (:meth:`scale_loss`). Returns ``(value, grads_of_values, grads)``: the gradient of
        ``target`` with respect to each of ``values`` (a list of floating-point tensors; ``None``
        where ``target`` does not depend on one), and ``grads`` with the gradient of ``target``
        with respect to the parameters ``fn`` reads (a loss's learnable temperature) added.
        The core calls it once per step, with the loss on the representations.
        """
        raise NotImplementedError

    def vjp(self, encoder: Any, chunk: Any, record: Any, outputs: Outputs, grads: Any, *,
            final_use: bool) -> tuple[list, Any]:
        """Pass 2 for one chunk: re-encode it with a graph at the parameters, pull cotangents back.

        Call ``encoder`` on ``chunk`` (randomness: ``record``'s, which the core has already made
        current with :meth:`rng_replay`), differentiably with respect to the parameters, and hand
        its output to ``outputs``: it returns the output's tensor leaves and one cotangent per leaf
        (``None`` for a leaf that is not floating point). Add the vector-Jacobian product of the
        cotangents (each cast to its leaf's dtype) into ``grads``; return ``(leaves, grads)``.
        ``final_use`` is true for the last chunk the step pulls back through ``encoder``
        (distributed wrappers synchronise there, once per step); it is a plain bool.
        """
        raise NotImplementedError

    # -- optional primitives with defaults ------------------------------------------------------------
    def encode_keeping_graph(self, encoder: Any, chunk: Any, record: Any,
                             get_rep: Callable) -> tuple[Any, Callable[[], bool]] | None:
        """Pass 1 for the step's first chunk: ``get_rep(encoder(chunk))`` *with* its graph, or ``None``.

        The core asks once per step, for the first chunk of the first group it will pull back
        (which pass 2 pulls back first, so that graph is never held beside another). A backend
        that returns ``(rep, intact)`` -- a representation whose leaves carry their graph, and a
        function saying whether that graph can still be pulled back -- saves that chunk's
        re-encoding: pass 2 asks ``intact()`` and hands :meth:`vjp` an encoder that returns
        ``rep`` (and ``get_rep`` the identity), so the backend's own ``vjp`` pulls back through it
        -- its random state is trivially pass 1's. ``intact()`` false (torch: a later chunk's
        forward modified in place a tensor the graph saved, as an ``nn.Embedding`` with
        ``max_norm`` renormalises its weight) lets the graph go and re-encodes the chunk under its
        recorded random state instead. The core detaches ``rep`` for the loss. The default
        declines (``None``): the chunk is encoded by :meth:`encode` and re-encoded in pass 2.
        """
        return None

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

    #: Whether :meth:`vjp` reads ``final_use``. The core then runs the last chunk of a group that
    #: may be final by itself, never inside a compiled loop, so that the flag is a plain bool. A
    #: compiled backend that ignores it says so, and its loops keep that chunk (one copy of the
    #: encoder fewer in the program); inside a loop ``final_use`` is then ``False``.
    reads_final_use: bool = True

    def loop_equal_chunks(self, body: LoopBody, carry: list, rows: list, count: int, size: int,
                          items: list | None) -> tuple[list, list, list] | None:
        """Runs ``body`` over ``count`` chunks of ``size`` rows in one compiled loop, or declines.

        ``rows`` are tensors of at least ``count * size`` rows; chunk ``i`` is rows ``i * size``
        to ``(i + 1) * size`` of each (rows past the loop's are chunks the core runs by itself). ``items`` is ``None`` or what a previous call returned as
        stacked items (tensors with a leading axis of ``count``). Call ``body(carry, i,
        chunk_rows, item_i)`` for ``i = 0 .. count - 1`` in order -- ``i`` the loop's counter, or a
        Python int for a chunk run by itself before the loop (as TensorFlow runs chunk 0 to learn
        the outputs' shapes) -- threading ``carry``; it returns ``(carry, out_rows, out_item)``,
        all flat lists of tensors. Return ``(carry, out_rows concatenated along rows, out_item
        stacked along a new leading axis)``. The default declines (returns ``None`` without
        calling ``body``) and the core runs the chunks one by one; a compiled backend loops so that
        its program does not grow with the number of chunks.
        """
        return None

    def differentiable(self, leaf: Any) -> bool:
        """Whether a tensor has a gradient: its dtype is floating point or complex.

        The default reads the name of ``leaf.dtype``, which every framework takes from numpy's --
        ``float16``, ``bfloat16``, ``float8_e4m3fn``, ``complex64`` as opposed to ``int32``,
        ``bool``, ``qint8`` -- whether it spells it ``float32`` (numpy, JAX, a ``tf.DType``'s
        ``name``) or ``torch.float32`` / ``mlx.core.float32`` (its ``str``). Override it if your
        framework names a dtype otherwise."""
        dtype = getattr(leaf, "dtype", None)
        if dtype is None:
            dtype = np.asarray(leaf).dtype
        name = getattr(dtype, "name", None)
        name = name if isinstance(name, str) else str(dtype)
        return "float" in name or "complex" in name

    def zeros_like(self, leaf: Any) -> Any:
        """Zeros of a tensor's shape and dtype: the gradient of what the loss does not read."""
        return np.zeros_like(leaf)

    def detach(self, leaf: Any) -> Any:
        """The tensor without its graph (the loss returned, pass 2's recomputed representation)."""
        return leaf

    def scale_loss(self, value: Any) -> Any:
        """``value`` times the step's loss scale: the loss before it is differentiated, or a
        gradient a loss supplies itself. Default: no scale (``GradScaler``, ``LossScaleOptimizer``)."""
        return value

    def multiply(self, leaf: Any, factor: Any) -> Any:
        """``leaf * factor`` for a scalar ``factor`` (the upstream gradient of
        :func:`gradcache.cached_backward`), in ``leaf``'s dtype. Default: ``leaf * factor``."""
        return leaf * factor

    def trains(self, encoder: Any) -> bool:
        """Whether an encoder has anything to train. A group whose encoder does not (a frozen
        tower) is encoded once, without a graph, and skipped in pass 2. Default: true."""
        return True

    def progress_enabled(self) -> bool:
        """Whether a progress bar can follow the chunks, when their values are concrete.

        The core shows a bar only where :meth:`to_host` reads the step's inputs (see
        :func:`values_known`): while a step is traced (``jit``, ``tf.function``) no backend needs
        to say so here. Override it where values are concrete but the chunks still do not run one
        by one in Python (JAX's ``lax.scan`` run eagerly: its body is traced once for all of
        them). Default: true."""
        return True


def values_known(backend: Backend, tree: Any) -> bool:
    """Whether the values of ``tree``'s tensors exist now rather than being traced: whether
    :meth:`Backend.to_host` reads its first tensor (rows ``0:0`` of it, so that nothing is copied).
    True when it has no tensor.
    """
    leaves, _ = _tree.flatten(tree, backend.is_leaf)
    if not leaves:
        return True
    try:
        leaf = leaves[0]
        if backend.shape(leaf):
            leaf = backend.slice_rows(leaf, 0, 0)
        return backend.to_host(leaf) is not None
    except Exception:   # values the host cannot read (a float8 tensor's .numpy()): no bar
        return False


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
