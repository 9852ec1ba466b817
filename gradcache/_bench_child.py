"""The child process of ``gradcache bench``: one measurement job for one backend, answered in JSON.

``python -m gradcache._bench_child JSON`` imports ``gradcache._bench_<backend>`` (and with it the
framework), runs the job named in the payload (``memory``: one step's peak memory; ``sweep``: the
whole memory sweep, for JAX whose figures come from the compiler; ``time``: the step-time ratio)
and prints one JSON line, which :func:`gradcache._bench.run_child` reads. A fresh process per
measurement is the point: a peak can be read once, and allocators keep what a step freed.

It also holds what the torch and TensorFlow memory probes share: the measurement of one step's
peak resident-memory growth (:func:`rss_growth`), with the heap trimmed and the kernel's peak mark
reset just before the step, under an address-space cap that turns a step too large for the
machine into an allocation error instead of swapping. Standard library only at import time.
"""

from __future__ import annotations

import ctypes
import gc
import importlib
import json
import resource
import sys
from collections.abc import Callable
from typing import Any

from gradcache._demo import memory


def trim_heap() -> None:
    """Collects garbage and hands glibc's free heap pages back to the kernel (no-op elsewhere)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim, the figure is merely noisier
        pass


def cap_guard(budget: int) -> int:
    """The address-space headroom a probe gets: twice the budget plus 512 MiB, within what the
    machine has free.

    Address space is not resident memory (thread stacks, glibc arenas and library mappings reserve
    far more than they touch), so a cap at the budget itself would fail steps that fit; the cap
    only keeps a step far over the budget from swapping. Whether a step fits is decided by its
    measured peak against the budget.
    """
    guard = 2 * budget + (512 << 20)
    available = memory.available_bytes()
    return min(guard, available) if available else guard


def rss_growth(step: Callable[[], Any], warm_up: Callable[[], Any], budget: int,
               is_out_of_memory: Callable[[BaseException], bool]) -> dict:
    """Peak resident-memory growth of ``step()`` over the resident memory just before it.

    ``warm_up()`` runs first, under the same cap: it pays the one-off costs (thread pools, kernel
    workspaces, a tf.function's trace) that are no part of what the batch costs. Returns
    ``{"bytes": n, "fits": n <= budget}``, or ``{"bytes": None, "fits": False, "note": ...}``
    when an allocation failed under the cap.
    """
    capped = memory.cap_address_space(cap_guard(budget))
    try:
        warm_up()
        trim_heap()
        before = memory.rss_bytes()
        memory.reset_peak()
        step()
        grown = max(memory.peak_rss_bytes() - before, 0)
    except (MemoryError, Exception) as error:  # noqa: BLE001 - the framework's own OOM types vary
        if not (isinstance(error, MemoryError) or is_out_of_memory(error)):
            raise
        limit = resource.getrlimit(resource.RLIMIT_AS)[0] if capped else None
        return {"bytes": None, "fits": False,
                "note": "allocation failed" + (f" under a {limit >> 20} MiB address-space cap"
                                               if limit else "")}
    return {"bytes": grown, "fits": grown <= budget}


def mentions_memory(error: BaseException) -> bool:
    """Whether an error's message says that an allocation failed (torch, TF, XLA wording)."""
    text = str(error).lower()
    return any(word in text for word in ("alloc", "out of memory", "oom", "resource exhausted",
                                         "resourceexhausted", "bad_alloc", "cannot allocate"))


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m gradcache._bench_child JSON (used by gradcache bench)",
              file=sys.stderr)
        return 2
    payload = json.loads(argv[0])
    module = importlib.import_module(f"gradcache._bench_{payload['backend']}")
    result = getattr(module, payload["job"])(payload)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
