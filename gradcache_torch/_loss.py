"""``cached_loss`` for PyTorch: the cached loss as a tensor whose ``backward()`` runs pass 2.

Pass 1 and the loss run at the call (the core's :func:`gradcache.cached_forward`); the loss comes
back in the autograd graph through a :class:`torch.autograd.Function` whose backward receives the
incoming gradient of the loss -- ``1 / accumulation_steps``, a ``GradScaler``'s scale, whatever the
caller's graph puts there -- and runs the core's :func:`gradcache.cached_backward` with it inside
the backend's transaction, then adds the loss-owned gradients (deferred at the loss, scaled by the
same upstream). There is one pass 2, the core's; this module only wires it into torch's backward
and guards what can go wrong between the two halves (parameters updated, train/eval switched,
autocast left, a second backward). It never writes a gradient outside that backward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from gradcache import CachedForward, GradCacheError, _tree, cached_backward, cached_forward
from gradcache_torch._backend import (
    TorchBackend,
    check_keep_first_graph,
    owning_module,
    trained_parameters,
)
from gradcache_torch._step import _Setup

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from gradcache import StepKeywords


def cached_loss(encoders: Any, inputs: Sequence, loss_fn: Callable, *,
                chunk_size: int | Sequence[int], keep_first_graph: bool = True,
                **options: Unpack[StepKeywords]) -> torch.Tensor:
    """The contrastive loss of a batch larger than memory, as a tensor to call ``backward()`` on.

    Runs pass 1 (every chunk encoded without a graph but the first, its random state recorded) and
    the loss now, and returns the loss as a scalar in the autograd graph. ``backward()`` on it -- or on anything
    computed from it: ``loss / accumulation_steps``, ``scaler.scale(loss)``,
    ``accelerator.backward(loss)``, ``loss + other_loss`` -- runs pass 2 with the incoming gradient,
    so every ``.grad`` receives exactly what ``(scale * full_batch_loss).backward()`` would put
    there, with the memory of one chunk. Takes :func:`gradcache_torch.cached_step`'s arguments,
    except ``scaler``: a ``GradScaler`` needs no argument here, ``scaler.scale(loss).backward()``
    scales every gradient through the incoming gradient. With ``keep_first_graph`` (the default)
    the first chunk's graph is kept from this call to the backward (one chunk's activations).

    Everything ``cached_step`` guarantees holds: the random state is replayed, the options are
    the same (``pad_trim``, ``sort_by_length``, ``check_finite`` -- raised here, at the call --
    ``check_determinism``, ``progress``, ``distributed=`` with DDP, FSDP2 or unwrapped modules),
    and a failure inside the backward leaves every ``.grad`` this loss would have written as it was
    -- in place: the same tensor objects with the same values (views of a flat buffer included),
    ``None`` where it was ``None``.

    - ``backward()`` runs pass 2 once. A second backward through the same loss (``retain_graph``)
      raises :class:`GradCacheError`; compute the loss again instead.
    - Without a backward nothing is written; what the loss holds for pass 2 (the representations'
      gradients, the random-state records) is freed with the tensor. In a distributed step every
      rank must call backward (the ranks meet after pass 2), as with DDP.
    - Updating a parameter in place between the call and the backward (``optimizer.step()``),
      or switching a module between ``train()`` and ``eval()``, raises :class:`GradCacheError`
      at the backward: pass 2 would re-encode another model than pass 1 did.
    - The autocast state of the call is restored for pass 2 (backward may run outside
      ``torch.autocast``), as ``torch.utils.checkpoint`` does.
    - Under ``torch.no_grad()`` or ``torch.inference_mode()`` only the loss is taken (an
      evaluation loop): a plain tensor, no gradient computed or written.
    - Pass 2 writes ``.grad`` as ``backward()`` does, so the loss is not a function of the
      parameters in torch's graph: ``torch.autograd.grad(loss, params)`` reports them unused,
      ``backward(inputs=params)`` leaves the cached loss's share out, and
      ``backward(create_graph=True)`` raises :class:`GradCacheError`.

    >>> import torch
    >>> from gradcache_torch import cached_loss
    >>> encoder = torch.nn.Linear(8, 4)
    >>> queries, passages = torch.randn(16, 8), torch.randn(16, 8)
    >>> def info_nce(q, p):
    ...     return torch.nn.functional.cross_entropy(q @ p.T, torch.arange(len(q)))
    >>> loss = cached_loss(encoder, (queries, passages), info_nce, chunk_size=4)
    >>> (loss / 2).backward()            # pass 2 runs here, scaled by 1/2
    >>> encoder.weight.grad.shape
    torch.Size([4, 8])
    """
    def refuse_early() -> None:
        check_keep_first_graph(keep_first_graph)
        if "scaler" in options:
            raise GradCacheError(
                "cached_loss takes no scaler: call scaler.scale(loss).backward() on the loss it "
                "returns, and the scale reaches every gradient through backward")

    differentiate = torch.is_grad_enabled()   # False under no_grad and inference_mode
    setup = _Setup(encoders, inputs, loss_fn, options, entry="cached_loss",
                   differentiate=differentiate, checks=refuse_early)
    try:
        input_leaves = [leaf for leaf in _tree.flatten(inputs, _is_tensor)[0]]
        if differentiate and any(leaf.requires_grad for leaf in input_leaves):
            # pass 2 pulls back into parameters only: an input's gradient would silently be missing
            raise GradCacheError(
                "an input tensor requires grad, but cached_loss differentiates the parameters "
                "only (its gradient would be missing); detach the inputs, or use cached_step")
        backend = TorchBackend(bypass_ddp=setup.bypass_ddp, defer_loss_grads=True,
                               protect=trained_parameters(encoders, loss_fn),
                               keep_first_graph=keep_first_graph)
        autocast = _autocast_state()
        forward = cached_forward(backend, encoders, inputs, loss_fn, chunk_size=chunk_size,
                                 collective=setup.collective, differentiate=differentiate,
                                 **setup.keywords)
    except BaseException as error:   # under DDP without distributed=: the others meet in backward
        setup.abort(error)
        raise
    if not differentiate:
        return forward.loss
    pending = _Pending(forward, setup, autocast, _watched(forward, loss_fn), input_leaves)
    anchor = torch.zeros((), device=forward.loss.device, requires_grad=True)
    return _CachedLoss.apply(anchor, pending)


class _Pending:
    """What the backward needs from the call: the forward, how to synchronise gradients, the
    autocast state, and the modules and parameters that must not change in between."""

    def __init__(self, forward: CachedForward, setup: _Setup, autocast: list,
                 watched: tuple[list, list], inputs: list):
        self.forward = forward
        self.setup = setup
        self.autocast = autocast
        self.parameters, self.modules = watched
        self.versions = [p._version for p in self.parameters]
        self.modes = [m.training for m in self.modules]
        # which tensor each module holds under each name: a parameter replaced by another object
        # (load_state_dict(assign=True), re-initialisation) leaves the old one's version as it was
        self.held = [_held(m) for m in self.modules]
        self.inputs = inputs
        self.input_versions = [leaf._version for leaf in inputs]

    def check_unchanged(self) -> None:
        for leaf, version in zip(self.inputs, self.input_versions):
            if leaf._version != version:
                raise GradCacheError(
                    f"an input tensor of shape {tuple(leaf.shape)} was modified in place between "
                    f"cached_loss and its backward; pass 2 would re-encode other inputs than "
                    f"pass 1: call backward first, or pass a copy")
        for module, held in zip(self.modules, self.held):
            if _held(module) != held:
                raise GradCacheError(
                    f"a parameter of {type(module).__name__} was replaced between "
                    f"cached_loss and its backward; pass 2 would re-encode another model than "
                    f"pass 1: call backward first")
        for parameter, version in zip(self.parameters, self.versions):
            if parameter._version != version:
                raise GradCacheError(
                    f"a parameter of shape {tuple(parameter.shape)} was modified in place between "
                    f"cached_loss and its backward (an optimizer.step()?); pass 2 would re-encode "
                    f"another model than pass 1: call backward before updating the parameters")
        for module, training in zip(self.modules, self.modes):
            if module.training != training:
                raise GradCacheError(
                    f"{type(module).__name__} was switched to {'train' if module.training else 'eval'}"
                    f"() between cached_loss and its backward; pass 2 must re-encode in the mode "
                    f"pass 1 ran in: call backward first")

    def refuse(self, error: BaseException) -> None:
        """A backward that cannot run: the other ranks stop instead of waiting, and what the
        forward holds is released."""
        self.forward.rendezvous.fail(error)
        self.setup.abort(error)
        self.forward.close()

    def backward(self, upstream: torch.Tensor) -> None:
        forward = self.forward
        try:
            self.check_unchanged()
        except GradCacheError as error:
            self.refuse(error)
            raise
        backend = forward.backend
        assert isinstance(backend, TorchBackend)
        sync = self.setup.gradient_sync()
        try:
            with backend.transaction():
                with _autocast(self.autocast):
                    grads = cached_backward(forward, upstream)
                    backend.add_deferred(grads)
                self.setup.commit(sync)   # the gradient average runs inside the rollback too
        except BaseException as error:
            self.setup.abort(error, sync)
            raise


class _CachedLoss(torch.autograd.Function):
    """The loss as an autograd node; its backward is pass 2. Its one input is a scalar anchor
    that requires grad (so that torch calls the backward); the parameters are not inputs, since
    pass 2 writes ``.grad`` itself, as DDP's and FSDP2's hooks expect."""

    @staticmethod
    def forward(ctx: Any, anchor: torch.Tensor, pending: _Pending) -> torch.Tensor:
        ctx.pending = pending
        return pending.forward.loss.clone()

    @staticmethod
    def backward(ctx: Any, upstream: torch.Tensor) -> tuple[None, None]:
        pending, ctx.pending = ctx.pending, None
        if pending is None:
            raise GradCacheError(
                "backward through a cached_loss ran a second time: pass 2 runs once per "
                "cached_loss call (its state is consumed, or a first backward failed); call "
                "cached_loss again for another backward")
        if torch.is_grad_enabled():
            error = GradCacheError(
                "backward(create_graph=True) through a cached_loss is not supported: pass 2 "
                "writes first-order gradients into .grad")
            pending.refuse(error)
            raise error
        pending.backward(upstream.detach())
        return None, None


def _held(module: torch.nn.Module) -> list[tuple[str, int]]:
    """``(name, id)`` of the module's own parameters (buffers may be reassigned by a forward)."""
    return [(name, id(tensor)) for name, tensor in module.named_parameters(recurse=False)]


def _is_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor)


def _watched(forward: CachedForward, loss_fn: Any) -> tuple[list, list]:
    """The parameters (and modules) pass 2 depends on: every trained encoder's, and the loss's."""
    parameters: dict[int, torch.Tensor] = {}
    modules: dict[int, torch.nn.Module] = {}
    for group in forward.groups:
        module = owning_module(group.encoder)
        if module is None or group.frozen:
            continue
        for sub in module.modules():
            modules.setdefault(id(sub), sub)
        for parameter in module.parameters():
            parameters.setdefault(id(parameter), parameter)
    backend = forward.backend
    assert isinstance(backend, TorchBackend)
    for tensor in backend.owned_parameters():
        parameters.setdefault(id(tensor), tensor)
    if isinstance(loss_fn, torch.nn.Module):
        for parameter in loss_fn.parameters():
            parameters.setdefault(id(parameter), parameter)
    return list(parameters.values()), list(modules.values())


_AUTOCAST_DEVICES = ("cpu", "cuda")


def _autocast_state() -> list[tuple[str, bool, torch.dtype, bool]]:
    """Autocast per device type at the call, to be restored for pass 2."""
    state = []
    for device in _AUTOCAST_DEVICES:
        if device == "cuda" and not torch.cuda.is_available():
            continue
        state.append((device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device),
                      torch.is_autocast_cache_enabled()))
    return state


class _autocast:  # noqa: N801 - a context manager used like a function
    """Re-enters the recorded autocast state (or leaves autocast, if the call ran outside it)."""

    def __init__(self, state: list):
        self.contexts = [torch.autocast(device, enabled=enabled, dtype=dtype, cache_enabled=cache)
                         for device, enabled, dtype, cache in state]

    def __enter__(self) -> None:
        for context in self.contexts:
            context.__enter__()

    def __exit__(self, *exc: Any) -> None:
        for context in reversed(self.contexts):
            context.__exit__(*exc)
