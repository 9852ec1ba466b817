"""Flax NNX random streams held inside ``params``: one key per chunk, and a stream that advances.

A Flax NNX module passed as ``params`` as it is (not split into parameters and the rest) carries
its ``nnx.Rngs`` streams as leaves: a key and a draw counter per stream. The backend rebuilds
``params`` from its leaves for every encoder call, so a module drawing from its own streams would
see the same counter in every chunk, in both passes and in every step -- one dropout mask for
all. This module finds those streams and gives every chunk its own: chunk ``i`` of group ``g``
sees each stream as ``nnx.reseed(module, tag=chunk_key(fold_in(key, count), g, i))`` leaves it, in
both passes -- exactly the documented split/merge route with ``rng=fold_in(key, count)``, the
key of the stream's next draw. After the step each stream's counter advances by one, in the caller's
module, so that the next step draws new masks -- as one call of the module itself would.

Nothing here imports Flax: without ``flax.nnx`` already imported there are no streams to find.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp

from gradcache import GradCacheError


@dataclasses.dataclass(frozen=True)
class Stream:
    """One NNX random stream in a flattened ``params``: where its key and counter leaves are."""

    key_at: int        # index of the stream's key among the leaves of params
    count_at: int      # index of its draw counter
    count: Any         # the counter's nnx.Variable (the caller's, to advance after the step)
    name: str          # its path in params, for error messages


def _nnx() -> Any:
    nnx = sys.modules.get("flax.nnx")
    if nnx is None or not all(hasattr(nnx, name) for name in ("Variable", "RngKey", "RngCount")):
        return None
    return nnx


def find(params: Any) -> list[Stream]:
    """The NNX random streams among the leaves of ``params`` (none without Flax NNX imported)."""
    nnx = _nnx()
    if nnx is None:
        return []
    items, _ = jax.tree_util.tree_flatten_with_path(
        params, is_leaf=lambda node: isinstance(node, nnx.Variable))
    keys: dict[tuple, int] = {}
    counts: dict[tuple, tuple[int, Any]] = {}
    position = 0
    for path, item in items:
        size = len(jax.tree_util.tree_leaves(item))
        if size == 1 and isinstance(item, nnx.RngKey):
            keys[tuple(path[:-1])] = position
        elif size == 1 and isinstance(item, nnx.RngCount):
            counts[tuple(path[:-1])] = (position, item)
        position += size
    return [Stream(keys[prefix], counts[prefix][0], counts[prefix][1],
                   jax.tree_util.keystr(prefix) or "params")
            for prefix in keys if prefix in counts]


def fold(key: Any, data: Any) -> Any:
    """``jax.random.fold_in(key, data)`` for every key of a key array (a stream split for
    ``nnx.vmap`` holds one key per slice), ``data`` broadcast to the keys' shape."""
    if key.ndim == 0:
        return jax.random.fold_in(key, data)
    flat = jnp.reshape(key, (-1,))
    data = jnp.reshape(jnp.broadcast_to(jnp.asarray(data, jnp.uint32), key.shape), (-1,))
    return jnp.reshape(jax.vmap(jax.random.fold_in)(flat, data), key.shape)


def chunk_keys(base: Any, group: int, chunk: Any) -> Any:
    """The key a stream is reseeded to for chunk ``chunk`` of group ``group``: what
    ``nnx.reseed(module, tag=chunk_key(base, group, chunk))`` stores (the first draw of a stream
    seeded with that key, ``fold_in(key, 0)``), so the masks are the split/merge route's."""
    return fold(fold(fold(base, group), chunk), 0)


def _get(variable: Any) -> Any:
    return variable.get_value() if hasattr(variable, "get_value") else variable.value


def check_can_advance(streams: list[Stream]) -> None:
    """Raises before the step when a stream's counter cannot be advanced where the step runs.

    That is a module closed over by a ``jax.jit`` function (its variables belong to the eager
    context, the step to the trace): Flax itself refuses to update it there.
    """
    for stream in streams:
        if not getattr(stream.count, "_can_update", True):
            raise GradCacheError(
                f"params holds the Flax NNX random stream {stream.name}, which this step must "
                f"advance, but the module belongs to another trace (a module closed over by a "
                f"jitted function?). Pass the module as an argument of the jitted function and "
                f"return it (or use nnx.jit), or split it -- graphdef, params, rest = "
                f"nnx.split(model, nnx.Param, ...) -- and give cached_step rng= (docs/jax.md, "
                f"Flax NNX)")


def advance(streams: list[Stream]) -> None:
    """Advances each stream's counter by one draw (after a step that succeeded)."""
    for stream in streams:
        value = _get(stream.count) + 1
        if hasattr(stream.count, "set_value"):
            stream.count.set_value(value)
        else:  # pragma: no cover - a Flax NNX before set_value
            stream.count.value = value


@contextlib.contextmanager
def advancing(params: Any) -> Iterator[None]:
    """Runs a step over ``params``, then advances its NNX streams by one draw -- only if the step
    returned (traced, it then runs as a whole or not at all). Refused up front where they could
    not be advanced (:func:`check_can_advance`)."""
    streams = find(params)
    check_can_advance(streams)
    yield
    advance(streams)
