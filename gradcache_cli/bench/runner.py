"""``gradcache bench`` (``make bench``): memory and speed of the cached step against the full-batch step.

For each installed backend (torch, JAX, TensorFlow) it measures the peak memory of one training
step over doubling batch sizes, for ``cached_step`` and for the plain full-batch step it replaces,
until the full-batch step no longer fits the memory budget (``--budget-mib``), and the cached one a
few batch sizes further; then the step-time ratio cached / full-batch, the two steps timed in turn
in one process. It writes PNG plots, ``results.md`` and ``results.json`` to ``--out`` and prints the
tables.

This module plans and reports; it imports no framework. Every measurement runs in a child process
(:mod:`gradcache_cli.bench.child`): torch and TensorFlow one fresh process per step measured, JAX
one process that asks the compiler (its figures need no run). Argument errors are one line and
exit status 2 (:class:`gradcache_cli.demo.options.UsageError`, printed by
:mod:`gradcache_cli._main`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from gradcache._distribution import install_hint
from gradcache_cli.bench.model import DEFAULT, QUICK, sweep
from gradcache_cli.demo.options import UsageError, non_negative_int, positive_int
from gradcache_cli.memory import mentions_memory

# backend -> (framework module, adapter module, the name people know it by)
BACKENDS = {"torch": ("torch", "gradcache_torch", "PyTorch"),
            "jax": ("jax", "gradcache_jax", "JAX"),
            "tf": ("tensorflow", "gradcache_tf", "TensorFlow")}

# Defaults, full run and --quick. The full run's budget stops every backend's full-batch step at
# batch 512 or 1024 of the default model, so that the whole run takes about five minutes on two
# cores; the cached step goes two doublings further. "contrast": the cached step with the dense
# loss beside the tiled one (memory only); --quick leaves it out, to stay a smoke run of seconds.
SETTINGS: dict[str, dict[str, Any]] = {
    "full": {"model": DEFAULT, "chunk": 64, "budget_mib": 384, "max_batch": 1 << 16,
             "extra_doublings": 2, "time_chunks": (8,), "repeats": 5,
             "contrast": ["cached_dense"]},
    "quick": {"model": QUICK, "chunk": 16, "budget_mib": 64, "max_batch": 64,
              "extra_doublings": 1, "time_chunks": (4,), "repeats": 3, "contrast": []},
}
MIB = 1 << 20


def _backend_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected a comma-separated list such as torch,jax")
    unknown = [name for name in names if name not in BACKENDS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown backend {unknown[0]!r} (choose from {', '.join(BACKENDS)})")
    return list(dict.fromkeys(names))  # in the order given, once each


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the bench's options to ``parser`` (the ``bench`` subcommand's parser)."""
    parser.description = (
        "Measures, for each installed backend, the peak memory of one training step against the "
        "batch size -- cached step and full-batch step, until the full-batch step no longer fits "
        "the budget -- and the step time cached / full-batch; writes PNG plots and results.md.")
    parser.add_argument("--out", default="bench-out",
                        help="folder for the plots, results.md and results.json (default: bench-out)")
    parser.add_argument("--backends", type=_backend_list, default=list(BACKENDS),
                        help="comma-separated, from torch,jax,tf (default: all; one that is not "
                             "installed is skipped)")
    parser.add_argument("--budget-mib", type=positive_int, default=None,
                        help="memory a step may use; the full-batch sweep stops at the first batch "
                             f"over it (default: {SETTINGS['full']['budget_mib']}; "
                             f"--quick: {SETTINGS['quick']['budget_mib']})")
    parser.add_argument("--max-batch", type=positive_int, default=None,
                        help="largest batch to measure (default: as far as the budget allows; "
                             f"--quick: {SETTINGS['quick']['max_batch']})")
    parser.add_argument("--chunk-size", type=positive_int, default=None,
                        help="rows per chunk of the cached step; the sweep starts at this batch "
                             f"(default: {SETTINGS['full']['chunk']}; "
                             f"--quick: {SETTINGS['quick']['chunk']})")
    parser.add_argument("--repeats", type=positive_int, default=None,
                        help="timed steps of each kind (median; default: "
                             f"{SETTINGS['full']['repeats']}; --quick: "
                             f"{SETTINGS['quick']['repeats']})")
    parser.add_argument("--threads", type=non_negative_int, default=1,
                        help="CPU threads per framework process; 0: the framework's default, all "
                             "cores (default: 1, repeatable on a shared machine)")
    parser.add_argument("--quick", action="store_true",
                        help="a tiny model and a few small batches: a smoke run of seconds")


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """The run's settings from the arguments, checked (a bad combination raises UsageError)."""
    base = dict(SETTINGS["quick" if args.quick else "full"])
    chunk = args.chunk_size or base["chunk"]
    max_batch = args.max_batch or base["max_batch"]
    if max_batch < chunk:
        raise UsageError(f"--max-batch ({max_batch}) must be at least --chunk-size ({chunk}), "
                         "where the sweep starts")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out: {out} exists and is not a folder")
    time_batches = sorted({min(chunk * n, max_batch) for n in base["time_chunks"]})
    return {**base, "chunk": chunk, "max_batch": max_batch, "out": out,
            "budget": (args.budget_mib or base["budget_mib"]) * MIB,
            "repeats": args.repeats or base["repeats"], "time_batches": time_batches,
            "quick": bool(args.quick), "threads": args.threads}


def installed(backend: str) -> str | None:
    """None when ``backend`` can run here, else why not (one phrase)."""
    framework, adapter, _ = BACKENDS[backend]
    for module in (framework, adapter):
        try:
            if importlib.util.find_spec(module) is None:
                return f"{module} is not installed"
        except (ImportError, ValueError):
            return f"{module} is not installed"
    return None


def child_env(threads: int) -> dict[str, str]:
    """The environment of every child process (``threads`` > 0: that many CPU threads)."""
    env = dict(os.environ)
    if threads:
        # OpenMP (torch), MKL and OpenBLAS read these at start-up; the frameworks are also told
        # in the child. One thread by default: where other processes share the cores, OpenMP's
        # spin-waiting threads make a step of many small operations (the cached step's chunks)
        # many times slower, and the figures would measure the neighbours.
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[name] = str(threads)
        if threads == 1:  # XLA's CPU backend: no multi-threaded Eigen kernels
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
                                ).strip()
    env.setdefault("PYTHONHASHSEED", "0")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # glibc: serve every block of 128 KiB or more by mmap and unmap it when freed. Otherwise glibc
    # raises its threshold after large frees and freed activations stay in a fragmented heap, and
    # resident memory would show the allocator's history instead of what the step holds.
    env["MALLOC_MMAP_THRESHOLD_"] = str(128 << 10)
    return env


def json_answer(command: list[str], *, env: dict[str, str], timeout: float) -> dict:
    """Runs ``command`` (a child that prints its answer as its last JSON line) and returns that
    answer; ``{"error": why, "returncode": n}`` if it prints none or runs past ``timeout``."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"no result within {timeout:.0f} s", "returncode": None}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1][:200]
    return {"error": f"exit {done.returncode}: {tail}", "returncode": done.returncode}


def run_child(payload: dict, *, timeout: float) -> dict:
    """Runs one job in a fresh ``python -m gradcache_cli.bench.child`` and returns its JSON answer.

    A child that dies answers ``{"error": why}``; one whose death looks like a failed allocation
    (an abort from ``std::bad_alloc``, the kernel's OOM killer) also says ``"fits": False``.
    """
    command = [sys.executable, "-m", "gradcache_cli.bench.child", json.dumps(payload)]
    answer = json_answer(command, env=child_env(payload.get("threads", 0)), timeout=timeout)
    if "error" not in answer:
        return answer
    code = answer.pop("returncode")
    out_of_memory = code in (-9, 137) or (code is not None
                                           and mentions_memory(RuntimeError(answer["error"])))
    return {"bytes": None, "fits": False, **answer,
            **({"note": "allocation failed"} if out_of_memory else {})}


def _say(text: str) -> None:
    print(text, flush=True)


def _progress(backend: str):
    def show(kind: str, batch: int, result: dict) -> None:
        if result.get("bytes") is not None:
            figure = f"{result['bytes'] / MIB:8.1f} MiB" + ("" if result["fits"] else
                                                            "  (over the budget)")
        else:
            figure = f"  {result.get('note') or result.get('error') or 'no result'}"
        _say(f"  {backend:<5} {kind:<12} batch {batch:>6}: {figure}")
    return show


def measure_memory(backend: str, plan: dict) -> dict:
    """The memory sweep of one backend: ``{"results": {kind: {batch: result}}, ...}``."""
    common = {"backend": backend, "model": plan["model"], "chunk": plan["chunk"],
              "budget": plan["budget"], "threads": plan["threads"]}
    show = _progress(backend)
    if backend == "jax":
        answer = run_child({**common, "job": "sweep", "max_batch": plan["max_batch"],
                            "extra_doublings": plan["extra_doublings"],
                            "contrast": plan["contrast"]}, timeout=1200)
        if "results" not in answer:
            return {"error": answer.get("error", "no result"), "results": {}}
        results = {kind: {int(batch): found for batch, found in by_batch.items()}
                   for kind, by_batch in answer["results"].items()}
        for kind in ("full", "cached", *plan["contrast"]):
            for batch, found in sorted(results.get(kind, {}).items()):
                show(kind, batch, found)
        return {"results": results, "method": "xla", "version": answer.get("version")}

    def measure(kind: str, batch: int) -> dict:
        return run_child({**common, "job": "memory", "kind": kind, "batch": batch}, timeout=900)

    results = sweep(measure, chunk=plan["chunk"], max_batch=plan["max_batch"],
                    extra_doublings=plan["extra_doublings"], progress=show,
                    contrast=plan["contrast"])
    methods = {found.get("method", "rss") for by_batch in results.values()
               for found in by_batch.values() if found.get("bytes") is not None}
    return {"results": results, "method": methods.pop() if len(methods) == 1 else "rss"}


def measure_time(backend: str, plan: dict) -> dict:
    """Median step times of both steps at the timing batches, from one child process."""
    answer = run_child({"backend": backend, "job": "time", "model": plan["model"],
                        "chunk": plan["chunk"], "batches": plan["time_batches"],
                        "repeats": plan["repeats"], "threads": plan["threads"]}, timeout=1800)
    for row in answer.get("rows", []):
        _say(f"  {backend:<5} time   batch {row['batch']:>6}: full {1e3 * row['full']:.0f} ms, "
             f"cached {1e3 * row['cached']:.0f} ms, cached / full {row['cached'] / row['full']:.2f}")
    if "rows" not in answer:
        _say(f"  {backend:<5} time: {answer.get('error', 'no result')}")
    return answer


def run(args: argparse.Namespace) -> int:
    """Runs the bench; returns the exit status (0; 2 when no requested backend is installed)."""
    plan = settings(args)
    # The plots come last, after minutes of measurements: a missing matplotlib is said first.
    if importlib.util.find_spec("matplotlib") is None:
        raise UsageError(f"the bench draws its plots with matplotlib, which is not installed: "
                         f"{install_hint('bench')}")
    available = []
    for backend in args.backends:
        why = installed(backend)
        if why:
            _say(f"skipping {backend}: {why}")
        else:
            available.append(backend)
    if not available:
        raise UsageError("none of the requested backends is installed (" +
                         ", ".join(args.backends) + ")")
    try:
        plan["out"].mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"--out: cannot create {plan['out']}: {error.strerror}") from None

    from gradcache_cli.bench import report
    from gradcache_cli.bench.model import describe

    started, load_before = time.perf_counter(), report.load_average()
    _say(f"gradcache bench: {describe(plan['model'])}; chunk {plan['chunk']}, budget "
         f"{plan['budget'] // MIB} MiB")
    _say("peak memory of one step (each torch/TF figure from a fresh process, JAX from the "
         "compiler):")
    found: dict[str, dict] = {}
    for backend in available:
        found[backend] = {"memory": measure_memory(backend, plan)}
    _say(f"step time, median of {plan['repeats']}, the two steps in turn:")
    for backend in available:
        found[backend]["time"] = measure_time(backend, plan)
    machine = report.machine(load_before, report.load_average(),
                             seconds=time.perf_counter() - started)
    table = report.write(plan, found, machine, skipped=[b for b in args.backends
                                                         if b not in available])
    _say("")
    _say(table)
    _say(f"wrote {plan['out'] / 'results.md'} and the plots in {plan['out']}/ "
         f"({time.perf_counter() - started:.0f} s)")
    return 0
