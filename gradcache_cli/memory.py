"""Peak-memory measurement of one training step, in a fresh process, for any backend.

The one place where gradcache's tools read memory: the demo, ``gradcache bench`` and the scripts in
``benchmarks/`` all measure through this module (:func:`baseline` and :func:`peak_rss_bytes` for
a peak above a starting point, :func:`rss_growth` for a capped step, :func:`run_probe` for a fresh
process), and TensorFlow's reading (:mod:`gradcache_cli.tf_memory`) builds on it.

On a CPU there is no allocator statistic common to every framework, so the demo measures what the
operating system sees: a fresh Python process builds the model and one batch, notes its resident
memory, runs one step, and reports how far its peak resident memory (Linux ``VmHWM``, reset just
before the step) rose above that. One process per configuration, because a peak can only be read
once and allocators keep freed memory. The child's C allocator is told to return freed blocks at
once (glibc's ``MALLOC_MMAP_THRESHOLD_``), so that its resident memory follows the live buffers and
the figure repeats from run to run. The child also caps its address space, so that a full-batch
step too large for the machine fails inside the child ("did not fit") instead of pushing the
machine into swap. Standard library only; the child's work is the backend module's ``probe_main``.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import resource
import subprocess
import sys
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple


class StepMemory(NamedTuple):
    """Peak memory of one step; ``bytes`` is None when the step did not fit under ``limit``."""

    bytes: int | None
    limit: int | None = None
    note: str = ""


class Breakdown(NamedTuple):
    """Computed sizes of what one step holds, in bytes (see the backend's ``computed_breakdown``)."""

    encoder_cached: int   # the encoder graph of one chunk: what the cached step keeps at once
    encoder_full: int     # the encoder graph of the whole batch: what a full-batch step keeps
    loss: int             # representations, their gradients and the batch x batch loss: both steps
    gradients: int        # parameter gradients: both steps

    @property
    def cached_total(self) -> int:
        return self.encoder_cached + self.loss + self.gradients

    @property
    def full_total(self) -> int:
        return self.encoder_full + self.loss + self.gradients


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int:
    """Resident memory of this process now (Linux), else its peak so far."""
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """Peak resident memory of this process since start (or since :func:`reset_peak`)."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS counts bytes, Linux KiB


def reset_peak() -> bool:
    """Resets the peak to the current resident memory (Linux >= 4.0); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def baseline() -> int:
    """Readies a peak measurement and returns its starting point: resident memory now.

    Collects garbage, hands freed heap pages back (:func:`trim_heap`) and resets the peak mark
    (:func:`reset_peak`), so that ``peak_rss_bytes() - baseline()`` is the peak growth of whatever
    runs in between (Linux; elsewhere the peak cannot be reset and the figure is an upper bound).
    """
    trim_heap()
    reset_peak()
    return rss_bytes()


def fixed_mmap_env(threshold: int = 64 << 10) -> dict[str, str]:
    """Environment for a child process whose glibc serves blocks of ``threshold`` bytes or more by
    mmap and unmaps them when freed.

    By default glibc raises its mmap threshold after large frees, after which freed activations
    linger in a fragmented heap; with the threshold fixed, resident memory follows the live tensors
    and a peak is the step's, not the allocator's reuse luck. Other C libraries ignore it.
    """
    return {"MALLOC_MMAP_THRESHOLD_": str(threshold)}


def available_bytes() -> int | None:
    """Memory the machine can still give without swapping (Linux ``MemAvailable``), if known."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def cap_address_space(extra: int) -> bool:
    """Lets this process map at most ``extra`` more bytes than now; False where unsupported.

    Allocations past the cap fail with the framework's out-of-memory error, which the probe
    reports as "did not fit".
    """
    size_kib = _status_kib("VmSize")
    if size_kib is None or not hasattr(resource, "RLIMIT_AS"):
        return False
    limit = size_kib * 1024 + extra
    try:
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
        return True
    except (ValueError, OSError):
        return False


def default_budget() -> int:
    """How much a probe may allocate: half of the machine's available memory (8 GiB if unknown)."""
    available = available_bytes()
    return available // 2 if available else 8 << 30


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
    available = available_bytes()
    return min(guard, available) if available else guard


def rss_growth(step: Callable[[], Any], warm_up: Callable[[], Any], budget: int,
               is_out_of_memory: Callable[[BaseException], bool]) -> dict:
    """Peak resident-memory growth of ``step()`` over the resident memory just before it.

    ``warm_up()`` runs first, under the same cap: it pays the one-off costs (thread pools, kernel
    workspaces, a tf.function's trace) that are no part of what the batch costs. Returns
    ``{"bytes": n, "fits": n <= budget}``, or ``{"bytes": None, "fits": False, "note": ...}``
    when an allocation failed under the cap.
    """
    capped = cap_address_space(cap_guard(budget))
    try:
        warm_up()
        before = baseline()
        step()
        grown = max(peak_rss_bytes() - before, 0)
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


def run_probe(module: str, payload: Mapping[str, Any], *, timeout: float = 900) -> StepMemory:
    """Runs ``python -m module --probe JSON`` in a fresh process and returns what it measured.

    The child prints one JSON line: ``{"bytes": n}`` or ``{"bytes": null, "limit": n, "note": s}``.
    """
    command = [sys.executable, "-m", module, "--probe", json.dumps(dict(payload))]
    env = {**fixed_mmap_env(), **os.environ}  # a threshold the caller set wins
    env.setdefault("PYTHONHASHSEED", "0")
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return StepMemory(None, None, f"no result within {timeout:.0f} s")
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("{"):
            found = json.loads(line)
            return StepMemory(found.get("bytes"), found.get("limit"), found.get("note", ""))
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return StepMemory(None, None, f"probe failed (exit {done.returncode}): {tail}")


def report(result: Mapping[str, Any]) -> None:
    """Prints a probe's result as the one JSON line :func:`run_probe` reads (used in the child)."""
    print(json.dumps(dict(result)), flush=True)
