"""``cached_loss`` for JAX: the cached loss as a function of the parameters, with a custom VJP.

``cached_loss(encoders, inputs, loss_fn, chunk_size=...)`` returns ``f`` with ``f(params)`` the
full-batch loss. Its forward rule is the core's :func:`gradcache.cached_forward` (pass 1, the loss
and ``dloss/dreps``); its backward rule is :func:`gradcache.cached_backward` with the incoming
cotangent as ``upstream`` (pass 2). JAX's own autodiff drives it, so ``jax.grad``,
``jax.value_and_grad``, ``nnx.value_and_grad``, ``eqx.filter_value_and_grad``, ``jit`` either way
round, a scaled loss and other terms added all compose with it; evaluated without differentiation,
``f(params)`` takes the loss alone.

What the forward leaves for the backward crosses the ``custom_vjp`` boundary as residuals: every
array (the parameters, the key, each group's rows, the representations' gradients, the chunks' keys,
the loss-owned parameters' gradient) as a residual leaf, and everything static (the chunk plans, the
encoders, the trees' shapes) as the aux data of a pytree node, from which the backward rebuilds the
:class:`gradcache.CachedForward`. Nothing traced in the forward is closed over by the backward.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import jax
from jax.custom_derivatives import SymbolicZero

from gradcache import (
    CachedForward,
    GradCacheError,
    Rendezvous,
    cached_backward,
    cached_forward,
    flatten,
    unflatten,
)
from gradcache._chunks import ChunkItems
from gradcache_jax import _streams
from gradcache_jax._backend import JaxBackend, is_tensor
from gradcache_jax._distributed import ShardedJaxBackend, on_mesh
from gradcache_jax._step import Setup

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from gradcache import StepKeywords


class _Static:
    """Python objects carried from the forward rule to the backward one as pytree aux data.

    It has no leaves; it compares by identity, so JAX can hash the residuals' tree structure.
    """

    def __init__(self, value: Any):
        self.value = value


jax.tree_util.register_pytree_node(_Static, lambda node: ((), node),
                                   lambda node, _: node)


def _arrays(tree: Any) -> tuple[list, list, Callable[[list], Any]]:
    """The array leaves of ``tree``, their positions among its leaves, and how to put them back."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    where = [i for i, leaf in enumerate(leaves) if is_tensor(leaf)]

    def rebuild(arrays: Sequence) -> Any:
        full = list(leaves)
        for i, array in zip(where, arrays, strict=True):
            full[i] = array
        return jax.tree_util.tree_unflatten(treedef, full)

    return [leaves[i] for i in where], where, rebuild


def cached_loss(encoders: Any, inputs: Sequence, loss_fn: Callable, *,
                chunk_size: int | Sequence[int], rng: Any = None,
                loss_takes_params: bool = False, axis_name: Any = None,
                **options: Unpack[StepKeywords]) -> Callable[[Any], Any]:
    """The full-batch contrastive loss as a function of the parameters, differentiated by caching.

    ``f = cached_loss(encoders, inputs, loss_fn, chunk_size=...)`` returns ``f(params)``, the loss
    :func:`cached_step` would return, and JAX differentiates it with a custom VJP: the forward is
    pass 1 (no activations kept) and the loss, the backward is pass 2 pulling the incoming
    cotangent times ``dloss/dreps`` back chunk by chunk. So ``jax.grad(f)`` equals ``jax.grad`` of
    the full-batch loss, with only one chunk's activations alive at a time, and anything built on
    ``f`` -- ``jax.value_and_grad``, ``nnx.value_and_grad``, ``eqx.filter_value_and_grad``,
    ``0.5 * f(p) + l2(p)``, ``jit`` outside or inside the gradient -- gets the cached gradient.
    ``f(params)`` without differentiation takes the loss alone (no gradient computed).

    Only ``params`` is differentiated: differentiating ``f`` with respect to an input (or a loss
    keyword array) raises a :class:`GradCacheError`. ``f`` is functional: it may be called,
    differentiated and its VJP applied any number of times.

    Args:
        encoders, inputs, loss_fn, chunk_size, rng, loss_takes_params: as in :func:`cached_step`.
            ``inputs`` may be traced (the batch of your jitted train step).
        axis_name: with ``distributed=mesh``, the mesh axis the batch is split over.
        **options: as in :func:`cached_step`: ``get_rep``, ``loss_kwargs``, ``split_fn``,
            ``pad_trim`` and ``sort_by_length`` (eagerly only), ``check_finite``,
            ``check_determinism``, ``determinism_tolerance``, ``progress`` (eagerly) and
            ``distributed`` (``True``, a ``jax.sharding.Mesh``, or the axis name of the
            ``jax.shard_map`` ``f`` is called in; a :class:`gradcache.Collective` of your own is
            for :func:`cached_step`).

    Returns:
        ``f(params) -> loss``, a scalar.

    Raises:
        GradCacheError: for malformed input, when ``f`` is called (a malformed ``rng`` or a loss
            that gathers itself outside a distributed step at once); for a gradient asked of the
            inputs; for an integer-valued loss when differentiated. A check failing under
            ``jit``: see :func:`cached_step` and :func:`unwrap_check_errors`. ``f`` of a Flax NNX
            module holding ``nnx.Rngs`` advances its streams as :func:`cached_step` does.

    >>> import jax, jax.numpy as jnp
    >>> from gradcache_jax import cached_loss
    >>> params = {"w": jax.random.normal(jax.random.PRNGKey(0), (8, 4))}
    >>> encode = lambda p, x: jnp.tanh(x @ p["w"])
    >>> def info_nce(q, d):
    ...     scores = q @ d.T
    ...     return jnp.mean(jax.nn.logsumexp(scores, axis=1) - jnp.diag(scores))
    >>> q = jax.random.normal(jax.random.PRNGKey(1), (16, 8))
    >>> d = jax.random.normal(jax.random.PRNGKey(2), (16, 8))
    >>> @jax.jit
    ... def train_step(params, q, d):
    ...     f = cached_loss(encode, (q, d), info_nce, chunk_size=4)
    ...     l2 = lambda p: 1e-4 * jnp.sum(p["w"] ** 2)          # other terms compose
    ...     loss, grads = jax.value_and_grad(lambda p: f(p) + l2(p))(params)
    ...     return loss, jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
    >>> loss, params = train_step(params, q, d)
    >>> params["w"].shape
    (8, 4)
    """
    setup = Setup(inputs, loss_fn, options, entry="cached_loss", axis_name=axis_name, rng=rng,
                  loss_takes_params=loss_takes_params,
                  own=("rng", "loss_takes_params", "axis_name"))
    loss_kwargs = setup.keywords["loss_kwargs"]
    run = _Run(setup, encoders, chunk_size,
               {name: value for name, value in setup.keywords.items() if name != "loss_kwargs"})

    if setup.mesh is not None:
        mesh, axis = setup.mesh, setup.axis
        on_device = dataclasses.replace(run, setup=setup.on_device())

        def on_devices(params: Any) -> Any:
            def shard(params: Any, rng: Any, inputs: Any, loss_kwargs: Any) -> Any:
                return _loss(on_device, params, rng, inputs, loss_kwargs)

            with _streams.advancing(params):
                return on_mesh(mesh, axis, shard, params, rng, setup.inputs, loss_kwargs,
                               checked=setup.checks())

        return on_devices

    def f(params: Any) -> Any:
        with _streams.advancing(params):   # a Flax NNX module's own random streams, if any
            return _loss(run, params, rng, setup.inputs, loss_kwargs)

    return f


@dataclasses.dataclass(frozen=True)
class _Run:
    """What ``f`` needs to run the two halves: the call's :class:`Setup`, the encoders, the chunk
    sizes and the core's keywords other than the loss's (those travel as arrays)."""

    setup: Setup
    encoders: Any
    chunk_size: Any
    options: dict

    def forward(self, backend: JaxBackend, inputs: Any, loss_kwargs: Any, *,
                differentiate: bool) -> CachedForward:
        return cached_forward(backend, self.encoders, inputs,
                              self.setup.loss_for(backend, differentiate=differentiate),
                              chunk_size=self.chunk_size, loss_kwargs=loss_kwargs,
                              collective=self.setup.collective(), differentiate=differentiate,
                              **self.options)


def _loss(run: _Run, params: Any, rng: Any, inputs: Any, loss_kwargs: Any) -> Any:
    """``f(params)``: one ``custom_vjp`` function over the arrays of the step's arguments."""
    setup = run.setup
    param_arrays, param_where, params_back = _arrays(params)
    rng_arrays, _, rng_back = _arrays(setup.device_key(rng))
    input_arrays, _, inputs_back = _arrays(inputs)
    kwarg_arrays, _, kwargs_back = _arrays(loss_kwargs)

    def build(p: list, r: list) -> JaxBackend:
        return setup.backend(params_back(p), rng_back(r), inputs)

    @jax.custom_vjp
    def loss_of(p: list, r: list, i: list, k: list) -> Any:
        backend = build(p, r)
        return run.forward(backend, inputs_back(i), kwargs_back(k), differentiate=False).loss

    # Symbolic zeros tell the forward rule which arguments are differentiated (an input must not
    # be); JAX does not support them under shard_map, where that check is not made.
    symbolic = not setup.sharded()

    def fwd(p: list, r: list, i: list, k: list) -> tuple[Any, Any]:
        if symbolic:
            for what, primals in (("an input", i), ("a loss_kwargs array", k)):
                if any(primal.perturbed for primal in primals):
                    raise GradCacheError(
                        f"cached_loss differentiates the parameters only, and a gradient was asked "
                        f"of {what}: differentiate f(params) with respect to params (pass the "
                        f"batch as data), or compute that gradient without gradient caching")
            p, r, i, k = ([primal.value for primal in primals] for primals in (p, r, i, k))
        backend = build(p, r)
        forward = run.forward(backend, inputs_back(i), kwargs_back(k), differentiate=True)
        return forward.loss, _save(forward, backend, p, r)
    def bwd(saved: tuple, upstream: Any) -> tuple:
        p, r, state_leaves, skeleton = saved
        if isinstance(upstream, SymbolicZero):   # nothing flows into the loss: no gradient
            return (None, None, None, None)
        backend = build(p, r)
        forward = _restore(backend, state_leaves, skeleton.value)
        if isinstance(backend, ShardedJaxBackend) and backend._loss_param_grads is not None:
            # a sharded step keeps the loss-owned gradient apart from the accumulator (it is the
            # global one on every device, added once after the sum): scale it here as the core
            # scales the accumulator
            backend._loss_param_grads = tuple(
                backend.multiply(grad, upstream) for grad in backend._loss_param_grads)
        grads = cached_backward(forward, upstream=upstream)
        if isinstance(backend, ShardedJaxBackend):   # one sum of the encoders' gradients over devices
            grads = backend.reduce(grads)
        full: list = [None] * (max(param_where, default=-1) + 1)
        for index, grad in zip(backend._trainable, grads, strict=True):
            full[index] = grad
        # a leaf that is not trained (an integer array) gets a zero cotangent: None
        cotangents = [None if full[w] is None else full[w].astype(leaf.dtype)
                      for w, leaf in zip(param_where, p, strict=True)]
        return (cotangents, None, None, None)

    loss_of.defvjp(fwd, bwd, symbolic_zeros=symbolic)
    return loss_of(param_arrays, rng_arrays, input_arrays, kwarg_arrays)


def _save(forward: CachedForward, backend: JaxBackend, params: list, rng: list) -> tuple:
    """The residuals of a forward: its arrays as leaves, the rest as a :class:`_Static`."""
    state = {
        "inputs": [group.inputs for group in forward.groups],
        "pre_split": [group.pre_split for group in forward.groups],
        "grads": forward.grads,
        "rep_grads": forward.rep_grads,
        "reps": forward.reps,
        "records": [(items.looped, items.stacked, items.single) for items in forward.records],
        "loss_param_grads": getattr(backend, "_loss_param_grads", None),
    }
    leaves, spec = flatten(state, is_tensor)
    groups = [dataclasses.replace(group, inputs=None, pre_split=None) for group in forward.groups]
    skeleton = {"spec": spec, "groups": groups, "specs": [items.spec for items in forward.records],
                "check_determinism": forward.check_determinism,
                "determinism_tolerance": forward.determinism_tolerance,
                "collective": forward.rendezvous.collective, "bar": forward.bar}
    # the forward object itself is done with: what pass 2 needs lives in the residuals
    forward.close()
    return list(params), list(rng), leaves, _Static(skeleton)


def _restore(backend: JaxBackend, leaves: list, skeleton: dict) -> CachedForward:
    """A :class:`CachedForward` for ``backend`` from the residuals :func:`_save` made."""
    state = unflatten(skeleton["spec"], leaves)
    groups = [dataclasses.replace(group, inputs=inputs, pre_split=pre_split)
              for group, inputs, pre_split in zip(skeleton["groups"], state["inputs"],
                                                  state["pre_split"], strict=True)]
    records = [ChunkItems(looped, list(stacked), spec, list(single))
               for (looped, stacked, single), spec in zip(state["records"], skeleton["specs"],
                                                           strict=True)]
    if state["loss_param_grads"] is not None:
        backend._loss_param_grads = tuple(state["loss_param_grads"])   # type: ignore[attr-defined]
    return CachedForward(backend, groups, list(state["reps"]), records, list(state["rep_grads"]),
                         None, state["grads"], skeleton["check_determinism"],
                         skeleton["determinism_tolerance"],
                         Rendezvous(skeleton["collective"], planned=1), skeleton["bar"])
