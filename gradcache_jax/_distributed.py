"""The distributed cached step for JAX: one shard of a step per device of a mesh axis.

Under ``jax.shard_map`` every device runs the same program on its own rows, so the core's
distributed schedule needs only the primitives of :class:`MeshCollective` over a mesh axis: the
representations are gathered in device order, the loss and its gradient are taken on the global
batch (the same on every device), and each device pulls its own rows' gradient back through its
encoders. :class:`ShardedJaxBackend` then sums the encoders' gradients over the axis once, at the end,
and adds the loss-owned parameters' gradient once -- it is the global one on every device already.
The algorithm stays in the core; this module only says how a JAX mesh axis communicates.

Under shard_map's type checking (``check_vma=True``, the default) the parameters are *invariant*
over the axis. Differentiating an invariant value through per-device (varying) computations makes
JAX insert a ``psum`` into the backward, so the backend differentiates the encoders at varying
copies of the parameters (one sum at the end instead of one per chunk) and gathers the
representations as invariant values (the loss and its parameters' gradient stay per-device
identical, never summed). With ``check_vma=False`` the casts are no-ops and the sums are the same.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from gradcache import Collective, GradCacheError
from gradcache_jax import _streams
from gradcache_jax._backend import JaxBackend, is_tensor
from gradcache_jax._check_errors import run_unwrapped

AxisName = Any  # a mesh axis name, or a tuple of them (the batch split over several axes)


def _axes(axis_name: AxisName) -> tuple:
    return tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (axis_name,)


def _varying_axes(leaf: Any) -> frozenset:
    try:
        return frozenset(jax.typeof(leaf).manual_axis_type.varying)
    except AttributeError:  # a JAX without shard_map's varying-axis types
        return frozenset()


def to_varying(leaf: Any, axis_name: AxisName) -> Any:
    """``leaf`` typed as varying over ``axis_name`` (a no-op where it is, or without type checks)."""
    missing = tuple(axis for axis in _axes(axis_name) if axis not in _varying_axes(leaf))
    if not missing:
        return leaf
    if hasattr(lax, "pcast"):
        return lax.pcast(leaf, missing, to="varying")
    if hasattr(lax, "pvary"):  # pragma: no cover - older JAX
        return lax.pvary(leaf, missing)
    return leaf  # pragma: no cover - JAX without varying-axis types


def _gathers_invariant() -> bool:
    return "to" in inspect.signature(lax.all_gather).parameters


def axis_size(axis_name: AxisName) -> int:
    """The static number of devices along ``axis_name``; a GradCacheError outside shard_map."""
    try:
        return math.prod(lax.axis_size(axis) for axis in _axes(axis_name))
    except NameError as error:
        raise GradCacheError(
            f"{axis_name!r} is not a mesh axis bound here: with distributed={axis_name!r}, call "
            f"cached_step (or cached_loss's f) inside jax.shard_map over a mesh with that axis, or "
            f"pass distributed=mesh (or True) to let it shard the batch itself ({error})") from None


class MeshCollective(Collective):
    """The core's :class:`~gradcache.Collective` over a mesh axis, for use inside ``jax.shard_map``.

    SPMD: every device runs one program with the same static shapes, so there is nothing to agree
    on (:attr:`agrees` is false and ``exchange`` is never called) and every device holds the same
    number of rows. ``world_size`` is the axis size; ``axis_name`` may be a tuple of axes, which then
    count as one axis in row-major order (as ``lax.axis_index`` numbers them).
    """

    agrees = False
    grad_scale = 1.0

    def __init__(self, axis_name: AxisName):
        self.axis_name = axis_name
        self.world_size = axis_size(axis_name)

    def _rows(self, counts: Sequence[int]) -> int:
        if len(set(counts)) != 1:  # pragma: no cover - SPMD shapes are static and equal
            raise GradCacheError(f"every device of a mesh axis holds as many rows; got {list(counts)}")
        return counts[0]

    @property
    def rank(self) -> Any:
        """This device's (traced) index along the axis."""
        return lax.axis_index(self.axis_name)

    def all_gather_rows(self, leaf: Any, counts: Sequence[int]) -> Any:
        self._rows(counts)
        if _gathers_invariant():
            # the same global batch on every device, typed so: the loss (and the gradient of the
            # parameters it owns) is then invariant, and autodiff adds no sum over devices to it
            return lax.all_gather(leaf, self.axis_name, tiled=True, to="invarying")
        return lax.all_gather(leaf, self.axis_name, tiled=True)  # pragma: no cover - older JAX

    def local_rows(self, leaf: Any, counts: Sequence[int]) -> Any:
        rows = self._rows(counts)
        return lax.dynamic_slice_in_dim(leaf, self.rank * rows, rows, axis=0)

    def reduce_scatter_rows(self, leaf: Any, counts: Sequence[int]) -> Any:
        self._rows(counts)
        return lax.psum_scatter(to_varying(leaf, self.axis_name), self.axis_name,
                                scatter_dimension=0, tiled=True)

    def all_reduce_sum(self, value: Any) -> Any:
        return lax.psum(value, self.axis_name)


class ShardedJaxBackend(JaxBackend):
    """:class:`JaxBackend` for one shard of a distributed step (inside ``jax.shard_map``).

    The encoders are differentiated at varying copies of the trainable leaves, so each shard's
    pass 2 accumulates its own rows' contribution; :meth:`reduce` sums them over the axis once.
    The loss-owned parameters' gradient, the same global value on every shard, is kept apart and
    added after the sum, once.
    """

    ordered_checks = False  # JAX refuses ordered host callbacks on more than one device

    def __init__(self, params: Any, *, axis_name: AxisName, **options: Any):
        self.axis_name = axis_name   # before the streams' step keys are made (stream_step_key)
        super().__init__(params, **options)
        # made here, at the step's trace level, not inside a scanned loop body
        self._varying = [to_varying(leaf, axis_name) for leaf in self.trainable()]
        self._loss_param_grads: Any = None

    def encoder_trainable(self) -> list:
        return self._varying

    def stream_step_key(self, key: Any, count: Any) -> Any:
        # devices must not share masks: as the step key, fold in the device's index
        return _streams.fold(super().stream_step_key(key, count), lax.axis_index(self.axis_name))

    def zero_grads(self) -> tuple:
        return tuple(to_varying(zero, self.axis_name) for zero in super().zero_grads())

    def add_loss_param_grads(self, grads: Sequence, param_grads: Sequence) -> tuple:
        self._loss_param_grads = tuple(param_grads)
        return tuple(grads)

    def reduce(self, grads: Sequence) -> tuple:
        """The global gradient: the shards' encoder gradients summed, plus the loss's own once."""
        summed = tuple(lax.psum(tuple(grads), self.axis_name))
        if self._loss_param_grads is not None:
            summed = self._add(summed, self._loss_param_grads)
        return summed


def shard_key(rng: Any, axis_name: AxisName) -> Any:
    """This shard's step key: ``fold_in(rng, axis_index)``, so shards draw different masks."""
    return jax.random.fold_in(rng, lax.axis_index(axis_name))


# -- the mesh wrapper -------------------------------------------------------------------------------

def _shard_map() -> Callable:
    if hasattr(jax, "shard_map"):
        return jax.shard_map
    from jax.experimental.shard_map import shard_map  # pragma: no cover - older JAX

    return shard_map  # pragma: no cover


def resolve_axis(mesh: Any, axis_name: AxisName | None) -> AxisName:
    """The batch axis (or axes) of ``mesh``: ``axis_name``, or the mesh's only axis."""
    names = tuple(mesh.axis_names)
    if axis_name is None:
        if len(names) != 1:
            raise GradCacheError(
                f"the mesh has axes {names}; pass axis_name= naming the one the batch is split over "
                f"(or a tuple of them)")
        return names[0]
    for axis in _axes(axis_name):
        if axis not in names:
            raise GradCacheError(f"axis_name {axis!r} is not an axis of the mesh, whose axes are {names}")
    return tuple(axis_name) if isinstance(axis_name, list) else axis_name


def _split_arrays(tree: Any) -> tuple[list, Callable[[list], Any]]:
    """The array leaves of ``tree`` (what crosses into shard_map) and how to put them back."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    where = [i for i, leaf in enumerate(leaves) if is_tensor(leaf)]

    def rebuild(arrays: list) -> Any:
        full = list(leaves)
        for i, array in zip(where, arrays, strict=True):
            full[i] = array
        return jax.tree_util.tree_unflatten(treedef, full)

    return [leaves[i] for i in where], rebuild


def _check_divisible(inputs: Sequence, world: int, axis_name: AxisName) -> None:
    if not isinstance(inputs, (list, tuple)):
        return  # the core says what inputs must be
    for group, group_inputs in enumerate(inputs):
        for leaf in jax.tree_util.tree_leaves(group_inputs):
            if not is_tensor(leaf) or leaf.ndim == 0:
                continue  # the core words errors about leaves without a batch dimension
            if leaf.shape[0] % world:
                raise GradCacheError(
                    f"input group {group} has {leaf.shape[0]} rows (a leaf of shape "
                    f"{tuple(leaf.shape)}), which the {world} devices of mesh axis {axis_name!r} "
                    f"cannot share evenly; every device holds the same number of rows: use a "
                    f"batch that is a multiple of {world}, or drop or pad the last rows")


def on_mesh(mesh: Any, axis_name: AxisName, shard_step: Callable, params: Any, rng: Any,
            inputs: Sequence, loss_kwargs: Any, *, checked: bool = False) -> Any:
    """Runs ``shard_step(params, rng, inputs, loss_kwargs)`` under ``shard_map`` over ``mesh``.

    The inputs' array leaves are split along dimension 0 over ``axis_name``; the params, the key
    and the loss's keyword arrays are replicated; everything that is not an array is closed over.
    What the step returns is the same on every device. Run eagerly, the ``shard_map`` is a
    compiled program of gradcache's own: a check failing in it raises its ``GradCacheError``
    (``checked``: the step runs checks, so wait for its results to surface a failure here).
    """
    world = math.prod(mesh.shape[axis] for axis in _axes(axis_name))
    _check_divisible(inputs, world, axis_name)
    param_arrays, params_back = _split_arrays(params)
    rng_arrays, rng_back = _split_arrays(rng)
    input_arrays, inputs_back = _split_arrays(inputs)
    kwarg_arrays, kwargs_back = _split_arrays(loss_kwargs)

    def body(param_arrays: list, rng_arrays: list, input_arrays: list, kwarg_arrays: list) -> Any:
        return shard_step(params_back(param_arrays), rng_back(rng_arrays),
                          inputs_back(input_arrays), kwargs_back(kwarg_arrays))

    spec = jax.sharding.PartitionSpec
    replicated, split = spec(), spec(axis_name)
    args = (param_arrays, rng_arrays, input_arrays, kwarg_arrays)
    if any(kind == jax.sharding.AxisType.Explicit for kind in getattr(mesh, "axis_types", ())):
        # an explicit-sharding mesh wants the arguments laid out as in_specs says, not resharded
        def place(arrays: list, partition: Any) -> list:
            sharding = jax.sharding.NamedSharding(mesh, partition)
            return [jax.reshard(jnp.asarray(a), sharding) for a in arrays]

        args = (place(param_arrays, replicated), place(rng_arrays, replicated),
                place(input_arrays, split), place(kwarg_arrays, replicated))
    sharded = _shard_map()(body, mesh=mesh, in_specs=(replicated, replicated, split, replicated),
                           out_specs=replicated)
    eager = not isinstance(jnp.zeros(()), jax.core.Tracer)
    return run_unwrapped(lambda: sharded(*args), wait=checked and eager)
