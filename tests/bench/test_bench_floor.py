"""``benchmarks/bench_floor.py`` runs end to end on tiny sizes and prints one row per backend.

One chunk size (two chunks of a 16-row batch), one repetition: the floor, cached and plain steps
of every installed backend run for real in their child processes; no figure is checked but its
being a positive number (the machine is shared: timing asserts would be noise).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_floor.py"
INSTALLED = [backend for backend, module in (("torch", "torch"), ("jax", "jax"),
                                             ("tf", "tensorflow"))
             if importlib.util.find_spec(module) and importlib.util.find_spec(f"gradcache_{backend}")]


def test_the_floor_bench_prints_a_row_per_backend_with_positive_ratios() -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--chunks", "8"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    lines = done.stdout.splitlines()
    header = next(line for line in lines if line.startswith("| backend |"))
    assert "cached / floor (cpu)" in header and "cached / plain (cpu)" in header
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| backend")]
    assert [row.split("|")[1].split()[0] for row in rows] == INSTALLED
    for row in rows:
        cells = [cell.strip() for cell in row.split("|")[2:-1]]
        assert len(cells) == header.count("|") - 2 and cells[0] == "8", row
        assert all(float(cell) > 0 for cell in cells[4:]), row
