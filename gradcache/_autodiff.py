"""The loss's gradient and pass 2's pullback, written once over a backend's autodiff primitives.

Both are the same few steps in every framework: flatten the representations to tensor leaves,
take a loss's own ``value_and_grad`` as it is or differentiate the loss with respect to the
floating-point leaves, give zeros to the leaves the loss does not read (or that have no gradient),
and rebuild the structure; in pass 2, re-encode a chunk under its replayed random state, check that
the encoder returned as many tensors as in pass 1, pair each with its cotangent, and pull them back.
Those steps live here. A backend supplies only what its framework does its own way: the value and
gradient of a function of a list of tensors (:meth:`~gradcache.Backend.value_and_grad`, where
torch scales by its ``GradScaler`` and TensorFlow holds its tape and variables), the VJP of an
encoder at its parameters (:meth:`~gradcache.Backend.vjp`, where torch handles DDP and FSDP2), and
where the defaults do not fit its tensors ``differentiable``, ``zeros_like``, ``detach`` and
``scale_loss``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gradcache import _tree
from gradcache._backend import Backend
from gradcache._errors import GradCacheError


def loss_and_rep_grads(backend: Backend, loss_fn: Any, reps: list, grads: Any) -> tuple[Any, list, Any]:
    """Returns ``(loss, dloss/dreps, grads)``; loss-owned parameters' gradients go into ``grads``.

    ``loss_fn`` is a :class:`gradcache.CheckedLoss`. ``dloss/dreps`` mirrors ``reps`` (one nested
    representation per group), times the backend's loss scale, with zeros where the loss does not
    depend on a representation or where it is not floating point.
    """
    leaves, spec = _tree.flatten(reps, backend.is_leaf)
    if loss_fn.supplies_gradient:
        # a loss that knows its gradient (the numpy test losses, hand-written sweeps): no autodiff
        loss, given = loss_fn.value_and_grad(*reps)
        given_leaves, _ = _tree.flatten(list(given), backend.is_leaf)
        if len(given_leaves) != len(leaves):
            raise GradCacheError(
                f"the loss's value_and_grad returned {len(given_leaves)} gradient tensors for "
                f"{len(leaves)} representation tensors; it must return one gradient per "
                f"representation, in the representations' structure")
        scaled = [backend.scale_loss(grad) for grad in given_leaves]
        return backend.detach(loss), _tree.unflatten(spec, scaled), grads
    wrt = [i for i, leaf in enumerate(leaves) if backend.differentiable(leaf)]

    def scaled_loss(values: list) -> tuple[Any, Any]:
        full = list(leaves)
        for i, value in zip(wrt, values):
            full[i] = value
        loss = loss_fn(*_tree.unflatten(spec, full))
        return backend.scale_loss(loss), loss

    loss, value_grads, grads = backend.value_and_grad(scaled_loss, [leaves[i] for i in wrt], grads)
    found: list = [None] * len(leaves)
    for i, grad in zip(wrt, value_grads):
        found[i] = grad
    rep_grads = [backend.zeros_like(leaf) if grad is None else grad
                 for leaf, grad in zip(leaves, found)]
    return backend.detach(loss), _tree.unflatten(spec, rep_grads), grads


def pullback(backend: Backend, encoder: Any, chunk: Any, record: Any, get_rep: Callable,
             rep_grad: Any, grads: Any, *, final_use: bool) -> tuple[Any, Any]:
    """Pass 2 for one chunk: re-encode it under ``record`` and add ``rep_grad``'s VJP into ``grads``.

    Returns ``(grads, recomputed_rep)``, the representation without a graph (what
    ``check_determinism`` compares with pass 1's).
    """
    grad_leaves, _ = _tree.flatten(rep_grad, backend.is_leaf)
    specs: list = []

    def outputs(output: Any) -> tuple[list, list]:
        leaves, spec = _tree.flatten(get_rep(output), backend.is_leaf)
        if len(leaves) != len(grad_leaves):
            raise GradCacheError(
                f"the encoder returned {len(leaves)} tensors in pass 2 but {len(grad_leaves)} in "
                f"pass 1; its output structure must not change between calls")
        specs.append(spec)
        # integer outputs (token ids, lengths) carry no gradient: no cotangent for them
        return leaves, [grad if backend.differentiable(leaf) else None
                        for leaf, grad in zip(leaves, grad_leaves)]

    with backend.rng_replay(record):
        leaves, grads = backend.vjp(encoder, chunk, record, outputs, grads, final_use=final_use)
    return grads, _tree.unflatten(specs[-1], [backend.detach(leaf) for leaf in leaves])
