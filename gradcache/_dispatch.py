"""One entry point for every framework: pick the adapter from the type of the inputs' tensors.

Like einops, the core never imports a framework to find out what a tensor is: it reads the module
name of the leaves' types, and imports the matching adapter (which imports its framework, already
loaded by the user since their tensors exist); where the tensors alone do not tell (numpy batches),
only frameworks already in ``sys.modules`` are candidates. It must never import a framework the
user has not.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

from gradcache import _tree
from gradcache._distribution import install_hint
from gradcache._errors import GradCacheError

# root module of a tensor type -> adapter package
_ADAPTERS = {
    "torch": ("gradcache_torch", "torch"),
    "jax": ("gradcache_jax", "jax"),
    "jaxlib": ("gradcache_jax", "jax"),
    "tensorflow": ("gradcache_tf", "tf"),
    "keras": ("gradcache_tf", "tf"),
    "mlx": ("gradcache_mlx", "mlx"),
}
#: every adapter's cached_step, for the message that names them
_ENTRIES = ", ".join(f"{package}.cached_step" for package in dict.fromkeys(
    package for package, _ in _ADAPTERS.values()))


def _looks_like_tensor(value: Any) -> bool:
    return hasattr(value, "shape") and hasattr(value, "dtype")


def detect_adapter(inputs: Any, options: dict) -> str:
    """Name of the adapter package for ``inputs`` (``"gradcache_torch"``, ...).

    Reads the module name of the leaves' types; a framework is a candidate only if it is already
    imported (``sys.modules``), so that dispatch never imports one the user has not. Numpy batches
    with ``params=`` are JAX's idiom (a data loader's arrays fed to a functional step) when JAX is
    imported; anything else ambiguous is an error naming the adapters to call.
    """
    leaves, _ = _tree.flatten(inputs, _looks_like_tensor)
    roots = {type(leaf).__module__.split(".")[0] for leaf in leaves}
    adapters = {_ADAPTERS[root][0] for root in roots if root in _ADAPTERS}
    if len(adapters) > 1:
        raise GradCacheError(f"inputs mix tensors of several frameworks ({sorted(roots)}); "
                             f"call one adapter's cached_step directly")
    if adapters:
        return adapters.pop()
    if roots == {"numpy"} and "params" in options:
        if "jax" in sys.modules:
            return "gradcache_jax"  # JAX steps often take numpy batches straight from a loader
        raise GradCacheError(
            "numpy inputs with params= look like a JAX step, but jax is not imported (gradcache "
            "never imports a framework for you): import jax, or call gradcache_jax.cached_step")
    raise GradCacheError(
        f"cannot tell which framework the inputs belong to (tensor types from {sorted(roots) or 'nothing'}); "
        f"call one of {_ENTRIES}")


def cached_step(encoders: Any, inputs: Sequence, loss_fn: Callable, *,
                chunk_size: int | Sequence[int], **options: Any) -> Any:
    """A gradient-cached step on whichever framework the inputs' tensors belong to.

    Forwards every argument to ``gradcache_torch.cached_step``, ``gradcache_jax.cached_step``,
    ``gradcache_tf.cached_step`` or ``gradcache_mlx.cached_step``; see those for the options and
    for where gradients go. The adapter is imported only when its framework's tensors are passed.

    >>> import gradcache
    >>> gradcache.cached_step(None, ([1.0],), None, chunk_size=1)
    Traceback (most recent call last):
    ...
    gradcache._errors.GradCacheError: cannot tell which framework the inputs belong to (tensor types from nothing); call one of gradcache_torch.cached_step, gradcache_jax.cached_step, gradcache_tf.cached_step, gradcache_mlx.cached_step
    """
    package = detect_adapter(inputs, options)
    try:
        adapter = importlib.import_module(package)
    except ImportError as error:
        extra = dict(_ADAPTERS.values())[package]
        raise ImportError(f"{package} could not be imported ({error}); "
                          f"{install_hint(extra)}") from None
    return adapter.cached_step(encoders, inputs, loss_fn, chunk_size=chunk_size, **options)
