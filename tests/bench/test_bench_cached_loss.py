"""``benchmarks/bench_cached_loss.py`` runs end to end on tiny sizes and prints its ratio."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_cached_loss.py"


def test_the_cached_loss_bench_prints_a_ratio() -> None:
    pytest.importorskip("torch")
    done = subprocess.run([sys.executable, str(SCRIPT), "--rows", "8", "--chunk", "4", "--length",
                           "4", "--dim", "16", "--repeats", "1"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    row = done.stdout.strip().splitlines()[-1]
    assert row.startswith("| 8 | 4 |") and float(row.split("|")[-2]) > 0
