"""The JAX backend: the core's primitives over ``jax.vjp``, and its chunk loop as ``lax.scan``.

Pass 1 is a plain forward (JAX builds no graph unless asked); the loss's gradient with respect to
the representations comes from ``jax.value_and_grad``; pass 2 re-encodes each chunk under
``jax.vjp`` and pulls the cached gradient slice back into the parameters. Gradients travel as a
tuple of accumulators, one per trainable leaf of ``params`` (an inexact array), and come back to
the user in the structure of ``params``. Randomness is explicit: each chunk's key is derived from
the step key, the group and the chunk index, so pass 2 sees pass 1's key by construction.

The backend owns the *way* to iterate, not the schedule: the core decides which chunks run in a
compiled loop (the full ones) and which by themselves (a shorter last one), and
:meth:`JaxBackend.loop_equal_chunks` runs its body under ``lax.scan``, so that the compiled
program does not grow with the number of chunks. It must never hold a loop over chunks of its own
or a branch on the algorithm.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from gradcache import Backend, GradCacheError, flatten, unflatten
from gradcache_jax import _check_errors, _streams


def chunk_key(rng: Any, group: Any, chunk: Any) -> Any:
    """The key that chunk ``chunk`` of input group ``group`` receives, in both passes.

    It is ``fold_in(fold_in(rng, group), chunk)``: deterministic, different for every chunk, and
    computable from a traced chunk index (inside ``lax.scan``). Use it to write a chunk-by-chunk
    reference, or to know which mask a row saw.

    Args:
        rng: the step's key (``jax.random.key`` or a legacy ``PRNGKey``).
        group: index of the input group (0 for queries in ``(queries, passages)``).
        chunk: index of the chunk within the group (an int or a traced integer).

    Returns:
        A key of the same kind as ``rng``.

    >>> import jax
    >>> from gradcache_jax import chunk_key
    >>> rng = jax.random.PRNGKey(0)
    >>> expected = jax.random.fold_in(jax.random.fold_in(rng, 1), 2)
    >>> bool((chunk_key(rng, 1, 2) == expected).all())
    True
    """
    return jax.random.fold_in(jax.random.fold_in(rng, group), chunk)


def is_tensor(value: Any) -> bool:
    """JAX arrays (tracers included) and numpy arrays are the tensor leaves of this backend."""
    return isinstance(value, (jax.Array, np.ndarray))


def _inexact(leaf: Any) -> bool:
    return is_tensor(leaf) and jnp.issubdtype(leaf.dtype, jnp.inexact)


def _accumulator_dtype(dtype: Any) -> Any:
    # bf16/fp16 parameters would lose the small contributions of late chunks; sum in float32 at
    # least and cast back once at the end, as a full-batch backward's reduction would.
    return jnp.promote_types(dtype, jnp.float32)


class JaxBackend(Backend):
    """Primitives over ``jax.vjp`` and ``lax.scan``. One instance serves one step.

    Args:
        params: the pytree every encoder (and, with ``loss_takes_params``, the loss) receives.
            Its inexact array leaves are trained; other leaves (integer arrays, keys, functions
            inside an Equinox module) are passed through and get ``None`` as gradient.
        rng: the step key, or ``None`` for encoders without randomness.
        loss_takes_params: call the loss as ``loss_fn(params, *reps)``.
        scan: run uniform chunk loops under ``lax.scan`` (else a Python loop, op by op).
        concrete: the step runs eagerly (not under a trace), so a progress bar can follow it.

    For composing a step of your own with :func:`gradcache.run_cached_step`
    (:func:`gradcache_jax.cached_step` does this for you):

    >>> import jax.numpy as jnp
    >>> from gradcache import run_cached_step
    >>> from gradcache_jax import JaxBackend
    >>> backend = JaxBackend({"w": jnp.ones((3, 2))})
    >>> loss, grads = run_cached_step(backend, lambda p, x: x @ p["w"], (jnp.ones((5, 3)),),
    ...                               lambda r: jnp.mean(r ** 2), chunk_size=2)
    >>> backend.grads_like_params(grads)["w"].shape
    (3, 2)
    """

    name = "jax"
    # host-side checks run in program order; JAX orders callbacks only on a single device
    ordered_checks = True
    # collectives in a jitted step are the user's own: no wrapper to synchronise on a last chunk,
    # so that chunk may stay in the scan (one copy of the encoder fewer in the program)
    reads_final_use = False

    def __init__(self, params: Any, *, rng: Any = None, loss_takes_params: bool = False,
                 scan: bool = True, concrete: bool = False):
        self.params = params
        self.rng = rng
        self.loss_takes_params = loss_takes_params
        self.scan = scan
        self.concrete = concrete
        self._leaves, self._treedef = jax.tree_util.tree_flatten(params)
        self._trainable = [i for i, leaf in enumerate(self._leaves) if _inexact(leaf)]
        self._loss_params: Any = None
        # Flax NNX random streams inside params: each chunk reseeds them (see _streams)
        self.streams = _streams.find(params)
        self._stream_bases = [self.stream_step_key(self._leaves[stream.key_at],
                                                   self._leaves[stream.count_at])
                              for stream in self.streams]

    # -- parameters ---------------------------------------------------------------------------------
    def trainable(self) -> list:
        """The trainable leaves of ``params``, in flattening order."""
        return [self._leaves[i] for i in self._trainable]

    def params_with(self, trainable: Sequence, replaced: dict[int, Any] | None = None) -> Any:
        """``params`` with its trainable leaves replaced by ``trainable`` (to differentiate them),
        and the leaves at the positions of ``replaced`` by its values (a chunk's stream keys)."""
        leaves = list(self._leaves)
        for i, value in zip(self._trainable, trainable, strict=True):
            leaves[i] = value
        for i, value in (replaced or {}).items():
            leaves[i] = value
        return jax.tree_util.tree_unflatten(self._treedef, leaves)

    def grads_like_params(self, grads: Sequence) -> Any:
        """The accumulated gradients in the structure of ``params`` (``None`` where not trained)."""
        leaves: list = [None] * len(self._leaves)
        for i, grad in zip(self._trainable, grads, strict=True):
            leaves[i] = grad.astype(self._leaves[i].dtype)
        return jax.tree_util.tree_unflatten(self._treedef, leaves)

    def encoder_trainable(self) -> list:
        """The trainable leaves the encoders are differentiated at (both passes).

        The same as :meth:`trainable` here; a sharded step's backend marks them as varying over its
        mesh axis, so that pass 2 accumulates each shard's own gradient (summed once at the end).
        """
        return self.trainable()

    def add_loss_param_grads(self, grads: Sequence, param_grads: Sequence) -> tuple:
        """Adds the loss-owned parameters' gradient (``loss_takes_params``) to the accumulator."""
        return self._add(grads, param_grads)

    def loss_params(self) -> Any:
        """The params the loss sees, with their trainable leaves being differentiated."""
        if self._loss_params is None:
            raise GradCacheError("the loss asked for params outside of the step's loss evaluation")
        return self._loss_params

    def zero_grads(self) -> tuple:
        return tuple(jnp.zeros(leaf.shape, _accumulator_dtype(leaf.dtype)) for leaf in self.trainable())

    @staticmethod
    def _add(grads: Sequence, more: Sequence) -> tuple:
        return tuple(a + b.astype(a.dtype) for a, b in zip(grads, more, strict=True))

    # -- tensors ------------------------------------------------------------------------------------
    def is_leaf(self, value: Any) -> bool:
        return is_tensor(value)

    def concat_rows(self, leaves: Sequence[Any]) -> Any:
        return jnp.concatenate(list(leaves), axis=0)

    # -- randomness ---------------------------------------------------------------------------------
    def stream_step_key(self, key: Any, count: Any) -> Any:
        """An NNX stream's key for this step: its next draw, ``fold_in(key, count)``."""
        return _streams.fold(key, count)

    def rng_capture(self, group: int, chunk: Any) -> Any:
        key = None if self.rng is None else chunk_key(self.rng, group, chunk)
        if not self.streams:
            return key
        return key, [_streams.chunk_keys(base, group, chunk) for base in self._stream_bases]

    def rng_replay(self, record: Any) -> contextlib.AbstractContextManager:
        # Keys are passed explicitly: replaying means passing the same key, which pullback does.
        return contextlib.nullcontext()

    # -- autodiff -----------------------------------------------------------------------------------
    def _call(self, encoder: Callable, trainable: list, chunk: Any, record: Any) -> Any:
        # A params tree rebuilt from its leaves, in both passes: both see the same kind of object,
        # and stateful containers (Flax NNX variables) belong to the current trace. Its NNX
        # streams, if any, reseeded with the chunk's keys (a new counter per chunk).
        key, replaced = record, {}
        if self.streams:
            key, stream_keys = record
            for stream, stream_key in zip(self.streams, stream_keys, strict=True):
                replaced[stream.key_at] = stream_key
                replaced[stream.count_at] = jnp.zeros_like(self._leaves[stream.count_at])
        params = self.params_with(trainable, replaced)
        if self.rng is None:
            return encoder(params, chunk)
        return encoder(params, chunk, key)

    def encode(self, encoder: Any, chunk: Any, record: Any, get_rep: Callable) -> Any:
        return get_rep(self._call(encoder, self.encoder_trainable(), chunk, record))

    def differentiable(self, leaf: Any) -> bool:
        return _inexact(leaf)

    def zeros_like(self, leaf: Any) -> Any:
        return jnp.zeros_like(leaf)

    def value_and_grad(self, fn: Callable, values: list, grads: Any) -> tuple[Any, list, Any]:
        def differentiated(values: list, trainable: list) -> tuple[Any, Any]:
            # The loss reads its params through loss_params() while it is being differentiated.
            self._loss_params = self.params_with(trainable) if self.loss_takes_params else None
            try:
                target, value = fn(values)
            finally:
                self._loss_params = None
            if not jnp.issubdtype(jnp.result_type(target), jnp.inexact):
                # jax.grad's own error would tell the user to call jax.vjp, which they did not
                raise GradCacheError(
                    f"the loss does not depend on the representations: it returned an integer "
                    f"value ({jnp.result_type(target)}), which has no gradient (argmax, a "
                    f"comparison, a count?); return a floating-point loss")
            return target, value

        if self.loss_takes_params:
            (_, value), (value_grads, param_grads) = jax.value_and_grad(
                differentiated, argnums=(0, 1), has_aux=True)(values, self.trainable())
            grads = self.add_loss_param_grads(grads, param_grads)
        else:
            (_, value), value_grads = jax.value_and_grad(differentiated, has_aux=True)(
                values, self.trainable())
        return value, value_grads, grads

    def vjp(self, encoder: Any, chunk: Any, record: Any, outputs: Callable, grads: Any, *,
            final_use: bool) -> tuple[list, Any]:
        del final_use  # see reads_final_use
        found: list = []

        def forward(trainable: list) -> list:
            leaves, cotangents = outputs(self._call(encoder, trainable, chunk, record))
            found.append(cotangents)   # pass 2's gradient slices: outer values, not traced here
            return leaves

        leaves, pull = jax.vjp(forward, self.encoder_trainable())
        # an integer output's cotangent is float0 zeros, as jax.vjp requires
        cotangents = [np.zeros(r.shape, jax.dtypes.float0) if g is None else g.astype(r.dtype)
                      for r, g in zip(leaves, found[0], strict=True)]
        (param_grads,) = pull(cotangents)
        return leaves, self._add(grads, param_grads)

    # -- checks -------------------------------------------------------------------------------------
    def to_host(self, leaf: Any) -> Any:
        # a traced value exists only when the compiled program runs: nothing to read now
        return None if isinstance(leaf, jax.core.Tracer) else np.asarray(leaf)

    def run_check(self, check: Callable[..., None], *values: Any) -> None:
        leaves, spec = flatten(list(values), is_tensor)
        if not any(isinstance(leaf, jax.core.Tracer) for leaf in leaves):
            check(*values)
            return

        # Under a trace the values exist only at run time: check them on the host then. A failing
        # check aborts the compiled program (jax.errors.JaxRuntimeError carrying the message), so
        # the step returns nothing -- the nothing-half-done rule of a functional backend.
        def on_host(*host_leaves: Any) -> None:
            check(*unflatten(spec, list(host_leaves)))

        # recorded, so that gradcache_jax.unwrap_check_errors can give the failure back as it is
        jax.debug.callback(_check_errors.on_host(on_host), *leaves, ordered=self.ordered_checks)

    def progress_enabled(self) -> bool:
        # A scanned loop body is traced once for all its chunks: a bar would not follow them.
        return self.concrete and not self.scan

    # -- the way to iterate -------------------------------------------------------------------------
    def loop_equal_chunks(self, body: Callable, carry: list, rows: list, count: int, size: int,
                          items: list | None) -> tuple[list, list, list] | None:
        """The core's loop body under one ``lax.scan`` over ``count`` chunks of ``size`` rows.

        Declines when :attr:`scan` is off (an eager step with a progress bar or a determinism
        check wants the chunks one by one).
        """
        if not self.scan:
            return None
        stacked = [jnp.reshape(leaf[:count * size], (count, size) + tuple(leaf.shape[1:]))
                   for leaf in rows]

        def scan_body(carry: list, xs: tuple) -> tuple[list, tuple[list, list]]:
            index, chunk, item = xs
            carry, out, out_item = body(carry, index, chunk, item)
            return carry, (out, out_item)

        xs = (jnp.arange(count), stacked, [] if items is None else items)
        carry, (outs, out_items) = lax.scan(scan_body, carry, xs)
        return carry, [jnp.reshape(o, (count * size,) + tuple(o.shape[2:])) for o in outs], out_items
