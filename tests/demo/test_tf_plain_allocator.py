"""TensorFlow's memory is reported where its CPU allocator keeps no statistics.

On x86 CPUs with AVX-512 TensorFlow turns oneDNN on and with it a pooling CPU allocator that keeps
statistics; elsewhere (CPUs without AVX-512, ARM) its allocator is a plain one and
``tf.config.experimental.get_memory_info`` raises. The demo once failed there. These tests force the
plain allocator on any machine (``TF_ENABLE_ONEDNN_OPTS=0``, in fresh processes: the choice is made
when TensorFlow loads) and run the demo's measured memory report (its computed breakdown included) and the bench's TensorFlow
memory job, which must then read resident memory instead.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = [pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None,
                                 reason="needs tensorflow"), pytest.mark.slow]

SMALL = ["--batch-size", "64", "--chunk-size", "16", "--small-batch", "8", "--epochs", "1",
         "--max-train", "256", "--max-test", "128", "--dim", "16", "--buckets", "4096",
         "--threads", "1", "--no-progress", "--no-compare", "--backend", "tf"]

CHILD = textwrap.dedent("""
    import io, json, sys
    from gradcache_cli import tf_memory
    from gradcache_cli.demo import options, runner
    args = options.parse(sys.argv[1:])
    out = io.StringIO()
    figures = runner.run(args, out=out)
    found = figures["memory"]
    print(json.dumps({
        "allocator_stats": tf_memory.allocator_stats_available(),
        "cached": found["cached"].bytes, "full": found["full"].bytes,
        "notes": [found["cached"].note, found["full"].note],
        "encoder_cached": found["breakdown"].encoder_cached,
        "encoder_full": found["breakdown"].encoder_full,
        "text": out.getvalue()}))
""")


def _plain_allocator_env() -> dict:
    env = dict(os.environ)
    env["TF_ENABLE_ONEDNN_OPTS"] = "0"
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    return env


def _demo(mode: str, demo_cache) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, *SMALL, "--cache-dir", str(demo_cache),
                           "--memory", mode], capture_output=True, text=True, timeout=600,
                          env=_plain_allocator_env())
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_tf_demo_measures_and_computes_memory_with_the_plain_allocator(demo_cache):
    # "measure" runs both probes in fresh processes and computes the breakdown in this one
    found = _demo("measure", demo_cache)
    # otherwise this test would not exercise the fallback it exists for
    assert found["allocator_stats"] is False
    assert found["cached"] is not None and found["full"] is not None, found["notes"]
    assert 0 < found["cached"] < found["full"], found
    # the tape's memory, read from resident memory, still scales with the rows
    assert found["encoder_full"] == 4 * found["encoder_cached"] > 0
    heading = next(line for line in found["text"].splitlines()
                   if line.startswith("memory of one step at batch 64"))
    assert "resident memory growth" in heading and "no statistics" in heading
    assert found["notes"] == ["rss", "rss"]


def test_tf_bench_memory_job_reads_resident_memory_with_the_plain_allocator():
    from gradcache_cli.bench.model import QUICK
    results = {}
    # one kind: the cached and the full job share the measurement; each is a TensorFlow start
    for kind in ("cached",):
        payload = {"backend": "tf", "job": "memory", "model": QUICK, "chunk": 16, "kind": kind,
                   "batch": 256, "budget": 2 << 30, "threads": 1}
        done = subprocess.run([sys.executable, "-m", "gradcache_cli.bench.child", json.dumps(payload)],
                              capture_output=True, text=True, timeout=600,
                              env=_plain_allocator_env())
        assert done.returncode == 0, done.stderr[-3000:]
        results[kind] = json.loads(done.stdout.strip().splitlines()[-1])
    for kind, found in results.items():
        assert found["method"] == "rss", (kind, found)
        assert found["bytes"] is not None and found["fits"], (kind, found)
