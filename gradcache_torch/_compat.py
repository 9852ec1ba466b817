"""The API of the original GradCache package, so that its users change only the import.

``GradCache`` (class), ``cached`` and ``cat_input_tensor`` (functional decorators) behave like their
namesakes in the widely used ``grad_cache`` package, with its known defects fixed: the random state
replayed covers the CPU and every CUDA device in use (not only the inputs' devices),
``cat_input_tensor`` concatenates keyword arguments too, bf16 autocast is available, and a failing
step leaves ``.grad`` untouched. The class is a thin shell over :func:`gradcache_torch.cached_step`.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch

from gradcache import GradCacheError, flatten
from gradcache_torch._rng import RngState, replay
from gradcache_torch._step import cached_step


class GradCache:
    """Gradient cache over a list of models, as in the original package.

    Args:
        models: one model per input group (the same model may appear twice), or one model
            shared by every input group (as ``cached_step`` takes one encoder).
        chunk_sizes: one chunk size or one per model.
        loss_fn: ``loss_fn(*reps, **loss_kwargs)`` returning a scalar.
        split_input_fn: ``split_input_fn(model_input, chunk_size) -> list of chunks``.
        get_rep_fn: picks the representation from a model output.
        fp16: run the step under ``torch.autocast`` in float16 (use with ``scaler``).
        scaler: a ``torch.amp.GradScaler`` (required with ``fp16`` as in the original).
        bf16: run the step under ``torch.autocast`` in bfloat16 (no scaler needed).

    >>> import torch
    >>> from gradcache_torch import GradCache
    >>> model = torch.nn.Linear(8, 4)
    >>> loss_fn = lambda q, p: torch.nn.functional.cross_entropy(q @ p.T, torch.arange(len(q)))
    >>> gc = GradCache([model, model], chunk_sizes=2, loss_fn=loss_fn)
    >>> loss = gc(torch.randn(6, 8), torch.randn(6, 8))
    >>> model.weight.grad is not None
    True
    """

    def __init__(self, models: Sequence[Callable], chunk_sizes: int | Sequence[int],
                 loss_fn: Callable, split_input_fn: Callable | None = None,
                 get_rep_fn: Callable | None = None, fp16: bool = False, scaler: Any = None,
                 *, bf16: bool = False):
        if fp16 and bf16:
            raise GradCacheError("choose one of fp16 and bf16")
        if fp16 and scaler is None:
            raise GradCacheError("fp16=True needs a GradScaler (scaler=torch.amp.GradScaler())")
        self.shared = _is_one_model(models)
        if not self.shared and not isinstance(models, (list, tuple, torch.nn.ModuleList)):
            raise GradCacheError(
                f"models must be a list of models, one per input group ([model, model]), or one "
                f"model shared by every input group; got {type(models).__name__}")
        self.models = [models] if self.shared else list(models)
        self.chunk_sizes = chunk_sizes
        self.loss_fn = loss_fn
        self.split_input_fn = split_input_fn
        self.get_rep_fn = get_rep_fn
        self.fp16 = fp16
        self.bf16 = bf16
        self.scaler = scaler

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.cache_step(*args, **kwargs)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if not (self.fp16 or self.bf16):
            return contextlib.nullcontext()
        device = "cpu"
        for model in self.models:
            parameter = next(iter(getattr(model, "parameters", lambda: iter(()))()), None)
            if parameter is not None:
                device = parameter.device.type
                break
        return torch.autocast(device, dtype=torch.float16 if self.fp16 else torch.bfloat16)

    def cache_step(self, *model_inputs: Any, no_sync_except_last: bool = False,
                   **loss_kwargs: Any) -> torch.Tensor:
        """One cached step over ``model_inputs`` (one per model); returns the detached loss.

        ``no_sync_except_last`` is accepted for compatibility; DDP-wrapped models always
        synchronise once per step here, so it changes nothing.
        """
        del no_sync_except_last
        if not model_inputs:
            raise GradCacheError("GradCache was called with no model inputs: pass one per input "
                                 "group, gc(queries, passages)")
        if not self.shared and len(model_inputs) != len(self.models):
            raise GradCacheError(
                f"got {len(model_inputs)} model inputs for {len(self.models)} models: GradCache "
                f"takes one input per model in the order of its models (or build it with one "
                f"model to share it among any number of inputs)")
        models = self.models[0] if self.shared else self.models
        with self._autocast():
            return cached_step(models, model_inputs, self.loss_fn,
                               chunk_size=self.chunk_sizes, get_rep=self.get_rep_fn,
                               split_fn=self.split_input_fn, loss_kwargs=loss_kwargs,
                               scaler=self.scaler)


def _is_one_model(models: Any) -> bool:
    """Whether ``GradCache``'s ``models`` is one model rather than a list of them: a module (an
    ``nn.Sequential`` too, though it iterates over its layers) or any other callable, but not an
    ``nn.ModuleList`` (a list of models)."""
    if isinstance(models, torch.nn.ModuleList):
        return False
    return isinstance(models, torch.nn.Module) or (
        callable(models) and not isinstance(models, (list, tuple)))


def _tensor_leaves(value: Any) -> list[torch.Tensor]:
    leaves, _ = flatten(value, lambda v: isinstance(v, torch.Tensor))
    return leaves


def cached(func: Callable) -> Callable:
    """Decorator: run ``func`` without a graph now, and return a closure that replays it later.

    ``rep, closure = cached_func(*args)`` (or ``*reps, closure`` when ``func`` returns several
    tensors) gives detached leaf representations that require grad. After the loss's backward has
    filled their ``.grad``, ``closure(rep)`` re-runs ``func`` with a graph under the same random state
    (CPU and every CUDA device) and pulls ``rep.grad`` back into the parameters.
    """
    @functools.wraps(func)
    def cache_func(*args: Any, **kwargs: Any) -> tuple:
        state = RngState.capture()
        with torch.no_grad():
            outputs = func(*args, **kwargs)
        outputs = (outputs,) if isinstance(outputs, torch.Tensor) else tuple(outputs)
        if not all(isinstance(o, torch.Tensor) for o in outputs):
            raise GradCacheError("a @cached function must return a tensor or a tuple of tensors")
        leaves = tuple(o.detach().requires_grad_() for o in outputs)

        @functools.wraps(func)
        def forward_backward(cache_reps: Any) -> None:
            cache_leaves = _tensor_leaves(cache_reps)
            with replay(state), torch.enable_grad():
                reps = func(*args, **kwargs)
                reps = (reps,) if isinstance(reps, torch.Tensor) else tuple(reps)
                if len(reps) != len(cache_leaves):
                    raise GradCacheError(f"{len(cache_leaves)} cached representations for "
                                         f"{len(reps)} recomputed ones")
                pairs = [(r, c.grad) for r, c in zip(reps, cache_leaves) if c.grad is not None]
                if pairs:
                    torch.autograd.backward([r for r, _ in pairs], [g for _, g in pairs])

        return leaves + (forward_backward,)

    return cache_func


def cat_input_tensor(func: Callable) -> Callable:
    """Decorator: concatenate every list-of-tensors argument (positional *and* keyword) along dim 0."""
    def cat(value: Any) -> Any:
        if isinstance(value, list) and value and all(isinstance(v, torch.Tensor) for v in value):
            return torch.cat(value)
        return value

    @functools.wraps(func)
    def cat_func(*args: Any, **kwargs: Any) -> Any:
        return func(*(cat(a) for a in args), **{k: cat(v) for k, v in kwargs.items()})

    return cat_func
