"""The output of ``gradcache bench``: the machine's description, the markdown tables and the plots.

``write`` turns the measurements gathered by :mod:`gradcache_cli.bench.runner` into ``results.md``
(the machine, the settings, a memory table with one ``cached`` and one ``full`` row per backend --
and a ``cached_dense`` row where the dense-loss contrast was measured -- and a step-time table), ``results.json`` (everything, for scripts) and PNG plots: ``memory.png`` with one
log-log panel per backend, and ``memory-<backend>.png`` for each alone. Matplotlib is imported only
when plotting, with the Agg backend, so no display is needed.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
from pathlib import Path
from typing import Any

from gradcache._distribution import DISTRIBUTION
from gradcache_cli.bench.model import KINDS, describe

MIB = 1 << 20
NAMES = {"torch": "PyTorch", "jax": "JAX", "tf": "TensorFlow"}
METHODS = {
    "rss": "peak resident-memory growth during the step over the resident memory just before it "
           "(Linux VmHWM), a fresh process per figure",
    "allocator": "peak of TensorFlow's CPU allocator during the step above what it held before, "
                 "a fresh process per figure",
    "xla": "XLA's account of the compiled step (memory_analysis: temporaries + arguments + "
           "outputs), exact, nothing run",
}
DISTRIBUTIONS = ("torch", "jax", "jaxlib", "tensorflow", "tensorflow-cpu", "keras", "numpy",
                 "matplotlib", DISTRIBUTION)


def load_average() -> float | None:
    """The machine's one-minute load average (other processes share these cores)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / (1 << 20)
    except OSError:
        return None
    return None


def machine(load_before: float | None, load_after: float | None, *, seconds: float) -> dict:
    """Where and when the figures were measured: CPU, cores, memory, load, library versions."""
    versions = {}
    for name in DISTRIBUTIONS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    usable: int | None  # cpu_count() may not know
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    return {"cpu": _cpu_model(), "cores": os.cpu_count(), "usable_cores": usable,
            "memory_gib": _memory_gib(), "system": platform.platform(terse=True),
            "python": platform.python_version(), "versions": versions,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "load_before": load_before, "load_after": load_after, "seconds": round(seconds)}


def _cell(result: dict | None, budget: int) -> str:
    if result is None:
        return "–"
    if result.get("bytes") is None:
        return "did not fit" if not result.get("error") or result.get("note") else "error"
    figure = f"{result['bytes'] / MIB:.1f}"
    return figure if result["bytes"] <= budget else f"{figure} (over)"


def _largest_fitting(by_batch: dict[int, dict]) -> int | None:
    fitting = [batch for batch, found in by_batch.items() if found.get("fits")]
    return max(fitting) if fitting else None


def memory_table(plan: dict, found: dict[str, dict]) -> list[str]:
    """The memory table (MiB, one column per batch size) and a sentence per backend under it."""
    budget = plan["budget"]
    batches = sorted({batch for entry in found.values()
                      for by_batch in entry["memory"].get("results", {}).values()
                      for batch in by_batch})
    lines = ["| backend | step | " + " | ".join(str(b) for b in batches) + " |",
             "|---|---|" + "---:|" * len(batches)]
    notes = []
    for backend, entry in found.items():
        results = entry["memory"].get("results", {})
        if not results:
            notes.append(f"- {NAMES[backend]}: no result ({entry['memory'].get('error')})")
            continue
        for kind in [kind for kind in KINDS if kind in results]:
            by_batch = results.get(kind, {})
            lines.append(f"| {backend} | {kind} | " +
                         " | ".join(_cell(by_batch.get(b), budget) for b in batches) + " |")
        notes.append(f"- {NAMES[backend]}: {METHODS[entry['memory']['method']]}. "
                     + _summary(results, budget))
    if any("cached_dense" in entry["memory"].get("results", {}) for entry in found.values()):
        notes.append("- `cached` and `full` use the library's tiled InfoNCE "
                     "(`losses.info_nce`, no `B x B` score matrix held); `cached_dense` is the "
                     "same cached step with the dense loss, whose scores grow with the square of "
                     "the batch.")
    else:
        notes.append("- `cached` and `full` use the library's tiled InfoNCE "
                     "(`losses.info_nce`, no `B x B` score matrix held).")
    return lines + [""] + notes


def _summary(results: dict[str, dict[int, dict]], budget: int) -> str:
    full, cached = results.get("full", {}), results.get("cached", {})
    largest = _largest_fitting(full)
    top = _largest_fitting(cached)
    if largest is None or top is None:
        return "The full-batch step fits at no batch size measured."
    text = (f"The largest full-batch step within {budget // MIB} MiB is batch {largest} "
            f"({full[largest]['bytes'] / MIB:.0f} MiB; the cached step at that batch: "
            f"{cached[largest]['bytes'] / MIB:.0f} MiB)" if largest in cached else
            f"The largest full-batch step within {budget // MIB} MiB is batch {largest}")
    if top > largest:
        text += (f"; the cached step runs batch {top}, {top // largest}x larger, in "
                 f"{cached[top]['bytes'] / MIB:.0f} MiB")
    return text + "."


def time_table(found: dict[str, dict], repeats: int) -> list[str]:
    lines = ["| backend | batch | chunk | full step (ms) | cached step (ms) | cached / full |",
             "|---|---:|---:|---:|---:|---:|"]
    for backend, entry in found.items():
        answer = entry.get("time", {})
        if "rows" not in answer:
            lines.append(f"| {backend} | – | – | – | – | error: {answer.get('error', '?')} |")
            continue
        for row in answer["rows"]:
            lines.append(f"| {backend} | {row['batch']} | {row['chunk']} | "
                         f"{1e3 * row['full']:.0f} | {1e3 * row['cached']:.0f} | "
                         f"{row['cached'] / row['full']:.2f} |")
    return lines


def _machine_lines(machine: dict) -> list[str]:
    memory = f", {machine['memory_gib']:.1f} GiB memory" if machine["memory_gib"] else ""
    cores = (f"{machine['cores']} cores" if machine["usable_cores"] in (None, machine["cores"])
             else f"{machine['usable_cores']} of {machine['cores']} cores")
    load = ""
    if machine["load_before"] is not None:
        load = (f"; load average {machine['load_before']:.1f} at the start, "
                f"{machine['load_after']:.1f} at the end (other processes share the cores)")
    versions = ", ".join(f"{name} {version}" for name, version in machine["versions"].items())
    return [f"- Machine: {machine['cpu']}, {cores}{memory}; {machine['system']}, "
            f"Python {machine['python']}{load}.",
            f"- Libraries: {versions}.",
            f"- Measured {machine['date']}, in {machine['seconds']} s."]


def markdown(plan: dict, found: dict[str, dict], machine: dict, skipped: list[str]) -> str:
    lines = ["# gradcache bench", ""]
    lines += _machine_lines(machine)
    lines += [f"- Encoder: {describe(plan['model'])}.",
              f"- Cached step: chunk {plan['chunk']} rows; memory budget {plan['budget'] // MIB} "
              f"MiB{' (--quick)' if plan['quick'] else ''}; "
              + (f"{plan['threads']} CPU thread{'s' if plan['threads'] > 1 else ''} per process."
                 if plan["threads"] else "the frameworks' default CPU threads.")]
    if skipped:
        lines.append(f"- Skipped (not installed): {', '.join(skipped)}.")
    lines += ["", "## Peak memory of one training step (MiB) against the batch size", ""]
    lines += memory_table(plan, found)
    lines += ["", f"## Step time, cached / full-batch (median of {plan['repeats']}, the two steps "
                  "timed in turn in one process)", ""]
    lines += time_table(found, plan["repeats"])
    return "\n".join(lines) + "\n"


def plot(plan: dict, found: dict[str, dict], out: Path) -> list[Path]:
    """``memory.png`` (a panel per backend) and ``memory-<backend>.png``; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = {backend: entry["memory"]["results"] for backend, entry in found.items()
             if entry["memory"].get("results")}
    if not drawn:
        return []
    written = []
    figure, axes = plt.subplots(1, len(drawn), figsize=(5.2 * len(drawn), 4.2), squeeze=False)
    for axis, (backend, results) in zip(axes[0], drawn.items()):
        _panel(axis, backend, results, plan, found[backend]["memory"]["method"])
    figure.suptitle("Peak memory of one step: cached vs full batch (tiled InfoNCE)", fontsize=12)
    figure.tight_layout()
    written.append(out / "memory.png")
    figure.savefig(written[-1], dpi=110)
    plt.close(figure)
    for backend, results in drawn.items():
        figure, axis = plt.subplots(figsize=(5.6, 4.4))
        _panel(axis, backend, results, plan, found[backend]["memory"]["method"])
        figure.tight_layout()
        written.append(out / f"memory-{backend}.png")
        figure.savefig(written[-1], dpi=110)
        plt.close(figure)
    return written


def _panel(axis: Any, backend: str, results: dict, plan: dict, method: str) -> None:
    from matplotlib.ticker import FuncFormatter

    budget = plan["budget"] / MIB
    styles = {"cached": dict(color="tab:blue", marker="o", label=f"cached step, tiled loss (chunk "
                                                                f"{plan['chunk']})"),
              "cached_dense": dict(color="tab:grey", marker="^", linestyle=":",
                                   label="cached step, dense B x B loss"),
              "full": dict(color="tab:red", marker="s", label="full-batch step, tiled loss")}
    for kind in [kind for kind in ("full", "cached_dense", "cached") if kind in results]:
        measured = sorted((b, r["bytes"] / MIB, r["bytes"] <= plan["budget"])
                          for b, r in results.get(kind, {}).items() if r.get("bytes") is not None)
        if measured:
            batches, mib, _ = zip(*measured)
            axis.plot(batches, mib, **{"linestyle": "-", **styles[kind]})
            over = [(b, m) for b, m, fits in measured if not fits]
            if over:  # measured, but above the budget: a hollow marker
                axis.plot(*zip(*over), linestyle="none", marker=styles[kind]["marker"],
                          markersize=9, markerfacecolor="white", color=styles[kind]["color"],
                          label=f"{kind}: over the budget")
        failed = [b for b, r in results.get(kind, {}).items() if r.get("bytes") is None]
        if failed:  # an allocation failed under the cap: drawn on the budget line
            axis.plot(failed, [budget] * len(failed), linestyle="none", marker="x",
                      markersize=10, color=styles[kind]["color"], label=f"{kind}: did not fit")
    axis.axhline(budget, color="grey", linestyle="--", linewidth=1,
                 label=f"budget {plan['budget'] // MIB} MiB")
    axis.set_xscale("log", base=2)
    axis.set_yscale("log", base=2)
    # Plain numbers on both axes (64, 128, ... rows; MiB), not powers of two.
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    axis.xaxis.set_major_formatter(plain)
    axis.yaxis.set_major_formatter(plain)
    axis.set_xlabel("batch size (rows per group)")
    axis.set_ylabel("peak step memory (MiB)")
    how = {"rss": "peak RSS growth", "allocator": "allocator peak", "xla": "XLA memory_analysis"}
    axis.set_title(f"{NAMES[backend]} ({how[method]})", fontsize=10)
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=8, loc="upper left")


def write(plan: dict, found: dict[str, dict], machine: dict, *, skipped: list[str]) -> str:
    """Writes results.md, results.json and the plots to ``plan["out"]``; returns the markdown."""
    out = plan["out"]
    text = markdown(plan, found, machine, skipped)
    plots = plot(plan, found, out)
    if plots:
        text += "\n" + " ".join(f"![{path.stem}]({path.name})" for path in plots[:1]) + "\n"
    (out / "results.md").write_text(text, encoding="utf-8")
    settings = {key: (str(value) if isinstance(value, Path) else value)
                for key, value in plan.items()}
    (out / "results.json").write_text(json.dumps(
        {"settings": settings, "machine": machine, "skipped": skipped,
         "backends": {backend: {"memory": {**entry["memory"], "results": {
             kind: {str(b): r for b, r in by_batch.items()}
             for kind, by_batch in entry["memory"].get("results", {}).items()}},
             "time": entry.get("time")} for backend, entry in found.items()}},
        indent=1), encoding="utf-8")
    return text
