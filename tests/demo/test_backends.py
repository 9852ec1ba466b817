"""The JAX and TensorFlow demos run end to end on a small slice and print the torch demo's report.

Each backend trains the tiny configuration of ``test_end_to_end.py`` (with piece dropout, so the
replay of random state through gradcache runs too) and must print the same lines as torch: quality
before and after, the memory table with its ratio, and the batch-size comparison. Skipped where the
framework is not installed.
"""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import io
import os

import pytest

from gradcache_cli import memory
from gradcache_cli.demo import options, runner

SMALL = ["--batch-size", "64", "--chunk-size", "16", "--small-batch", "8", "--epochs", "2",
         "--max-train", "256", "--max-test", "128", "--dim", "16", "--buckets", "4096",
         "--threads", "1", "--no-progress", "--dropout", "0.1"]

FRAMEWORK = {"jax": "jax", "tf": "tensorflow"}


def _needs(backend: str):
    return pytest.mark.skipif(importlib.util.find_spec(FRAMEWORK[backend]) is None,
                              reason=f"needs {FRAMEWORK[backend]}")


@pytest.fixture
def keep_environment(monkeypatch):
    """The backends' ``setup`` may set XLA_FLAGS; the variable is put back after the test."""
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))


def _run(backend: str, argv: list[str], demo_cache) -> tuple[dict, str]:
    args = options.parse([*SMALL, "--backend", backend, "--cache-dir", str(demo_cache), *argv])
    out = io.StringIO()
    figures = runner.run(args, out=out)
    return figures, out.getvalue()


def _check_report(figures: dict, text: str, memory_how: str) -> None:
    """The figures and printed lines every backend owes the reader, as the torch demo prints them."""
    assert figures["n_train"] == 256 and figures["n_test"] == 128
    large, small = figures["large"], figures["small"]
    assert (large.batch, large.chunk, large.steps) == (64, 16, 8)
    assert (small.batch, small.chunk, small.steps) == (8, None, 64)
    for quality in (figures["before"], figures["after"], small.quality):
        assert 0 <= quality.recall1 <= quality.mrr10 <= 1
    assert figures["after"].mrr10 > figures["before"].mrr10  # it learns, even this little
    cached, full = figures["memory"]["cached"], figures["memory"]["full"]
    assert cached.bytes is not None and full.bytes is not None, (cached, full)
    assert 0 < cached.bytes < full.bytes
    lines = text.splitlines()

    def line(start: str) -> str:
        found = [entry for entry in lines if entry.lstrip().startswith(start)]
        assert found, f"no line starting with {start!r} in:\n{text}"
        return found[0]

    assert "MRR@10" in line("before training") and "recall@1" in line("before training")
    assert "(8 steps" in line("after training")
    assert f"({memory_how}" in line("memory of one step at batch 64")
    assert "of which encoder activations (computed)" in line("peak")
    assert line("cached step, chunk 16") and line("full-batch step")
    assert "the memory of the cached step for the same gradients" in line("the full-batch step needs")
    assert "64x64 loss" in line("Both steps also hold")
    assert "(square-root rule)" in line("why the batch matters")
    assert line("batch  negatives/query").split() == ["batch", "negatives/query", "step", "steps",
                                                      "MRR@10", "recall@1", "time"]
    assert line("8 ").split()[:4] == ["8", "7", "plain", "64"]
    assert line("64 ").split()[:5] == ["64", "63", "cached,", "chunk", "16"]
    assert lines[-1].startswith("done in")


@_needs("jax")
def test_jax_demo_trains_and_reports(demo_cache, keep_environment):
    # --memory measure is XLA's compiled account: in-process and quick, so the tiny run uses it.
    figures, text = _run("jax", ["--memory", "measure"], demo_cache)
    assert "(jax: jax " in text.splitlines()[0]
    _check_report(figures, text, "compiled: XLA's buffer assignment")
    # The encoder's share is what caching cuts: batch / chunk = 4 here.
    parts = figures["memory"]["breakdown"]
    assert parts.encoder_full == 4 * parts.encoder_cached > 0


@_needs("tf")
def test_tf_demo_trains_and_reports(demo_cache):
    # The measured memory takes two fresh TensorFlow processes; test_tf_memory_probe covers it.
    figures, text = _run("tf", ["--memory", "compute"], demo_cache)
    assert "(tf: tensorflow " in text.splitlines()[0]
    _check_report(figures, text, "computed from the sizes of what the step holds")
    parts = figures["memory"]["breakdown"]
    assert parts.encoder_full == 4 * parts.encoder_cached > 0


@_needs("tf")
@pytest.mark.slow
def test_tf_memory_probe_measures_each_step_in_a_fresh_process(demo_cache):
    args = options.parse([*SMALL, "--backend", "tf", "--cache-dir", str(demo_cache),
                          "--batch-size", "512", "--max-train", "512", "--dim", "64",
                          "--code-len", "256"])
    payload = {key: value for key, value in vars(args).items()}
    results = {kind: memory.run_probe("gradcache_cli.demo.tf_demo",
                                      {**payload, "probe": kind, "budget": 4 << 30})
               for kind in ("cached", "full")}
    cached, full = results["cached"], results["full"]
    assert cached.bytes is not None and full.bytes is not None, results
    # 512 rows of code vectors (512 x 256 x 64 floats, 32 MiB) live at once only in the full step.
    assert full.bytes > 2 * cached.bytes


@pytest.mark.parametrize("backend", ["jax", "tf"])
def test_backends_are_enabled_and_their_examples_run(backend):
    if importlib.util.find_spec(FRAMEWORK[backend]) is None:
        pytest.skip(f"needs {FRAMEWORK[backend]}")
    name = options.check_backend(backend)
    assert name == f"gradcache_cli.demo.{backend}_demo"
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
