"""``gradcache bench``: a quick real run writes its plots and table; bad arguments are one line.

The end-to-end test runs the real command (``--quick``, batches 16 and 32) on torch and JAX when
installed, so it measures for real, in child processes, in about half a minute on two busy cores.
The rest is in-process and quick: argument errors, the sweep's stopping rule on made-up figures,
and the report's cells for the cases a quick run never reaches (over the budget, did not fit).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from gradcache_cli import _main
from gradcache_cli.bench import report, runner
from gradcache_cli.bench.model import DEFAULT, sweep

MIB = 1 << 20
INSTALLED = [name for name in ("torch", "jax")
             if importlib.util.find_spec(name) and importlib.util.find_spec(f"gradcache_{name}")]


def _run_main(argv, capsys):
    try:
        status = _main.main(argv)
    except SystemExit as exit_:  # argparse's own errors exit from inside
        status = exit_.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.mark.slow
@pytest.mark.skipif(not INSTALLED, reason="neither torch nor jax is installed")
def test_quick_run_writes_plots_and_a_table_with_cached_and_full_rows(tmp_path):
    out = tmp_path / "bench-out"
    done = subprocess.run(
        [sys.executable, "-m", "gradcache_cli", "bench", "--quick", "--max-batch", "32",
         "--backends", ",".join(INSTALLED), "--out", str(out)],
        capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    for name in ["memory.png"] + [f"memory-{backend}.png" for backend in INSTALLED]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    table = (out / "results.md").read_text()
    for backend in INSTALLED:
        cached = next(line for line in table.splitlines() if line.startswith(f"| {backend} | cached |"))
        full = next(line for line in table.splitlines() if line.startswith(f"| {backend} | full |"))
        # batches 16 and 32: two measured figures in each row, in MiB
        assert all(float(cell) >= 0 for cell in cached.split("|")[3:5]), cached
        assert all(float(cell) >= 0 for cell in full.split("|")[3:5]), full
        assert f"| {backend} | 32 | 16 |" in table  # the step-time row
    assert "cached / full" in table and "Machine:" in table
    assert "| torch | cached |" in done.stdout or "| jax | cached |" in done.stdout  # printed too
    results = json.loads((out / "results.json").read_text())
    assert set(results["backends"]) == set(INSTALLED)
    assert "Traceback" not in done.stderr


BAD = [
    (["bench", "--budget-mib", "0"], "--budget-mib: expected a positive integer, got 0"),
    (["bench", "--backends", "torch,mxnet"], "unknown backend 'mxnet'"),
    (["bench", "--backends", ","], "comma-separated list"),
    (["bench", "--max-batch", "8", "--chunk-size", "16"], "must be at least --chunk-size (16)"),
    (["bench", "--threads", "-1"], "--threads: expected an integer >= 0"),
    (["bench", "--repeats", "many"], "--repeats: expected a positive integer, got 'many'"),
    (["bench", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
]


@pytest.mark.parametrize(("argv", "message"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_arguments_give_one_line_and_exit_2(argv, message, capsys):
    status, out, err = _run_main(argv, capsys)
    assert status == 2 and out == ""
    assert err.count("\n") == 1 and message in err, err
    assert err.startswith("gradcache")  # the top parser answers unknown flags itself


def test_out_that_is_a_file_is_refused(tmp_path, capsys):
    path = tmp_path / "taken"
    path.write_text("")
    status, _, err = _run_main(["bench", "--out", str(path)], capsys)
    assert status == 2 and err.count("\n") == 1 and "is not a folder" in err


def test_a_missing_backend_is_skipped_with_a_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(runner, "installed", lambda backend: "tensorflow is not installed")
    status, out, err = _run_main(["bench", "--backends", "tf", "--out", str(tmp_path)], capsys)
    assert "skipping tf: tensorflow is not installed" in out
    # nothing left to measure: a usage error, in one line
    assert status == 2 and err.count("\n") == 1 and "none of the requested backends" in err


def test_without_matplotlib_the_bench_says_so_before_measuring(tmp_path, capsys, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(runner.importlib.util, "find_spec",
                        lambda name, *rest: None if name == "matplotlib" else find_spec(name, *rest))
    monkeypatch.setattr(runner, "measure_memory", lambda *_: pytest.fail("measured"))
    status, out, err = _run_main(["bench", "--quick", "--out", str(tmp_path)], capsys)
    assert status == 2 and out == "" and err.count("\n") == 1, err
    assert "matplotlib" in err and "pip install 'gradient-cache[bench]'" in err


def test_the_sweep_stops_the_full_step_at_the_budget_and_goes_two_doublings_further():
    per_row = {"full": 1.0, "cached": 0.01}  # MiB per row
    budget = 300

    def measure(kind, batch):
        mib = per_row[kind] * batch + 1
        return {"bytes": int(mib * MIB), "fits": mib <= budget}

    found = sweep(measure, chunk=64, max_batch=1 << 16, extra_doublings=2)
    assert sorted(found["full"]) == [64, 128, 256, 512]  # 512 rows is over: measured, then stop
    assert not found["full"][512]["fits"]
    assert sorted(found["cached"]) == [64, 128, 256, 512, 1024, 2048]
    assert set(found) == {"cached", "full"}  # no contrast asked for
    assert sorted(sweep(measure, chunk=64, max_batch=128, extra_doublings=2)["cached"]) == [64, 128]


def test_a_contrast_kind_follows_the_cached_batches_until_it_no_longer_fits():
    per_row = {"full": 1.0, "cached": 0.01, "cached_dense": 0.2}  # MiB per row
    budget = 300

    def measure(kind, batch):
        mib = per_row[kind] * batch + 1
        return {"bytes": int(mib * MIB), "fits": mib <= budget}

    found = sweep(measure, chunk=64, max_batch=1 << 16, extra_doublings=2,
                  contrast=["cached_dense"])
    assert sorted(found["cached"]) == [64, 128, 256, 512, 1024, 2048]
    assert sorted(found["cached_dense"]) == [64, 128, 256, 512, 1024, 2048]
    assert not found["cached_dense"][2048]["fits"] and found["cached_dense"][1024]["fits"]


def test_the_sweep_stops_when_the_cached_step_no_longer_fits():
    def measure(kind, batch):
        return {"bytes": None, "fits": False, "note": "allocation failed"} if batch > 128 else \
            {"bytes": batch, "fits": True}

    found = sweep(measure, chunk=64, max_batch=1 << 16, extra_doublings=3)
    assert sorted(found["cached"]) == sorted(found["full"]) == [64, 128, 256]


def test_the_report_marks_steps_over_the_budget_and_steps_that_did_not_fit(tmp_path):
    budget = 100 * MIB
    plan = {"model": DEFAULT, "chunk": 64, "budget": budget, "quick": False, "threads": 1,
            "repeats": 3, "out": tmp_path}
    results = {"cached": {64: {"bytes": 20 * MIB, "fits": True},
                          128: {"bytes": 21 * MIB, "fits": True},
                          256: {"bytes": 22 * MIB, "fits": True}},
               "cached_dense": {64: {"bytes": 20 * MIB, "fits": True},
                                128: {"bytes": 30 * MIB, "fits": True},
                                256: {"bytes": 60 * MIB, "fits": True}},
               "full": {64: {"bytes": 60 * MIB, "fits": True},
                        128: {"bytes": 120 * MIB, "fits": False}}}
    found = {"torch": {"memory": {"results": results, "method": "rss"},
                       "time": {"rows": [{"batch": 512, "chunk": 64, "full": 1.0, "cached": 1.3}]}},
             "tf": {"memory": {"results": {"cached": {64: {"bytes": 9 * MIB, "fits": True}},
                                           "full": {64: {"bytes": None, "fits": False,
                                                         "note": "allocation failed"}}},
                               "method": "allocator"},
                    "time": {"error": "exit 1: boom"}}}
    machine = report.machine(1.0, 2.0, seconds=3)
    text = report.write(plan, found, machine, skipped=["jax"])
    assert "| torch | full | 60.0 | 120.0 (over) | – |" in text
    assert "| torch | cached | 20.0 | 21.0 | 22.0 |" in text
    assert "| torch | cached_dense | 20.0 | 30.0 | 60.0 |" in text and "dense loss" in text
    assert "| tf | full | did not fit | – | – |" in text
    assert "| torch | 512 | 64 | 1000 | 1300 | 1.30 |" in text
    assert "error: exit 1: boom" in text and "Skipped (not installed): jax" in text
    assert "the cached step runs batch 256, 4x larger" in text
    assert (tmp_path / "results.md").read_text() == text
    assert Path(tmp_path / "memory-tf.png").exists() and Path(tmp_path / "memory.png").exists()


def test_importing_the_bench_loads_no_framework():
    code = ("import sys; import gradcache_cli.bench.runner, gradcache_cli.bench.report, "
            "gradcache_cli.bench.model, gradcache_cli.bench.child; print(sorted(m for m in ('torch', 'jax', 'tensorflow', "
            "'keras', 'matplotlib') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
