"""Padding trim and length sorting of text batches, written once for every backend.

Tokenised text comes padded to the longest sequence of the batch (Hugging Face style, an
``attention_mask`` of 0/1 beside the ``input_ids``), so a chunk of short rows still pays for the
longest row of the whole batch. ``pad_trim`` cuts every chunk to the last column any of its rows
attends to; ``sort_by_length`` forms the chunks from length-sorted rows so that the trim removes
most padding, and wraps the loss so that it still sees every group in the caller's order (autodiff
carries the gradient back through the permutation). Both read the masks' values on the host
(:meth:`Backend.to_host`), so they need concrete tensors: under a trace (``jax.jit``,
``tf.function``) shapes are static and these options raise. The core may use numpy; nothing here
imports a framework.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from gradcache import _tree
from gradcache._backend import Backend
from gradcache._errors import GradCacheError, where

MASK_KEY = "attention_mask"

#: Top-level keys of a tokenised batch whose second dimension is the sequence (Hugging Face names).
#: ``pad_trim`` cuts these; any other leaf whose second dimension has the sequence's length could be
#: a per-token tensor or a coincidence (a feature of that width, a pairwise ``(rows, L, L)``
#: tensor), so it is refused rather than guessed.
PER_TOKEN_KEYS = frozenset({MASK_KEY, "input_ids", "token_type_ids", "position_ids",
                            "special_tokens_mask", "inputs_embeds", "global_attention_mask"})


def attention_mask(backend: Backend, group: Any) -> Any | None:
    """The ``(rows, length)`` attention mask of a mapping group, or ``None`` if it has none."""
    if not isinstance(group, Mapping):
        return None
    mask = group.get(MASK_KEY)
    if mask is None or not backend.is_leaf(mask) or len(tuple(backend.shape(mask))) != 2:
        return None
    return mask


def host_mask(backend: Backend, mask: Any, group: int, option: str) -> np.ndarray:
    """The mask's values as a numpy array, or a clear error when they are not known yet."""
    values = backend.to_host(mask)
    if values is None:
        raise GradCacheError(
            f"{option} needs the values of the attention mask of {where(group)}, which are not "
            f"known while the step is traced (jax.jit, tf.function, or the shard_map a distributed "
            f"JAX step runs in): shapes are static there. Trim or sort the batch before the "
            f"compiled step, or run a one-device step eagerly")
    return np.asarray(values)


def used_columns(mask_rows: np.ndarray) -> int:
    """Columns up to and including the last one any row attends to (at least 1)."""
    used = np.flatnonzero(np.asarray(mask_rows).any(axis=0))
    return int(used[-1]) + 1 if used.size else 1


def trim_columns(backend: Backend, chunk: Any, length: int, keep: int,
                 keys: frozenset = PER_TOKEN_KEYS) -> Any:
    """``chunk`` with its per-token leaves (:data:`PER_TOKEN_KEYS`, at the top level) cut to
    ``keep`` columns; any other leaf with ``length`` columns is refused (it cannot be told apart
    from a per-token tensor, and guessing would change the results silently)."""
    if keep >= length:
        return chunk
    leaves, spec = _tree.flatten(chunk, backend.is_leaf)
    trimmed = []
    for path, leaf in zip(_tree.leaf_paths(spec), leaves):
        shape = tuple(backend.shape(leaf))
        if len(shape) < 2 or shape[1] != length:
            trimmed.append(leaf)
        elif path in keys:
            trimmed.append(backend.slice_columns(leaf, keep))
        else:
            raise GradCacheError(
                f"pad_trim cannot tell whether '{path}' (shape {shape}) holds one entry per token: "
                f"its second dimension is the sequence length {length}. It trims only "
                f"{', '.join(sorted(keys))}; drop pad_trim, or cut such inputs yourself "
                f"in a split_fn")
    return _tree.unflatten(spec, trimmed)


def trimmed_chunks(backend: Backend, group_inputs: Any, bounds: Sequence[tuple[int, int]],
                   group: int) -> list | None:
    """The group cut into chunks at ``bounds``, each trimmed to its used columns; ``None`` when
    the group has no attention mask (then there is nothing to trim)."""
    mask = attention_mask(backend, group_inputs)
    if mask is None:
        return None
    values = host_mask(backend, mask, group, "pad_trim")
    length = values.shape[1]
    chunks = []
    for start, stop in bounds:
        chunk = _tree.map_leaves(lambda leaf, a=start, b=stop: backend.slice_rows(leaf, a, b),
                                 group_inputs, backend.is_leaf)
        chunks.append(trim_columns(backend, chunk, length, used_columns(values[start:stop])))
    return chunks


def length_order(backend: Backend, group_inputs: Any, group: int) -> np.ndarray | None:
    """Rows of a group with an attention mask, longest first (stable), or ``None``."""
    mask = attention_mask(backend, group_inputs)
    if mask is None:
        return None
    lengths = host_mask(backend, mask, group, "sort_by_length").sum(axis=1)
    return np.argsort(-lengths, kind="stable")


def sort_groups(backend: Backend, inputs: Sequence, loss_fn: Callable) -> tuple[list, Callable]:
    """Every group with an attention mask in length order, and the loss wrapped to see the
    caller's order. Groups without a mask are left as they are."""
    orders = [length_order(backend, group_inputs, index) for index, group_inputs in enumerate(inputs)]
    if all(order is None for order in orders):
        return list(inputs), loss_fn
    sorted_inputs = [group_inputs if order is None else _tree.map_leaves(
        lambda leaf, o=order: backend.take_rows(leaf, o), group_inputs, backend.is_leaf)
        for group_inputs, order in zip(inputs, orders)]
    return sorted_inputs, InOriginalOrder(backend, loss_fn, orders)


class InOriginalOrder:
    """A loss that sees every group's representations in the caller's row order, while chunks are
    formed from length-sorted rows.

    Called, it un-permutes the representations (autodiff carries the gradient back through the
    permutation, so the representation gradients arrive in sorted order, as pass 2 needs). For a
    loss that supplies its own gradient, the gradient is permuted into sorted order by hand.
    Whatever else the loss declares (``gathers_itself``) passes through.
    """

    def __init__(self, backend: Backend, loss_fn: Any, orders: list[np.ndarray | None]):
        self.backend = backend
        self.loss_fn = loss_fn
        self.orders = orders
        self.inverses = [None if order is None else np.argsort(order) for order in orders]

    def _take(self, tree: Any, index: np.ndarray | None) -> Any:
        if index is None:
            return tree
        return _tree.map_leaves(lambda leaf: self.backend.take_rows(leaf, index), tree,
                                self.backend.is_leaf)

    def __call__(self, *reps: Any, **kwargs: Any) -> Any:
        return self.loss_fn(*[self._take(r, i) for r, i in zip(reps, self.inverses)], **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name == "value_and_grad" and callable(getattr(self.loss_fn, "value_and_grad", None)):
            def value_and_grad(*reps: Any, **kwargs: Any) -> Any:
                loss, grads = self.loss_fn.value_and_grad(
                    *[self._take(r, i) for r, i in zip(reps, self.inverses)], **kwargs)
                return loss, [self._take(g, o) for g, o in zip(grads, self.orders)]
            return value_and_grad
        if name in ("loss_fn", "backend", "orders", "inverses"):
            raise AttributeError(name)
        return getattr(self.loss_fn, name)
