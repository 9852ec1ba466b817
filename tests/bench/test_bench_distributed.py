"""``benchmarks/bench_distributed.py`` runs end to end on tiny sizes and reports the byte floor.

A smoke test (the figures themselves are the benchmark's business): with two groups of equal size
the gathered step moves exactly the ``2·B·d`` floor, and ``across_ranks`` adds only scalars to it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_distributed.py"


@pytest.mark.slow
def test_the_distributed_benchmark_prints_its_table() -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--rows", "64", "--dim", "8", "--steps", "1", "--no-memory",
         "--worlds", "2"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [line.split("|") for line in done.stdout.splitlines() if line.startswith("| dense")
            or line.startswith("| across")]
    assert len(rows) == 4, done.stdout   # one process and two, for each loss
    by_name = {(cells[1].strip(), cells[2].strip()): cells[3].strip() for cells in rows}
    assert by_name[("dense, gathered", "2")] == "1.000"
    assert 1.0 <= float(by_name[("across_ranks(info_nce)", "2")]) < 1.1
