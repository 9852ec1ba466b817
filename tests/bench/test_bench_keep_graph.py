"""``benchmarks/bench_keep_graph.py``'s measurements run, in this process, at the tiny size.

The script's children are this module's ``child``: its timing mode runs both steps (graph kept,
graph not kept) and its memory mode one of them. Run in-process at the bench's tiny model (the
script's own end-to-end run starts three processes: ``--quick`` by hand). No figure is checked but
its being positive (the machine is shared: timing asserts would be noise); the step that must not
keep the graph is checked to re-encode every chunk.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_keep_graph.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_keep_graph", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_keep_graph", module)
    spec.loader.exec_module(module)
    return module


def test_both_steps_are_timed_and_only_one_keeps_the_graph(monkeypatch) -> None:
    bench = _bench()
    from gradcache_cli.bench import torch_bench

    calls = []
    forward = torch_bench.Encoder.forward
    monkeypatch.setattr(torch_bench.Encoder, "forward",
                        lambda self, ids: calls.append(1) or forward(self, ids))
    steps = bench._step(bench.QUICK, 16, 8)   # 2 chunks per group, 2 groups
    for name, expected in (("keep", 7), ("reencode", 8)):
        calls.clear()
        steps[name]()
        assert len(calls) == expected, name
    found = bench.child("time", bench.QUICK, 16, [8], 1)
    assert set(found["8"]) == {"keep", "reencode"}
    assert all(clock > 0 for step in found["8"].values() for clock in step.values())
