"""The chunk loop of both passes: which chunks run in a backend's compiled loop, which one by one.

The schedule writes each pass as a body run once per chunk. A compiled backend (JAX's ``lax.scan``,
TensorFlow's ``tf.while_loop``) can run that body over many chunks of *equal* size in one loop, so
that its program does not grow with the number of chunks; everything else -- the shorter last
chunk, the last chunk when the backend needs ``final_use`` for it, the chunks of a ``split_fn`` or
of ``pad_trim``, a backend without a compiled loop -- runs one by one in Python, where the chunk
number is a plain int. This module makes that split once per group, in pass 1, and replays it in
pass 2 so that the per-chunk items pass 1 leaves (random-state records) line up, stacked by the
backend where they came out of its loop. It also owns what is the same for every backend: slicing
the rows, flattening the body's arguments and results to the tensor leaves a loop primitive
handles, checking that every chunk returns the same structure, concatenating row outputs, and the
chunk number an error names. Backends supply only :meth:`gradcache.Backend.loop_equal_chunks`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gradcache import _tree
from gradcache._backend import Backend, ChunkPlan
from gradcache._errors import GradCacheError, where


@dataclass(frozen=True)
class Chunk:
    """The chunk one call of a pass body runs.

    ``index`` is what computations use (the chunk's random key, the host-side checks): an int, or
    inside a compiled loop the loop's traced counter. ``label`` is what messages name: the index,
    or, for a loop body traced once for all its chunks, the first of them that had not run by
    itself -- the chunk on which a chunk-by-chunk loop would have raised what the trace raised.
    ``last`` is true only for the group's last chunk run by itself, which is what makes
    ``final_use`` a plain bool.
    """

    index: Any
    label: int
    last: bool = False


# body(carry, chunk, rows_of_the_chunk, item) -> (carry, (rows_out, item_out))
PassBody = Callable[[Any, Chunk, Any, Any], tuple[Any, tuple[Any, Any]]]


@dataclass
class ChunkItems:
    """The per-chunk items one run over a group returned, in the split the next run must repeat.

    Chunks ``0 .. looped - 1`` ran in the backend's compiled loop: their items are ``stacked``, the
    backend's tensor leaves with a leading chunk axis, each chunk's item having structure ``spec``.
    The other chunks ran one by one: ``single`` holds their items in order.
    """

    looped: int = 0
    stacked: list = field(default_factory=list)
    spec: _tree.TreeSpec | None = None
    single: list = field(default_factory=list)

    @classmethod
    def one_by_one(cls, items: Sequence) -> ChunkItems:
        """Items for chunks that all run one by one (a ``split_fn``'s chunks)."""
        return cls(single=list(items))

    def at(self, index: int) -> Any:
        """The item of chunk ``index``, which ran by itself."""
        return self.single[index - self.looped]


def loop_length(backend: Backend, plan: ChunkPlan, final_use_possible: bool) -> int:
    """How many leading chunks of ``plan`` may run in a compiled loop.

    The loop covers the chunks of ``plan.chunk_size`` rows; a shorter last chunk runs by itself.
    When the group's last chunk is a full one and the step's ``final_use`` may be true for it, it
    runs by itself too (for a backend that reads ``final_use``), so that the flag is a Python bool
    fixed when its body is called, never a comparison of the loop's traced counter.
    """
    if not plan.is_uniform:
        return 0
    count = plan.num_full
    if count and not plan.remainder and final_use_possible and backend.reads_final_use:
        count -= 1
    return count


def run_chunks(backend: Backend, body: PassBody, carry: Any, rows: Any, plan: ChunkPlan, *,
               group: int, loop: int = 0,
               items: ChunkItems | None = None) -> tuple[Any, Any, ChunkItems]:
    """Runs ``body`` over the chunks of ``plan`` in order; returns ``(carry, rows_out, items_out)``.

    ``rows`` is a nested structure whose tensor leaves have ``plan.batch_size`` rows; each call gets
    them sliced to its chunk. ``rows_out`` concatenates the calls' row outputs along rows. Without
    ``items`` (a first pass), the first ``loop`` chunks are offered to the backend's compiled loop;
    with ``items`` (what a previous run returned), the run repeats that run's split and hands each
    chunk its item.
    """
    looped = items.looped if items is not None else 0
    pieces: list[tuple[int, list, _tree.TreeSpec]] = []
    out_items = ChunkItems()
    if items is None and loop >= 1:
        ran = _compiled(backend, body, carry, rows, plan, loop, None, group)
        if ran is not None:
            looped = loop
            carry, piece, out_items = ran
            pieces.append(piece)
    elif looped:
        ran = _compiled(backend, body, carry, rows, plan, looped, items, group)
        if ran is None:
            raise GradCacheError(
                f"the {backend.name} backend ran pass 1's chunks of {where(group)} in its compiled "
                f"loop but declined to loop over them again")
        carry, piece, out_items = ran
        pieces.append(piece)
    out_items.looped = looped
    last = plan.num_chunks - 1
    for index in range(looped, plan.num_chunks):
        start, stop = plan.bounds[index]
        chunk_rows = _slice(backend, rows, start, stop)
        item = items.at(index) if items is not None else None
        carry, (rows_out, item_out) = body(carry, Chunk(index, index, index == last), chunk_rows, item)
        leaves, spec = _tree.flatten(rows_out, backend.is_leaf)
        pieces.append((index, leaves, spec))
        out_items.single.append(item_out)
    return carry, _concat(backend, pieces, group), out_items


def _slice(backend: Backend, rows: Any, start: int, stop: int) -> Any:
    return _tree.map_leaves(lambda leaf: backend.slice_rows(leaf, start, stop), rows, backend.is_leaf)


def _concat(backend: Backend, pieces: list[tuple[int, list, _tree.TreeSpec]], group: int) -> Any:
    """The row outputs of every piece, concatenated leaf by leaf (the pieces are in chunk order)."""
    if not pieces:
        return None
    first_label, _, spec = pieces[0]
    for label, _, other in pieces[1:]:
        if other != spec:
            raise GradCacheError(
                f"{where(group, label)} produced an output structured differently from chunk "
                f"{first_label}; an encoder must return the same structure for every chunk")
    if len(pieces) == 1:
        return _tree.unflatten(spec, pieces[0][1])
    columns = zip(*(leaves for _, leaves, _ in pieces))
    return _tree.unflatten(spec, [backend.concat_rows(list(column)) for column in columns])


def _is_int(index: Any) -> bool:
    return isinstance(index, (int, np.integer)) and not isinstance(index, bool)


def _compiled(backend: Backend, body: PassBody, carry: Any, rows: Any, plan: ChunkPlan, count: int,
              items: ChunkItems | None, group: int) -> tuple[Any, tuple, ChunkItems] | None:
    """Chunks ``0 .. count - 1`` through ``backend.loop_equal_chunks``; ``None`` if it declines.

    The primitive sees flat lists of tensor leaves only: the carry's, the rows' (whole: the rows
    after the loop's are the chunks run by themselves, and a backend that indexes chunk by chunk
    needs no cut) and the items' (stacked). The structures live here, as do the checks that every
    chunk the body runs returns the structure the first one did.
    """
    size = plan.chunk_size
    carry_leaves, carry_spec = _tree.flatten(carry, backend.is_leaf)
    row_leaves, row_spec = _tree.flatten(rows, backend.is_leaf)
    seen: dict[str, Any] = {"next": 0}
    stacked_spec = None   # the structure of each chunk's item, given items to repeat
    if items is not None:
        assert items.spec is not None, "looped items come from a compiled run, with their spec"
        stacked_spec = items.spec

    def flat_body(carry_leaves: list, index: Any, chunk_leaves: list,
                  item_leaves: list) -> tuple[list, list, list]:
        if _is_int(index):   # a chunk the primitive runs by itself (TF's first, for its shapes)
            label = int(index)
            seen["next"] = label + 1
        else:                # the loop body, traced once for the chunks not yet run
            label = seen["next"]
        item = None if stacked_spec is None else _tree.unflatten(stacked_spec, item_leaves)
        new_carry, (rows_out, item_out) = body(
            _tree.unflatten(carry_spec, carry_leaves), Chunk(index, label),
            _tree.unflatten(row_spec, chunk_leaves), item)
        out_leaves, out_spec = _tree.flatten(rows_out, backend.is_leaf)
        new_item_leaves, item_spec = _tree.flatten(item_out, backend.is_leaf)
        new_carry_leaves, new_carry_spec = _tree.flatten(new_carry, backend.is_leaf)
        if "out" not in seen:
            seen["out"], seen["item"] = out_spec, item_spec
        elif (out_spec, item_spec) != (seen["out"], seen["item"]):
            raise GradCacheError(
                f"{where(group, label)} produced an output structured differently from chunk 0; "
                f"an encoder must return the same structure for every chunk")
        if new_carry_spec != carry_spec:  # the schedule's own carry: a bug, not bad input
            raise GradCacheError(f"the carry of the loop over {where(group)} changed structure")
        return new_carry_leaves, out_leaves, new_item_leaves

    ran = backend.loop_equal_chunks(flat_body, carry_leaves, row_leaves, count, size,
                                    None if items is None else items.stacked)
    if ran is None:
        return None
    carry_leaves, out_leaves, stacked = ran
    piece = (0, list(out_leaves), seen["out"])
    return (_tree.unflatten(carry_spec, carry_leaves), piece,
            ChunkItems(stacked=list(stacked), spec=seen["item"]))
