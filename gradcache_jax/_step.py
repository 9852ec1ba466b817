"""``cached_step`` for JAX: the public entry point, functional and jit-able.

It builds a :class:`JaxBackend` for the step and runs the core's schedule; the gradients come back
in the structure of ``params``, equal to ``jax.grad`` of the full-batch loss. It decides only what
the backend needs to know about the call (is it traced, does the loss take params); the algorithm
stays in the core.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gradcache import flatten, map_leaves, run_cached_step
from gradcache_jax._backend import JaxBackend, is_tensor
from gradcache_jax._distributed import (
    MeshCollective,
    ShardedJaxBackend,
    on_mesh,
    resolve_axis,
    shard_key,
)


def _tracing(*trees: Any) -> bool:
    """Whether this call is being traced (``jit``, ``scan``, ...) rather than run eagerly."""
    # Under a trace every new array is a tracer, even when no argument is one (a closure).
    if isinstance(jnp.zeros(()), jax.core.Tracer):
        return True
    leaves = jax.tree_util.tree_leaves(trees[0]) + flatten(list(trees[1:]), is_tensor)[0]
    return any(isinstance(leaf, jax.core.Tracer) for leaf in leaves)


def cached_step(encoders: Any, inputs: Sequence, loss_fn: Callable, *,
                chunk_size: int | Sequence[int], params: Any, rng: Any = None,
                get_rep: Callable | Sequence | None = None, loss_kwargs: Mapping | None = None,
                loss_takes_params: bool = False, split_fn: Callable | None = None,
                check_finite: bool = False, check_determinism: bool = False,
                determinism_tolerance: float = 1e-5, progress: bool = False,
                axis_name: Any = None, mesh: Any = None) -> tuple[Any, Any]:
    """One contrastive step over a batch larger than memory; returns ``(loss, grads)``.

    ``grads`` equals ``jax.grad`` of ``loss_fn(*[get_rep(enc(params, x)) for ...])`` on the full
    batch, while only one chunk's activations are alive at a time. The step runs under
    ``jax.jit`` (and inside the user's jitted train step); its chunk loop is a ``lax.scan``, so the
    compiled program does not grow with the number of chunks.

    Args:
        encoders: one function shared by every input group, or a sequence with one per group.
            Each is ``f(params, x)``, or ``f(params, x, key)`` when ``rng`` is given, and receives
            the whole ``params`` pytree (tied and separate towers are the same case). ``x`` is a
            chunk with the structure of the group's input (an array, or a dict of arrays).
        inputs: a sequence of input groups, e.g. ``(queries, passages)``. Every array leaf of a
            group is batched along dimension 0; groups may differ in size. Numpy arrays are fine.
        loss_fn: ``loss_fn(*reps, **loss_kwargs)`` returning a scalar, ``reps`` having one entry per
            group with the structure the encoder returned. With ``loss_takes_params`` it is
            ``loss_fn(params, *reps, **loss_kwargs)``.
        chunk_size: rows per chunk, one int or one per group. It bounds memory; it never changes
            the gradients.
        params: the pytree of parameters (a dict, Flax ``nnx.State`` or Linen variables, an
            Equinox module). Its inexact array leaves are differentiated; any other leaf gets
            ``None`` in ``grads``.
        rng: a key. Chunk ``i`` of group ``g`` receives :func:`chunk_key(rng, g, i) <chunk_key>`,
            the same in both passes, so dropout masks match.
        get_rep: picks the representation from an encoder's output (one callable or one per group).
        loss_kwargs: extra keyword arguments for the loss (labels, masks).
        loss_takes_params: the loss owns parameters (a learnable temperature) kept in ``params``:
            it is called with ``params`` first and their gradient is added once.
        split_fn: ``split_fn(group_input, chunk_size) -> list of chunks`` for inputs the core cannot
            slice. Chunks made this way run in a Python loop (the program grows with them).
        check_finite: fail if the loss is NaN or infinite. Eagerly this raises ``GradCacheError``;
            under ``jit`` the check runs on the host when the loss exists and fails the compiled
            call (``jax.errors.JaxRuntimeError`` carrying the message).
        check_determinism: compare pass 2's representations with pass 1's, as ``check_finite``
            (eagerly the step then runs chunk by chunk in Python and raises ``GradCacheError``).
        determinism_tolerance: tolerance of ``check_determinism``, relative to the magnitude.
        progress: a tqdm bar over the chunks of both passes. It follows an eager step (run chunk
            by chunk); under ``jit`` it is off, as the chunks run inside one compiled program.
        axis_name: distributed step. Without ``mesh``: the name of a mesh axis (or a tuple of
            them) of the ``jax.shard_map`` this call runs inside; ``inputs`` are this device's rows,
            the loss sees every device's representations (in device order), and every device
            returns the global loss and the gradient of the whole global batch. Each device's
            step key is ``fold_in(rng, axis_index(axis_name))``. With ``mesh``: the axis the batch
            is split over (default: the mesh's only axis).
        mesh: a ``jax.sharding.Mesh``: ``cached_step`` runs itself under ``jax.shard_map`` over it,
            splitting every input group's rows evenly over ``axis_name`` and replicating
            ``params``, ``rng`` and ``loss_kwargs``; ``chunk_size`` counts rows per device. It
            returns what one device would on the whole global batch (the dropout masks aside,
            drawn per device).

    Returns:
        ``(loss, grads)``: the scalar loss and the gradients with the structure of ``params``.

    Raises:
        GradCacheError: for malformed input, before anything runs, or a failed eager check; with
            ``mesh``, for an input group whose rows the devices cannot share evenly.

    >>> import jax, jax.numpy as jnp
    >>> from gradcache_jax import cached_step
    >>> params = {"w": jax.random.normal(jax.random.PRNGKey(0), (8, 4))}
    >>> encode = lambda p, x: jnp.tanh(x @ p["w"])
    >>> def info_nce(q, d):
    ...     scores = q @ d.T
    ...     return jnp.mean(jax.nn.logsumexp(scores, axis=1) - jnp.diag(scores))
    >>> q, d = jnp.ones((16, 8)), jnp.zeros((16, 8))
    >>> loss, grads = jax.jit(lambda p, q, d: cached_step(encode, (q, d), info_nce,
    ...                                                   chunk_size=4, params=p))(params, q, d)
    >>> grads["w"].shape
    (8, 4)
    """
    if isinstance(inputs, (list, tuple)) and not hasattr(inputs, "_fields"):
        # numpy batches straight from a data loader: make them device arrays once, not per chunk
        inputs = type(inputs)(map_leaves(jnp.asarray, group, lambda v: isinstance(v, np.ndarray))
                              for group in inputs)
    if mesh is not None:
        axis = resolve_axis(mesh, axis_name)

        def shard_step(params: Any, rng: Any, inputs: Any, loss_kwargs: Any) -> tuple[Any, Any]:
            return cached_step(
                encoders, inputs, loss_fn, chunk_size=chunk_size, params=params, rng=rng,
                get_rep=get_rep, loss_kwargs=loss_kwargs, loss_takes_params=loss_takes_params,
                split_fn=split_fn, check_finite=check_finite, check_determinism=check_determinism,
                determinism_tolerance=determinism_tolerance, progress=progress, axis_name=axis)

        return on_mesh(mesh, axis, shard_step, params, rng, inputs, loss_kwargs)
    collective = None
    if axis_name is not None:
        # one device's part of a step inside shard_map: always traced, one program for all devices
        collective = MeshCollective(axis_name)
        if rng is not None:
            rng = shard_key(rng, axis_name)
        backend = ShardedJaxBackend(params, axis_name=axis_name, rng=rng,
                                    loss_takes_params=loss_takes_params, scan=True, concrete=False)
    else:
        traced = _tracing((params, rng), inputs)
        # Eagerly, a progress bar or a determinism check wants the chunks one by one in Python:
        # exact chunk numbers in errors, a bar that moves. Under a trace, scan.
        scan = traced or not (progress or check_determinism)
        backend = JaxBackend(params, rng=rng, loss_takes_params=loss_takes_params, scan=scan,
                             concrete=not traced)
    if loss_takes_params:
        user_loss = loss_fn

        def loss_fn(*reps: Any, **kwargs: Any) -> Any:
            return user_loss(backend.loss_params(), *reps, **kwargs)

        # a loss that communicates itself (across_ranks) must still be handed local rows
        loss_fn.gathers_itself = getattr(user_loss, "gathers_itself", False)

    loss, grads = run_cached_step(
        backend, encoders, inputs, loss_fn, chunk_size=chunk_size, get_rep=get_rep,
        loss_kwargs=loss_kwargs, split_fn=split_fn, check_finite=check_finite,
        check_determinism=check_determinism, determinism_tolerance=determinism_tolerance,
        progress=progress, collective=collective)
    if collective is not None:
        grads = backend.reduce(grads)
    return loss, backend.grads_like_params(grads)
