"""``cached_step`` for JAX: the public entry point, functional and jit-able.

It builds a :class:`JaxBackend` for the step and runs the core's schedule; the gradients come back
in the structure of ``params``, equal to ``jax.grad`` of the full-batch loss. It decides only what
the backend needs to know about the call (is it traced, does the loss take params); the algorithm
stays in the core.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from gradcache import Collective, GradCacheError, StepOptions, flatten, map_leaves, run_cached_step
from gradcache_jax import _streams
from gradcache_jax._backend import JaxBackend, is_tensor
from gradcache_jax._distributed import (
    MeshCollective,
    ShardedJaxBackend,
    on_mesh,
    resolve_axis,
    shard_key,
)

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from gradcache import StepKeywords


def _tracing(*trees: Any) -> bool:
    """Whether this call is being traced (``jit``, ``scan``, ...) rather than run eagerly."""
    # Under a trace every new array is a tracer, even when no argument is one (a closure).
    if isinstance(jnp.zeros(()), jax.core.Tracer):
        return True
    leaves = jax.tree_util.tree_leaves(trees[0]) + flatten(list(trees[1:]), is_tensor)[0]
    return any(isinstance(leaf, jax.core.Tracer) for leaf in leaves)


def cached_step(encoders: Any, inputs: Sequence, loss_fn: Callable, *,
                chunk_size: int | Sequence[int], params: Any, rng: Any = None,
                loss_takes_params: bool = False, axis_name: Any = None, mesh: Any = None,
                **options: Unpack[StepKeywords]) -> tuple[Any, Any]:
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
            ``None`` in ``grads``. A Flax NNX module holding ``nnx.Rngs`` may be passed as it is:
            each chunk sees its streams reseeded with its own key (``chunk_key`` of the stream's
            next draw, in both passes: the split/merge route's masks), and after the step each
            stream has advanced by one draw, in the module you passed (under ``jax.jit``, return
            it to keep that; ``nnx.jit`` does it for you).
        rng: a key. Chunk ``i`` of group ``g`` receives :func:`chunk_key(rng, g, i) <chunk_key>`,
            the same in both passes, so dropout masks match.
        loss_takes_params: the loss owns parameters (a learnable temperature) kept in ``params``:
            it is called with ``params`` first and their gradient is added once.
        distributed: a step over the global batch split over devices. ``True``: a one-axis
            mesh over every device, as with a ``jax.sharding.Mesh`` here: ``cached_step`` runs
            itself under ``jax.shard_map`` over it, splitting every input group's rows evenly over
            the batch axis and replicating ``params``, ``rng`` and ``loss_kwargs``;
            ``chunk_size`` counts rows per device; it returns what one device would on the whole
            global batch (the dropout masks aside, drawn per device). An axis name (or a tuple of
            them): this call runs inside your own ``jax.shard_map`` and ``inputs`` are this
            device's rows; the loss sees every device's representations (in device order), and
            every device returns the global loss and the gradient of the whole global batch.
            Each device's step key is ``fold_in(rng, axis_index(axis))``. Any other
            :class:`gradcache.Collective` (your own transport, ``gradcache.testing.ThreadCollective``)
            runs the core's distributed schedule over it: ``grads`` are then this rank's share
            (times its ``grad_scale``), and summing them over ranks is yours (a loss-owned
            parameter's gradient is the global one on every rank: count it once).
        axis_name: with ``distributed=mesh``, the mesh axis the batch is split over (default: the
            mesh's only axis). ``axis_name=`` alone and ``mesh=`` are the deprecated spellings of
            ``distributed=axis`` and ``distributed=mesh``.
        **options: the options every adapter shares (:class:`gradcache.StepOptions`):
            ``get_rep``, ``loss_kwargs``, ``split_fn`` (its chunks run in a Python loop),
            ``pad_trim`` and ``sort_by_length`` (eagerly only: they read the attention masks,
            whose values a trace does not know), ``check_finite`` and ``check_determinism`` (under
            ``jit`` they run on the host when the values exist and fail the compiled call with a
            ``jax.errors.JaxRuntimeError`` carrying the message -- :func:`unwrap_check_errors`
            around the call gives back the ``GradCacheError`` itself; eagerly the step then runs
            chunk by chunk in Python and raises ``GradCacheError``), ``determinism_tolerance``,
            ``progress`` (eager steps only: under ``jit`` the chunks run inside one program).

    Returns:
        ``(loss, grads)``: the scalar loss and the gradients with the structure of ``params``.

    Raises:
        GradCacheError: for malformed input (a key that is not one JAX key, a loss that gathers
            itself outside a distributed step, an NNX module closed over by a jitted function),
            before anything runs; an integer-valued loss; a failed eager check; with ``mesh``, for
            an input group whose rows the devices cannot share evenly.

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
    setup = Setup(inputs, loss_fn, options, entry="cached_step", axis_name=axis_name, mesh=mesh,
                  rng=rng, loss_takes_params=loss_takes_params,
                  own=("params", "rng", "loss_takes_params", "axis_name", "mesh"))
    with _streams.advancing(params):   # a Flax NNX module's own random streams, if any
        return _step(setup, encoders, loss_fn, chunk_size, params, rng, loss_takes_params)


def _step(setup: Setup, encoders: Any, loss_fn: Callable, chunk_size: Any, params: Any, rng: Any,
          loss_takes_params: bool) -> tuple[Any, Any]:
    if setup.mesh is not None:
        per_device = {name: value for name, value in setup.keywords.items() if name != "loss_kwargs"}

        def shard_step(params: Any, rng: Any, inputs: Any, loss_kwargs: Any) -> tuple[Any, Any]:
            return cached_step(encoders, inputs, loss_fn, chunk_size=chunk_size, params=params,
                               rng=rng, loss_takes_params=loss_takes_params,
                               loss_kwargs=loss_kwargs, distributed=setup.axis, **per_device)

        return on_mesh(setup.mesh, setup.axis, shard_step, params, rng, setup.inputs,
                       setup.keywords["loss_kwargs"], checked=setup.checks())
    backend = setup.backend(params, setup.device_key(rng))
    loss, grads = run_cached_step(backend, encoders, setup.inputs,
                                  setup.loss_for(backend, differentiate=True),
                                  chunk_size=chunk_size, collective=setup.collective(),
                                  **setup.keywords)
    if isinstance(backend, ShardedJaxBackend):   # one sum of the encoders' gradients over devices
        grads = backend.reduce(grads)
    return loss, backend.grads_like_params(grads)


def _check_key(rng: Any) -> None:
    """Raises a GradCacheError unless ``rng`` is ``None`` or one JAX key (typed, or a legacy
    ``PRNGKey``'s uint32 data), before it reaches an encoder in a form fold_in cannot take."""
    if rng is None:
        return
    dtype, shape = getattr(rng, "dtype", None), getattr(rng, "shape", None)
    typed = dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key)
    if (typed and shape == ()) or (not typed and dtype == jnp.uint32 and shape is not None
                                   and len(shape) == 1):
        return
    what = (f"a key array of shape {shape} (one key per step: split it outside)" if typed
            else f"{type(rng).__name__}" + (f" of dtype {dtype} and shape {shape}"
                                           if dtype is not None else f" {rng!r}"))
    raise GradCacheError(f"rng must be one JAX key (jax.random.key(seed) or "
                         f"jax.random.PRNGKey(seed)), got {what}")


class Setup:
    """What ``cached_step`` and ``cached_loss`` make of their arguments, in one place.

    The shared options parsed and checked (:class:`gradcache.StepOptions`) and the key too;
    ``distributed=`` (and its deprecated spellings) resolved to a mesh to run on (:attr:`mesh`, :attr:`axis`), the axis
    of the ``shard_map`` the call runs in (:attr:`axis_name`), or a collective of the caller's own;
    numpy input groups made device arrays once; then, per call, the backend for its ``params``
    and key, and the loss as the core calls it.
    """

    def __init__(self, inputs: Any, loss_fn: Callable, options: Any, *, entry: str,
                 own: Sequence[str], axis_name: Any, rng: Any, loss_takes_params: bool,
                 mesh: Any = None):
        step = StepOptions.from_keywords(options, adapter="gradcache_jax", own=own, entry=entry)
        _check_key(rng)
        given = step.distributed if isinstance(step.distributed, Collective) and not isinstance(
            step.distributed, MeshCollective) else None
        if given is not None and entry == "cached_loss":
            raise GradCacheError(
                "cached_loss runs distributed over a JAX mesh: distributed=True, a "
                "jax.sharding.Mesh, or the axis name of the shard_map it runs in. A "
                "gradcache.Collective of your own (each rank returning its share of the "
                "gradient) is for cached_step")
        if given is not None and (mesh is not None or axis_name is not None):
            raise GradCacheError("distributed= is a collective of your own: it cannot be combined "
                                 "with mesh= or axis_name=")
        self.given = given
        self.mesh, self.axis_name = _distribution(None if given else step.distributed, mesh,
                                                  axis_name)
        #: the mesh axis (or axes) the batch is split over, when this call runs on a mesh
        self.axis = None if self.mesh is None else resolve_axis(self.mesh, self.axis_name)
        if (getattr(loss_fn, "gathers_itself", False) and given is None and self.mesh is None
                and self.axis_name is None):
            # the core's message would say distributed=...; in JAX that is a mesh or an axis
            axis = getattr(loss_fn, "axis_name", None)
            raise GradCacheError(
                f"the loss {loss_fn!r} gathers every device's rows itself, so {entry} must run "
                f"distributed: pass distributed=mesh (or True: a mesh over every device) to split "
                f"the batch over the devices, or, called inside your own jax.shard_map, "
                f"distributed={'the name of the axis the loss gathers over' if axis is None else repr(axis)}")
        self.loss_takes_params = loss_takes_params
        self.keywords = step.step_keywords()
        self.inputs = inputs
        if isinstance(inputs, (list, tuple)) and not hasattr(inputs, "_fields"):
            # numpy batches straight from a data loader: make them device arrays once, not per chunk
            self.inputs = type(inputs)(
                map_leaves(jnp.asarray, group, lambda v: isinstance(v, np.ndarray))
                for group in inputs)
        self._loss_fn = loss_fn

    def on_device(self) -> Setup:
        """This setup for one device's part of the call, inside the ``shard_map`` over
        :attr:`mesh` (what ``cached_step`` gets when called there with ``distributed=axis``)."""
        inner = copy.copy(self)
        inner.mesh, inner.axis_name, inner.axis = None, self.axis, None
        return inner

    def checks(self) -> bool:
        """Whether the call runs host checks (``check_finite``, ``check_determinism``)."""
        return bool(self.keywords["check_finite"] or self.keywords["check_determinism"])

    def sharded(self) -> bool:
        """Whether this call is one device's part of a step, inside a ``shard_map``."""
        return self.axis_name is not None and self.mesh is None

    def collective(self) -> Collective | None:
        """The collective of the core's distributed schedule: the caller's own, or the axis of
        the ``shard_map`` the call runs in (looked up where it runs: outside, a GradCacheError)."""
        if self.given is not None:
            return self.given
        return MeshCollective(self.axis_name) if self.sharded() else None

    def device_key(self, rng: Any) -> Any:
        """This device's step key: inside a ``shard_map``, ``fold_in(rng, axis_index)``."""
        return shard_key(rng, self.axis_name) if self.sharded() and rng is not None else rng

    def backend(self, params: Any, rng: Any, inputs: Any = None) -> JaxBackend:
        """The backend of one call, ``rng`` being this device's key (:meth:`device_key`). Inside a
        ``shard_map``: sharded, always traced (one program for every device). Else it scans the
        chunks, unless an eager call wants them one by one in Python (a progress bar, a
        determinism check with exact chunk numbers)."""
        if self.sharded():
            self.collective()   # outside a shard_map binding the axis: a GradCacheError, first
            return ShardedJaxBackend(params, axis_name=self.axis_name, rng=rng,
                                     loss_takes_params=self.loss_takes_params, scan=True,
                                     concrete=False)
        traced = _tracing((params, rng), self.inputs if inputs is None else inputs)
        scan = traced or not (self.keywords["progress"] or self.keywords["check_determinism"])
        return JaxBackend(params, rng=rng, loss_takes_params=self.loss_takes_params, scan=scan,
                          concrete=not traced)

    def loss_for(self, backend: JaxBackend, *, differentiate: bool) -> Callable:
        """The loss as the core calls it: with ``loss_takes_params``, handed the params first --
        those being differentiated, or (the loss alone, no gradient) the params as they are."""
        user_loss = self._loss_fn
        if not self.loss_takes_params:
            return user_loss

        def with_params(*reps: Any, **kwargs: Any) -> Any:
            params = backend.loss_params() if differentiate else backend.params
            return user_loss(params, *reps, **kwargs)

        # a loss that communicates itself (across_ranks) must still be handed local rows
        with_params.gathers_itself = getattr(user_loss, "gathers_itself", False)  # type: ignore[attr-defined]
        with_params.__wrapped__ = user_loss  # type: ignore[attr-defined]  # checked by the core
        return with_params


def _distribution(distributed: Any, mesh: Any, axis_name: Any) -> tuple[Any, Any]:
    """``(mesh, axis_name)`` from the one ``distributed=`` argument (and the deprecated spellings).

    ``True``: a one-axis mesh over every device; a ``Mesh``: that mesh (``axis_name`` picks its
    batch axis when it has several); an axis name or a tuple of them: the axes of the
    ``shard_map`` this call runs inside; a :class:`MeshCollective`: its axis.
    """
    if mesh is not None:
        warnings.warn("cached_step(..., mesh=m) is deprecated: pass distributed=m (and axis_name= "
                      "for a mesh of several axes)", DeprecationWarning, stacklevel=4)
        if distributed not in (False, None):
            raise GradCacheError("pass the mesh once, as distributed=mesh (mesh= is deprecated)")
        return mesh, axis_name
    if distributed is False or distributed is None:
        if axis_name is not None:
            warnings.warn("cached_step(..., axis_name=a) inside shard_map is deprecated: pass "
                          "distributed=a", DeprecationWarning, stacklevel=4)
        return None, axis_name
    if distributed is True:   # a one-axis mesh over every device, its axis named by axis_name
        if axis_name is not None and not isinstance(axis_name, str):
            raise GradCacheError(f"with distributed=True, axis_name names the one axis of the mesh "
                                 f"over every device: a string, got {axis_name!r}")
        name = axis_name or "batch"
        return jax.sharding.Mesh(np.array(jax.devices()), (name,)), name
    if isinstance(distributed, jax.sharding.Mesh):
        return distributed, axis_name
    if isinstance(distributed, MeshCollective):
        return None, distributed.axis_name
    if isinstance(distributed, (str, tuple)):
        if axis_name is not None and axis_name != distributed:
            raise GradCacheError(f"distributed={distributed!r} and axis_name={axis_name!r} name "
                                 f"different axes; pass the axis once, as distributed=")
        return None, distributed
    raise GradCacheError(
        f"distributed= takes False, True (a mesh over every device), a jax.sharding.Mesh, the "
        f"axis name (or tuple of names) of the shard_map the step runs in, or a MeshCollective; "
        f"got {distributed!r}")
