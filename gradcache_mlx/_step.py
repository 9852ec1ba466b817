"""The MLX backend and the public ``cached_step`` and ``cached_loss``: gradcache for Apple's MLX.

MLX differentiates functions of arrays; a model's parameters become such arrays through
``nn.value_and_grad(model, fn)``, which puts traced copies into the model (``model.update``) and
returns gradients shaped like ``model.trainable_parameters()``. This backend does the same for
each of the core's differentiated calls -- the loss on the representations, and each chunk's
pullback -- and puts the caller's arrays back afterwards, so that the model is exactly as it was
whatever happens. Randomness is MLX's global key (``mx.random.seed``, what ``nn.Dropout`` draws
from): a chunk's record is the key it starts from, replayed in pass 2 by reseeding. MLX evaluates
lazily, so every chunk is evaluated before the next one starts: otherwise the activations of
every chunk would be alive at once, which is what a gradient cache exists to avoid.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, cast

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_map_with_path

from gradcache import (
    Backend,
    GradCacheError,
    StepOptions,
    cached_backward,
    cached_forward,
    call_with_convention,
    flatten,
    run_cached_step,
    unflatten,
)


def _current_key() -> mx.array:
    return cast(Any, mx.random.state)[0]


def _set_key(key: mx.array) -> None:
    # mx.random.state cannot be assigned; a key is {seed >> 32, seed & 0xffffffff}, so seeding
    # with its two words makes it current again, exactly
    high, low = cast(list, key.tolist())
    mx.random.seed((high << 32) | low)


def _fresh(leaf: mx.array) -> mx.array:
    """An evaluated array's values in a new array with no graph behind it."""
    if leaf.dtype == mx.bfloat16:   # which the buffer protocol does not carry
        return _fresh(leaf.view(mx.uint16)).view(mx.bfloat16)
    return mx.array(cast(Any, memoryview(cast(Any, leaf))), dtype=leaf.dtype)


def _paths(tree: Any) -> list[tuple[str, Any]]:
    """``[("layers.0.weight", leaf), ...]``: MLX's dotted paths and the leaves of a tree."""
    return cast(list, tree_flatten(tree))


def _settle(values: list, inside_transform: bool) -> list:
    """Evaluates the arrays among ``values``, so that what computed them can be freed. Inside a
    transform (``nn.value_and_grad``) MLX keeps the graph of every evaluated array alive, and each
    chunk's activations with it: there the values are copied out of it."""
    try:
        mx.eval([value for value in values if isinstance(value, mx.array)])
    except ValueError as error:
        if "function transformations" not in str(error):
            raise
        raise GradCacheError(
            "gradcache_mlx evaluates every chunk as it goes (that is what bounds its memory), "
            "which mx.compile and mx.vmap forbid: compile the encoder instead, "
            "mx.compile(model, inputs=state, outputs=state) with state = [model.state, "
            "mx.random.state]") from error
    if not inside_transform:
        return values
    return [_fresh(value) if isinstance(value, mx.array) else value for value in values]


class MLXBackend(Backend):
    """:class:`gradcache.Backend` over MLX arrays; gradients go to ``model``'s trainable parameters.

    The accumulator is a flat dict ``{"layers.0.weight": gradient}`` (MLX's dotted paths);
    :meth:`gradients` shapes it like ``model.trainable_parameters()``.
    """

    name = "mlx"

    def __init__(self, model: nn.Module, *, inside_transform: bool = False):
        self.model = model
        self.params = model.trainable_parameters()
        self.inside_transform = inside_transform

    def _settle(self, leaves: list) -> list:
        return _settle(leaves, self.inside_transform)

    # -- tensors --------------------------------------------------------------------------------
    def is_leaf(self, value: Any) -> bool:
        return isinstance(value, mx.array)

    def concat_rows(self, leaves: Sequence[Any]) -> Any:
        return mx.concatenate(list(leaves), axis=0)

    def take_rows(self, leaf: Any, index: Any) -> Any:
        return leaf[mx.array(index)]

    def to_host(self, leaf: Any) -> Any:
        # numpy has no bfloat16: read it as float32
        return np.asarray(leaf.astype(mx.float32) if leaf.dtype == mx.bfloat16 else leaf)

    def zeros_like(self, leaf: Any) -> Any:
        return mx.zeros_like(leaf)

    def detach(self, leaf: Any) -> Any:
        return mx.stop_gradient(leaf)

    # -- randomness: the global key -------------------------------------------------------------
    def rng_capture(self, group: int, chunk: Any) -> Any:
        return _current_key()

    @contextlib.contextmanager
    def rng_replay(self, record: Any) -> Iterator[None]:
        current = _current_key()
        _set_key(record)
        try:
            yield
        finally:
            _set_key(current)

    # -- autodiff -------------------------------------------------------------------------------
    def trains(self, encoder: Any) -> bool:
        # a module with nothing trainable (a frozen tower) is encoded once, never pulled back
        if not _paths(self.params):
            return False
        return not isinstance(encoder, nn.Module) or bool(_paths(encoder.trainable_parameters()))

    def encode(self, encoder: Any, chunk: Any, record: Any, get_rep: Callable) -> Any:
        leaves, spec = flatten(get_rep(call_with_convention(encoder, chunk, self.is_leaf)),
                               self.is_leaf)
        # this chunk's activations are freed before the next chunk runs
        return unflatten(spec, self._settle([mx.stop_gradient(leaf) for leaf in leaves]))

    def _differentiate(self, fn: Callable, values: list) -> tuple[Any, tuple[Any, list]]:
        """``(fn(values), (gradients of the parameters, of values))`` with the model at traced
        parameters (``nn.value_and_grad``'s way), and the caller's put back afterwards."""
        def at(params: Any, values: list) -> Any:
            self.model.update(params)
            return fn(values)
        # a fresh tree: MLX puts its traced copies into the tree it is given, and leaves them
        # there if fn raises
        params = tree_map(lambda param: param, self.params)
        try:
            return mx.value_and_grad(at, argnums=(0, 1))(params, values)
        finally:
            self.model.update(self.params)

    def _add(self, grads: dict, param_grads: Any) -> dict:
        total = dict(grads)
        for path, grad in _paths(param_grads):
            if grad.dtype in (mx.float16, mx.bfloat16):   # late chunks not lost to rounding
                grad = grad.astype(mx.float32)
            total[path] = total[path] + grad if path in total else grad
        return dict(zip(total, self._settle(list(total.values()))))

    def value_and_grad(self, fn: Callable, values: list, grads: Any) -> tuple[Any, list, Any]:
        (_, value), (param_grads, value_grads) = self._differentiate(fn, values)
        value, *value_grads = self._settle([value, *value_grads])
        return value, value_grads, self._add(grads, param_grads)

    def vjp(self, encoder: Any, chunk: Any, record: Any, outputs: Callable, grads: Any, *,
            final_use: bool) -> tuple[list, Any]:
        found: list = []

        def inner_product(_: list) -> Any:
            # mx.vjp takes the cotangents with the function; these come from the output: the
            # gradient of <output, cotangent> at the parameters is the same product
            leaves, cotangents = outputs(call_with_convention(encoder, chunk, self.is_leaf))
            found[:] = leaves
            total = mx.array(0.0)
            for leaf, cotangent in zip(leaves, cotangents):
                if cotangent is not None:
                    weight = mx.stop_gradient(cotangent.astype(leaf.dtype))
                    total = total + mx.sum(leaf * weight).astype(mx.float32)
            return total

        _, (param_grads, _) = self._differentiate(inner_product, [])
        grads = self._add(grads, param_grads)   # this chunk's graph is released here
        return self._settle([mx.stop_gradient(leaf) for leaf in found]), grads

    def zero_grads(self) -> dict:
        return {}

    def gradients(self, grads: dict) -> Any:
        """The accumulator shaped like ``model.trainable_parameters()`` (zeros where nothing
        reached a parameter, as ``nn.value_and_grad`` gives)."""
        return tree_map_with_path(
            lambda path, param: grads[path].astype(param.dtype) if path in grads
            else mx.zeros_like(param), self.params)


def _model_of(encoders: Any, model: Any) -> nn.Module:
    """The module whose trainable parameters the step differentiates: ``model=``, or the one
    ``nn.Module`` that every group encodes with."""
    if model is not None:
        if not isinstance(model, nn.Module):
            raise GradCacheError(f"model= must be an mlx.nn.Module (its trainable_parameters() are "
                                 f"differentiated), got {type(model).__name__}")
        return model
    given = list(encoders) if isinstance(encoders, (list, tuple)) else [encoders]
    if given and isinstance(given[0], nn.Module) and all(e is given[0] for e in given):
        return given[0]
    raise GradCacheError(
        "gradcache_mlx differentiates one nn.Module's trainable parameters: with several encoders "
        "or with encoders that are not nn.Modules, pass model= (the module holding every encoder "
        "and any parameter of the loss); gradients come back shaped like "
        "model.trainable_parameters()")


def _options(options: dict, entry: str) -> dict:
    step = StepOptions.from_keywords(options, adapter="gradcache_mlx", own=("model",), entry=entry)
    if step.distributed is not False:
        raise GradCacheError(f"gradcache_mlx runs in one process: distributed= is not supported, "
                             f"got {step.distributed!r}")
    return step.step_keywords()


def cached_step(encoders: Any, inputs: Sequence, loss_fn: Callable, *,
                chunk_size: int | Sequence[int], model: nn.Module | None = None,
                **options: Any) -> tuple[mx.array, Any]:
    """``nn.value_and_grad(model, full_batch_loss)()``, computed chunk by chunk: ``(loss, grads)``.

    ``encoders`` is one ``nn.Module`` (or callable) shared by every input group, or one per group;
    ``inputs`` a list or tuple of groups, each an array or a nested dict/list/tuple of arrays
    batched along axis 0; ``loss_fn(*reps, **loss_kwargs)`` returns a scalar. ``grads`` is shaped
    like ``model.trainable_parameters()``, ready for ``optimizer.update(model, grads)``; ``model``
    defaults to the encoder when there is one ``nn.Module``. Parameters the loss reads through
    ``model`` (a learnable temperature) get their gradient too. Dropout draws from MLX's global
    key; each chunk's draws are replayed in pass 2. The other options are
    :class:`gradcache.StepOptions`' (``get_rep``, ``loss_kwargs``, ``check_finite``, ...).

    >>> import mlx.core as mx, mlx.nn as nn
    >>> from gradcache_mlx import cached_step
    >>> encoder = nn.Linear(8, 4)
    >>> def info_nce(q, d):
    ...     scores = q @ d.T
    ...     return mx.mean(mx.logsumexp(scores, axis=1) - mx.diagonal(scores))
    >>> q, d = mx.random.normal((10, 8)), mx.random.normal((10, 8))
    >>> loss, grads = cached_step(encoder, (q, d), info_nce, chunk_size=4)
    >>> grads["weight"].shape
    (4, 8)
    """
    keywords = _options(options, "cached_step")
    backend = MLXBackend(_model_of(encoders, model))
    loss, grads = run_cached_step(backend, encoders, inputs, loss_fn, chunk_size=chunk_size,
                                  **keywords)
    return loss, backend.gradients(grads)


def cached_loss(encoders: Any, inputs: Sequence, loss_fn: Callable, *,
                chunk_size: int | Sequence[int], model: nn.Module | None = None,
                **options: Any) -> mx.array:
    """The full-batch loss as an MLX array that ``nn.value_and_grad(model, fn)`` differentiates
    through the gradient cache: call it inside ``fn`` with the arguments of :func:`cached_step`.

    It is an ``mx.custom_function`` of ``model``'s trainable parameters: its forward is pass 1 and
    the loss, its VJP pass 2, scaled by the incoming cotangent, so ``fn`` may scale the loss and
    add other terms. Call it inside the function being differentiated, where ``model`` holds the
    parameters that are traced.

    >>> import mlx.core as mx, mlx.nn as nn
    >>> from gradcache_mlx import cached_loss
    >>> encoder = nn.Linear(8, 4)
    >>> def info_nce(q, d):
    ...     scores = q @ d.T
    ...     return mx.mean(mx.logsumexp(scores, axis=1) - mx.diagonal(scores))
    >>> q, d = mx.random.normal((10, 8)), mx.random.normal((10, 8))
    >>> def objective():
    ...     return 0.5 * cached_loss(encoder, (q, d), info_nce, chunk_size=4)
    >>> loss, grads = nn.value_and_grad(encoder, objective)()
    >>> grads["weight"].shape
    (4, 8)
    """
    keywords = _options(options, "cached_loss")
    backend = MLXBackend(_model_of(encoders, model), inside_transform=True)
    paths = [path for path, _ in _paths(backend.params)]
    forwards: list = []

    @mx.custom_function
    def full_batch_loss(params: list) -> mx.array:
        forward = cached_forward(backend, encoders, inputs, loss_fn, chunk_size=chunk_size,
                                 **keywords)
        forwards[:] = [forward]
        return forward.loss

    @full_batch_loss.vjp
    def pass_two(params: list, cotangent: mx.array, output: mx.array) -> tuple[list]:
        grads = cached_backward(forwards[0], upstream=cotangent)   # once: a second call raises
        return ([grads[path].astype(param.dtype) if path in grads else mx.zeros_like(param)
                 for path, param in zip(paths, params)],)

    return cast(mx.array, full_batch_loss([param for _, param in _paths(backend.params)]))
