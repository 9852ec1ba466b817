"""TensorFlow's memory on the CPU, measured one way for the demo and the bench, on every CPU.

TensorFlow keeps statistics (``tf.config.experimental.get_memory_info``) only for its pooling (BFC)
CPU allocator, which it uses where oneDNN is on: its default on x86 CPUs with AVX-512. There
resident memory cannot see a step (the pool keeps the pages it once held), so the allocator's own
figures are the measure. Elsewhere -- CPUs without AVX-512, ARM, ``TF_ENABLE_ONEDNN_OPTS=0`` -- the
allocator is a plain one that returns what it frees, ``get_memory_info`` raises ``ValueError``,
and resident memory (with the C heap trimmed) follows the live tensors instead. Every TensorFlow
measurement of the demo and the bench goes through this module, so that both cases are handled in
one place; it imports TensorFlow and is imported only by the demo's and the bench's TF code.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import tensorflow as tf

from gradcache_cli import memory

DEVICE = "CPU:0"
T = TypeVar("T")


def allocator_stats_available() -> bool:
    """Whether TensorFlow's CPU allocator keeps statistics in this process (pooling allocator)."""
    try:
        tf.config.experimental.get_memory_info(DEVICE)
    except ValueError:  # "Allocator stats not available for device 'CPU:0'": a plain allocator
        return False
    return True


def method() -> str:
    """``"allocator"`` where the allocator's statistics are read, else ``"rss"`` (resident memory)."""
    return "allocator" if allocator_stats_available() else "rss"


def _allocator(field: str) -> int:
    return int(tf.config.experimental.get_memory_info(DEVICE)[field])


def held_bytes(work: Callable[[], T]) -> tuple[T, int]:
    """Runs ``work()``; returns its result and the bytes that grew while it ran and are still held.

    That is the memory ``work``'s result keeps alive (a ``GradientTape`` and what it saved for
    backward, say): the allocator's ``current`` bytes after against before, or, with a plain
    allocator, resident memory after against before with the C heap trimmed both times (so that
    freed temporaries are not counted). The statistics leave out blocks under about 256 KiB and
    resident memory moves by pages, so measure work large enough for that not to matter.
    """
    if allocator_stats_available():
        before = _allocator("current")
        result = work()
        return result, max(_allocator("current") - before, 0)
    memory.trim_heap()
    before = memory.rss_bytes()
    result = work()
    memory.trim_heap()
    return result, max(memory.rss_bytes() - before, 0)


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is TensorFlow's (or the C allocator's) way of saying an allocation failed."""
    return isinstance(error, tf.errors.ResourceExhaustedError) or memory.mentions_memory(error)


def step_peak(step: Callable[[], Any], warm_up: Callable[[], Any], budget: int) -> dict:
    """Peak memory growth of ``step()`` over what was held just before it, under an address-space cap.

    ``warm_up()`` runs first (the ``tf.function`` trace, thread pools). Returns
    :func:`gradcache_cli.memory.rss_growth`'s dictionary (``bytes``, ``fits``, or a ``note`` when
    an allocation failed under the cap) with ``method``: ``"allocator"`` when the figure is the
    allocator's peak in use during the step above what it held before (then ``rss_bytes`` is the
    resident growth, for reference), ``"rss"`` when it is peak resident-memory growth.
    """
    if not allocator_stats_available():
        return {**memory.rss_growth(step, warm_up, budget, is_out_of_memory), "method": "rss"}
    found: dict[str, int] = {}

    def measured() -> None:
        before = _allocator("current")
        tf.config.experimental.reset_memory_stats(DEVICE)
        step()
        found["bytes"] = max(_allocator("peak") - before, 0)

    # rss_growth still runs the step: its cap and its handling of allocation failures apply
    result = memory.rss_growth(measured, warm_up, budget, is_out_of_memory)
    if result["bytes"] is not None:
        result = {"bytes": found["bytes"], "fits": found["bytes"] <= budget,
                  "rss_bytes": result["bytes"]}
    return {**result, "method": "allocator"}
