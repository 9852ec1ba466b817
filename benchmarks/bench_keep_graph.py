"""What keeping the first chunk's graph from pass 1 saves in a torch ``cached_step``, and costs.

Gradient caching encodes every chunk twice: without a graph in pass 1, with one in pass 2. The
first chunk pass 2 pulls back is pass 2's first, so ``gradcache_torch`` encodes it in pass 1 *with*
its graph and pulls back through that instead of re-encoding it (issue 14): one forward of a chunk
saved per step, for the price of that chunk's activations held through pass 1 and the loss. This
script measures both against the same step with the graph not kept (``keep_first_graph=False``,
as when a process group is initialised), at 2, 4 and 8 chunks per group:

* time: the two steps interleaved in one child process with one CPU thread, CPU time and wall
  time, medians (these machines are noisy; the ratio is what to read);
* memory: a fresh child process per configuration, the peak resident-memory growth of one step
  over the memory just before it (after a warm-up step), freed memory returned to the OS at once.

The encoder, data and loss are ``gradcache bench``'s (:mod:`gradcache_cli.bench`; the loss is the
tiled InfoNCE). Asserts nothing.

    python benchmarks/bench_keep_graph.py                   # batch 512 x 2 groups, 2/4/8 chunks
    python benchmarks/bench_keep_graph.py --quick           # tiny model, one repetition (the test)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gradcache_cli import memory  # noqa: E402
from gradcache_cli.bench.model import DEFAULT, QUICK, time_clocks, token_batch  # noqa: E402
from gradcache_cli.bench.runner import child_env, json_answer  # noqa: E402

MODES = ("keep", "reencode")


def _step(model: dict, rows: int, chunk: int) -> dict:
    """``{"keep": step, "reencode": step}``: one cached step each, the second with the graph
    of the first chunk not kept."""
    import torch

    from gradcache_cli.bench import torch_bench
    from gradcache_torch import cached_step

    torch.set_num_threads(1)
    encoder = torch_bench.Encoder(model)
    q, p = (torch.from_numpy(ids) for ids in token_batch(model, rows))

    def step(keep: bool) -> None:
        encoder.zero_grad(set_to_none=True)
        cached_step(encoder, (q, p), torch_bench.info_nce_tiled, chunk_size=chunk,
                    keep_first_graph=keep)
    return {"keep": lambda: step(True), "reencode": lambda: step(False)}


def child(mode: str, model: dict, rows: int, chunks: list[int], repeats: int) -> dict:
    """``mode="time"``: ``{chunk: {step: {"wall": s, "cpu": s}}}``; ``mode="keep"`` or
    ``"reencode"``: that step's peak memory growth at ``chunks[0]``, in bytes."""
    if mode == "time":
        return {str(chunk): time_clocks(_step(model, rows, chunk), repeats) for chunk in chunks}
    step = _step(model, rows, chunks[0])[mode]
    grown = memory.rss_growth(step, step, memory.default_budget(), memory.mentions_memory)
    return {"bytes": grown["bytes"]}


def run_child(mode: str, model: dict, rows: int, chunks: list[int], repeats: int) -> dict:
    payload = json.dumps({"mode": mode, "model": model, "rows": rows, "chunks": chunks,
                          "repeats": repeats})
    answer = json_answer([sys.executable, __file__, "--child", payload], env=child_env(1),
                         timeout=1800)
    if "error" in answer:
        raise RuntimeError(f"the {mode} child failed: {answer['error']}")
    return answer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=512, help="rows per group")
    parser.add_argument("--chunks-per-group", default="2,4,8")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="tiny model, batch 16, one repetition")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        payload = json.loads(args.child)
        print(json.dumps(child(payload["mode"], payload["model"], payload["rows"],
                               payload["chunks"], payload["repeats"])), flush=True)
        return 0
    model = QUICK if args.quick else DEFAULT
    rows = 16 if args.quick else args.batch
    repeats = 1 if args.quick else args.repeats
    counts = [int(c) for c in args.chunks_per_group.split(",")]
    if any(rows % count for count in counts):
        parser.error(f"--batch {rows} must be a multiple of every chunk count {counts}")
    chunks = [rows // count for count in counts]
    times = run_child("time", model, rows, chunks, repeats)
    print(f"## torch cached_step, first chunk's graph kept vs re-encoded (batch {rows} rows x 2 "
          f"groups; median of {repeats}, interleaved; one CPU thread; tiled InfoNCE)\n")
    print("| chunks per group | chunk | re-encode ms (cpu) | keep ms (cpu) | keep / re-encode (cpu) "
          "| keep / re-encode (wall) | re-encode MiB | keep MiB | added MiB |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for count, chunk in zip(counts, chunks):
        t = times[str(chunk)]
        grown = {mode: run_child(mode, model, rows, [chunk], repeats)["bytes"] for mode in MODES}
        mib = {mode: None if grown[mode] is None else grown[mode] / 2**20 for mode in MODES}
        added = (f"{mib['keep'] - mib['reencode']:+.1f}"
                 if None not in mib.values() else "–")
        print(f"| {count} | {chunk} | {1e3 * t['reencode']['cpu']:.0f} | "
              f"{1e3 * t['keep']['cpu']:.0f} | {t['keep']['cpu'] / t['reencode']['cpu']:.3f} | "
              f"{t['keep']['wall'] / t['reencode']['wall']:.3f} | "
              f"{_fmt(mib['reencode'])} | {_fmt(mib['keep'])} | {added} |", flush=True)
    return 0


def _fmt(value: Any) -> str:
    return "–" if value is None else f"{value:.1f}"


if __name__ == "__main__":
    sys.exit(main())
